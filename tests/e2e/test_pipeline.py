"""Shards of every format -> the Ray Data pipeline -> the batches the training loop reads."""
import numpy as np

from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.pipeline import FIRST_EPOCH, build_datasets, read_shards
from raytrain.data.manifest import read_manifest
from raytrain.data.shards import write_shards
from tests.helpers import tiny_config
from tests.helpers import PALETTE_MAP, folder_dataset, kitti_with_lanes, palette_mask


def _ids(shards, split):
    import pyarrow.parquet as pq

    return sorted(i for path in read_manifest(shards).shard_paths(split) for i in pq.read_table(path, columns=["id"])["id"].to_pylist())


def _check_streams(shards, tmp_path, classes, size=(16, 8)):
    """Both splits deliver every sample once as uint8 NHWC images and uint8 NHW masks of known labels."""
    config = tiny_config(shards, tmp_path / "results", **{"data.size": list(size), "classes": classes})
    manifest = read_manifest(config.data.path)
    streamed, cached = (build_datasets(config, manifest, cpus=4, cache=cache) for cache in (False, True))
    labels = set(range(max(2, len(classes)))) | {IGNORE_INDEX}
    for split, dataset in [*streamed.items(), *cached.items()]:
        split = "train" if split == FIRST_EPOCH else split
        ids = []
        for batch in dataset.iter_batches(batch_size=3):
            assert set(batch) == {"id", "image", "mask"}
            assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (size[1], size[0], 3)
            assert batch["mask"].dtype == np.uint8 and batch["mask"].shape[1:] == (size[1], size[0])
            assert set(np.unique(batch["mask"]).tolist()) <= labels
            ids += [str(i) for i in batch["id"]]
        assert sorted(ids) == _ids(shards, split), split


def test_kitti_road_and_lane_shards_stream(ray_cluster, tiny_shards, tmp_path):
    _check_streams(tiny_shards, tmp_path, ["road"])
    root, _ = kitti_with_lanes(tmp_path)
    write_shards(root, "kitti", tmp_path / "lane", val_fraction=0.5, classes=["lane"])
    _check_streams(tmp_path / "lane", tmp_path, ["lane"])


def test_camvid_shards_stream_binary_and_all_classes(ray_cluster, camvid_tree, tmp_path):
    root, _ = camvid_tree
    write_shards(root, "camvid", tmp_path / "road", classes=["road"])
    _check_streams(tmp_path / "road", tmp_path, ["road"])
    manifest = write_shards(root, "camvid", tmp_path / "all")
    _check_streams(tmp_path / "all", tmp_path, manifest.class_names)


def test_folder_shards_stream_with_palette_and_index_maps(ray_cluster, tmp_path):
    masks = {f"p{i}": palette_mask(i)[1] for i in range(4)}
    palette = folder_dataset(tmp_path / "palette", PALETTE_MAP, masks, rgb=True)
    manifest = write_shards(palette, "folder", tmp_path / "palette_shards", val_fraction=0.5)
    _check_streams(tmp_path / "palette_shards", tmp_path, manifest.class_names)
    index_map = {"classes": [{"name": "road", "index": 1}, {"name": "rest", "index": 0}], "ignore_index": 255}
    masks = {f"i{i}": np.random.default_rng(i).choice([0, 1, 255], (8, 12)) for i in range(4)}
    indexed = folder_dataset(tmp_path / "index", index_map, masks, rgb=False)
    manifest = write_shards(indexed, "folder", tmp_path / "index_shards", val_fraction=0.5, classes=["road"])
    _check_streams(tmp_path / "index_shards", tmp_path, ["road"])


def test_file_uri_dataset_path_reads_the_same_shards(ray_cluster, tiny_shards, tmp_path):
    uri = tiny_shards.as_uri()
    assert read_manifest(uri).model_dump() == read_manifest(tiny_shards).model_dump()
    assert read_manifest(uri).shard_paths("train") == read_manifest(tiny_shards).shard_paths("train")
    _check_streams(uri, tmp_path, ["road"])


def test_every_shard_file_is_its_own_read_task(ray_cluster, tiny_shards):
    """One block per file: every CPU decodes from the first file on (see benchmarks/ingest.py)."""
    paths = read_manifest(tiny_shards).shard_paths("train")
    assert len(paths) >= 3
    dataset = read_shards(paths, shuffle=True).materialize()
    assert dataset.num_blocks() == len(paths)
    assert sorted(dataset.to_pandas()["id"]) == _ids(tiny_shards, "train")


def test_datasets_run_without_the_op_resource_allocator(ray_cluster, tiny_shards, tmp_path):
    """Its CPU budget comes a second into each epoch; until then it ran one task (see read_shards)."""
    datasets = build_datasets(tiny_config(tiny_shards, tmp_path), read_manifest(tiny_shards), cpus=4, cache=False)
    assert not any(dataset.context.op_resource_reservation_enabled for dataset in datasets.values())
    assert ray_cluster.data.DataContext.get_current().op_resource_reservation_enabled  # left as it was


def test_decoding_runs_inside_the_read_tasks(ray_cluster, tiny_shards, tmp_path):
    """With at least a file per CPU, read and decode fuse into one task per file: no extra
    object-store trip per block. (Fewer files than CPUs: tests/e2e/test_decode_and_cache.py.)"""
    manifest = read_manifest(tiny_shards)
    assert len(manifest.shard_paths("train")) >= 4
    train = build_datasets(tiny_config(tiny_shards, tmp_path), manifest, cpus=4, cache=False)["train"]
    assert sum(len(batch["id"]) for batch in train.iter_batches(batch_size=4)) == len(_ids(tiny_shards, "train"))
    assert "ReadParquet->MapBatches(decode_block)" in train.stats()


def _ordered_ids(dataset, epochs=2):
    """Each execution's ids in the dataset's own order (not in the order its tasks finish)."""
    dataset.context.execution_options.preserve_order = True
    return [[str(i) for batch in dataset.iter_batches(batch_size=None) for i in batch["id"]] for _ in range(epochs)]


def test_seeded_file_order_changes_every_epoch_and_repeats_across_datasets(ray_cluster, tiny_shards):
    paths = read_manifest(tiny_shards).shard_paths("train")
    first, again, other = (_ordered_ids(read_shards(paths, shuffle=True, seed=seed)) for seed in (0, 0, 1))
    assert sorted(first[0]) == sorted(first[1]) == _ids(tiny_shards, "train")
    assert first == again
    assert first[0] != first[1]
    assert first != other
