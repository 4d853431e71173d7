"""Ray Data's decode on a real local cluster: every CPU decodes whatever the file count, and the
decoded cache hands the first epoch the same batches as streaming does, then decodes nothing more,
each later epoch in an order drawn from (seed, epoch) alone."""
import threading
import time

import numpy as np
import pytest

from raytrain.data.manifest import read_manifest
from raytrain.data.pipeline import FIRST_EPOCH, build_datasets, cached_epoch, decoded_split
from raytrain.data.shards import write_shards
from raytrain.data.synthetic import write_synthetic_kitti
from tests.helpers import tiny_config

KITTI_SIZE = (1248, 384)
DECODE_TASK = "MapBatches(decode_block)"  # the decode map, apart from the read when a file is split


def now_ms() -> float:
    return time.time() * 1000


def decode_tasks(since_ms: float, expected: int, timeout_s: float = 20, name: str = DECODE_TASK):
    """The finished tasks whose name contains `name` and that started after `since_ms` (earlier
    tests' tasks, on the cluster the session shares, are not this test's), once `expected` of them
    are there or `timeout_s` has passed (task events reach the State API a second or so late)."""
    import ray
    from ray.util.state import list_tasks

    address = ray.get_runtime_context().gcs_address  # this session's cluster, whatever else runs here
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = [t for t in list_tasks(address=address, detail=True, limit=10_000)
                 if name in t.name and t.state == "FINISHED" and t.end_time_ms
                 and t.start_time_ms and t.start_time_ms >= since_ms]
        if len(tasks) >= expected or time.monotonic() > deadline:
            return tasks


@pytest.fixture(scope="module")
def one_file_split(tmp_path_factory):
    """64 scenes at KITTI size whose train split is one Parquet file: decoding a block takes long
    enough (about a second) for a second task to start beside it."""
    root = tmp_path_factory.mktemp("one_file")
    raw = write_synthetic_kitti(root / "kitti", 64, seed=2, size=KITTI_SIZE)
    write_shards(raw, "kitti", root / "shards", val_fraction=0.2, rows_per_shard=64)
    manifest = read_manifest(root / "shards")
    assert len(manifest.shard_paths("train")) == 1
    return manifest


def test_a_split_of_one_file_is_decoded_by_two_cpus_at_once(ray_cluster, one_file_split):
    overlapping = False
    for attempt in range(3):  # the first pass may wait for a second worker process to start
        since = now_ms()
        dataset = decoded_split(one_file_split, "train", KITTI_SIZE, cpus=2, shuffle=True, seed=0)
        assert sum(len(batch["id"]) for batch in dataset.iter_batches(batch_size=8)) == one_file_split.count("train")
        tasks = sorted(decode_tasks(since, expected=2), key=lambda t: t.start_time_ms)
        assert len(tasks) == 2, [t.name for t in tasks]  # the one file, split in two blocks
        first, second = tasks
        if second.start_time_ms < first.end_time_ms and first.worker_pid != second.worker_pid:
            overlapping = True
            break
    assert overlapping, "the two decode tasks of the one file never ran at the same time"


def batches_of_each_rank(dataset, world_size: int = 2) -> list[list[tuple]]:
    """Each rank's (id, image bytes, mask bytes) in order, through the controller's SplitData, all
    ranks read at once as DDP workers read them."""
    from raytrain.launch.controller import SplitData

    splits = SplitData().configure({"train": dataset}, world_size, None, None)
    out: list[list[tuple]] = [[] for _ in range(world_size)]

    def read(rank):
        for batch in splits[rank]["train"].iter_batches(batch_size=4):
            out[rank] += [(i, img.tobytes(), m.tobytes()) for i, img, m in zip(batch["id"], batch["image"], batch["mask"])]

    threads = [threading.Thread(target=read, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return out


def test_the_first_epochs_batches_are_the_same_with_the_cache_on_and_off(ray_cluster, tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path, **{"train.seed": 3})
    manifest = read_manifest(tiny_shards)
    streamed = build_datasets(config, manifest, cpus=4, cache=False)
    cached = build_datasets(config, manifest, cpus=4, cache=True)
    assert set(cached) == {FIRST_EPOCH, "val"} and set(streamed) == {"train", "val"}
    first = batches_of_each_rank(streamed["train"])
    assert batches_of_each_rank(cached[FIRST_EPOCH]) == first
    assert all(first) and len({row[0] for rank in first for row in rank}) == manifest.count("train")


def ids_of_each_rank(split, seed: int, epoch: int, world_size: int = 2) -> list[list[str]]:
    return [[str(i) for batch in cached_epoch(split, seed, epoch, rank, world_size).iter_batches(batch_size=4) for i in batch["id"]]
            for rank in range(world_size)]


def test_each_later_cached_epoch_has_an_order_drawn_from_the_seed_and_the_epoch_alone(ray_cluster, tiny_shards, tmp_path):
    """Read again and again, in any order, an epoch is the same; epochs differ from each other. (Ray
    Data's own reseeding per execution took its count from executions that may not yet have ended.)"""
    manifest = read_manifest(tiny_shards)
    split = build_datasets(tiny_config(tiny_shards, tmp_path), manifest, cpus=4, cache=True)[FIRST_EPOCH]
    epochs = {epoch: ids_of_each_rank(split, 3, epoch) for epoch in (3, 1, 2)}
    assert ids_of_each_rank(split, 3, 2) == epochs[2] and ids_of_each_rank(split, 3, 1) == epochs[1]
    assert len({str(order) for order in epochs.values()}) == 3
    assert ids_of_each_rank(split, 4, 1) != epochs[1]
    for rank0, rank1 in epochs.values():  # DDP's split: equal steps, disjoint, fewer than 2 rows left out
        assert len(rank0) == len(rank1) and not set(rank0) & set(rank1)
        assert len(rank0) + len(rank1) >= manifest.count("train") - 1
    [alone] = ids_of_each_rank(split, 3, 1, world_size=1)
    assert sorted(alone) == sorted(row for batch in split.iter_batches(batch_size=4) for row in map(str, batch["id"]))


def test_cached_epochs_decode_nothing(ray_cluster, one_file_split, tmp_path):
    since = now_ms()
    config = tiny_config(one_file_split.location, tmp_path, **{"data.size": list(KITTI_SIZE), "train.seed": 0})
    datasets = build_datasets(config, one_file_split, cpus=2, cache=True)
    # Decoded once, now: train's one file in two blocks, val's in one task fused with its read.
    assert len(decode_tasks(since, expected=3, name="decode_block")) == 3
    since = now_ms()
    for epoch in (1, 2):
        images = [batch["image"] for batch in cached_epoch(datasets[FIRST_EPOCH], 0, epoch).iter_batches(batch_size=8)]
        assert sum(len(b) for b in images) == one_file_split.count("train") and images[0].dtype == np.uint8
    assert decode_tasks(since, expected=1, timeout_s=5, name="decode_block") == []
