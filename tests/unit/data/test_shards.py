"""KITTI-layout folders -> validated Parquet shards with a manifest, written atomically."""
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.data.formats import IGNORE_INDEX, decode_kitti_gt, encode_kitti_gt
from raytrain.storage.paths import RemotePath
from raytrain.data.manifest import read_manifest
from raytrain.data.shards import write_shards
from raytrain.data.splits import split_of
from raytrain.errors import DataError
from tests.helpers import run_cli


def test_manifest_and_rows_match_the_source(synthetic_kitti, tiny_shards):
    manifest = read_manifest(tiny_shards)
    assert manifest.format == "kitti"
    assert [c.model_dump() for c in manifest.classes] == [{"name": "road", "id": 1, "color": [255, 0, 255]}]
    assert manifest.num_samples["train"] + manifest.num_samples["val"] == 24
    assert manifest.num_samples["val"] > 0
    assert 0.05 < manifest.pixel_frequencies["road"] < 0.5
    rows = [row for split in ("train", "val") for path in read_manifest(tiny_shards).shard_paths(split) for row in pq.read_table(path).to_pylist()]
    assert sorted(row["id"] for row in rows) == [f"um_{i:06d}" for i in range(24)]
    row = next(r for r in rows if r["id"] == "um_000003")
    assert row["image"] == (synthetic_kitti / "training/image_2/um_000003.png").read_bytes()  # not re-encoded
    gt = np.asarray(Image.open(synthetic_kitti / "training/gt_image_2/um_road_000003.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]))), decode_kitti_gt(gt))
    assert (row["width"], row["height"]) == (64, 32)
    assert row["split"] == split_of("um_000003", 0.25, 0)


def test_invalid_area_becomes_ignore_label(tmp_path):
    root = tmp_path / "kitti"
    (root / "training/image_2").mkdir(parents=True)
    (root / "training/gt_image_2").mkdir(parents=True)
    road = np.zeros((8, 12), bool)
    road[4:, 3:9] = True
    valid = np.ones_like(road)
    valid[:2] = False
    Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(root / "training/image_2/um_000000.png")
    Image.fromarray(encode_kitti_gt(road, valid)).save(root / "training/gt_image_2/um_road_000000.png")
    write_shards(root, "kitti", tmp_path / "out", val_fraction=0.0)
    row = pq.read_table(read_manifest(tmp_path / "out").shard_paths("train")[0]).to_pylist()[0]
    mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
    expected = road.astype(np.uint8)
    expected[:2] = IGNORE_INDEX
    assert np.array_equal(mask, expected)


def _broken_copy(synthetic_kitti, tmp_path, breakage):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_kitti, root)
    return root, breakage(root)


def _truncate(root):
    path = root / "training/image_2/um_000005.png"
    path.write_bytes(path.read_bytes()[:200])
    return path


def _resize_mask(root):
    path = root / "training/gt_image_2/um_road_000007.png"
    Image.open(path).resize((60, 32), Image.NEAREST).save(path)
    return path


def _drop_mask(root):
    (root / "training/gt_image_2/um_road_000002.png").unlink()
    return root / "training/image_2/um_000002.png"


@pytest.mark.parametrize(
    "breakage, message",
    [(_truncate, "not a readable image"), (_resize_mask, "mask is 60x32 but its image is 64x32"), (_drop_mask, "image has no mask")],
)
def test_bad_sample_is_one_line_exit_2_and_nothing_written(synthetic_kitti, tmp_path, breakage, message):
    root, bad_file = _broken_copy(synthetic_kitti, tmp_path, breakage)
    out = tmp_path / "shards"
    run = run_cli(["data", "shard", root, "--format", "kitti", "--out", out], timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().startswith(f"raytrain: error: {bad_file}: {message}")
    assert len(run.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".shards.tmp-*"))

    skipped = run_cli(["data", "shard", root, "--format", "kitti", "--out", out, "--skip-bad"], timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipped: {bad_file}: {message}" in skipped.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"]["train"] + manifest["num_samples"]["val"] == 23


def test_empty_input_and_existing_output_are_errors(tmp_path, tiny_shards):
    (tmp_path / "empty/training/image_2").mkdir(parents=True)
    with pytest.raises(DataError, match="no samples found"):
        write_shards(tmp_path / "empty", "kitti", tmp_path / "out")
    with pytest.raises(DataError, match="already exists"):
        write_shards(tmp_path / "empty", "kitti", tiny_shards)
    with pytest.raises(DataError, match="unknown dataset format 'pascal'"):
        write_shards(tmp_path / "empty", "pascal", tmp_path / "out")


def _shard_cli(*args, timeout=120):
    return run_cli(["data", "shard", *args], timeout=timeout)


def _garble(path):
    path.write_bytes(b"this is not a PNG at all" * 10)
    return path


def test_every_bad_file_is_listed_by_skip_bad(synthetic_kitti, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_kitti, root)
    bad = {
        _garble(root / "training/image_2/um_000001.png"): "not a readable image",
        _truncate(root): "not a readable image",
        _resize_mask(root): "mask is 60x32 but its image is 64x32",
        _drop_mask(root): "image has no mask",
        _garble(root / "training/gt_image_2/um_road_000009.png"): "not a readable mask",
    }
    run = _shard_cli(root, "--format", "kitti", "--out", tmp_path / "strict")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    first = min(bad, key=lambda path: path.name.replace("road_", ""))  # samples are read in id order
    assert run.stderr.startswith(f"raytrain: error: {first}: {bad[first]}")
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict.tmp-*"))

    run = _shard_cli(root, "--format", "kitti", "--out", tmp_path / "lenient", "--skip-bad")
    assert run.returncode == 0, run.stderr
    listed = [line for line in run.stderr.splitlines() if line.startswith("skipped: ")]
    for path, message in bad.items():
        assert any(line.startswith(f"skipped: {path}: {message}") for line in listed), (path, listed)
    assert len(listed) == len(bad)
    manifest = read_manifest(tmp_path / "lenient")
    assert manifest.num_samples["train"] + manifest.num_samples["val"] == 24 - len(bad)
    assert len(manifest.skipped) == len(bad)


def test_empty_or_missing_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty/training/image_2").mkdir(parents=True)
    for src, message in ((tmp_path / "empty", "no samples found in the kitti layout"),
                         (tmp_path / "nowhere", "dataset folder not found"),
                         (tmp_path, "training/image_2: not found")):
        run = _shard_cli(src, "--format", "kitti", "--out", tmp_path / "out")
        assert run.returncode == 2
        assert run.stderr.startswith("raytrain: error: ") and message in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_file_uris_in_and_out(synthetic_kitti, tiny_shards, tmp_path):
    out_uri = (tmp_path / "uri out").as_uri()  # a space: percent-encoded in the URI
    run = _shard_cli(synthetic_kitti.as_uri(), "--format", "kitti", "--out", out_uri, "--val-fraction", "0.25")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "uri out" / "manifest.json").is_file()
    manifest = read_manifest(out_uri)
    assert manifest.num_samples == read_manifest(tiny_shards).num_samples
    for split in ("train", "val"):
        paths = read_manifest(out_uri).shard_paths(split)
        assert paths == read_manifest(tmp_path / "uri out").shard_paths(split)
        assert all(Path(path).is_file() for path in paths)
    ids = sorted(i for split in ("train", "val") for p in read_manifest(out_uri).shard_paths(split) for i in pq.read_table(p)["id"].to_pylist())
    assert ids == [f"um_{i:06d}" for i in range(24)]
    with pytest.raises(DataError, match="already exists"):
        write_shards(synthetic_kitti.as_uri(), "kitti", out_uri)
    with pytest.raises(DataError, match="no manifest"):
        read_manifest((tmp_path / "nothing").as_uri())


def test_remote_filesystem_code_path_reads_and_writes_through_pyarrow(synthetic_kitti, tiny_shards, tmp_path):
    """The readers and writer as they run for s3:// or gs://, on a real pyarrow filesystem (local disk)."""
    local = pafs.LocalFileSystem()
    src = RemotePath(local, str(synthetic_kitti), "")
    manifest = write_shards(src, "kitti", f"file://{tmp_path}/remote", val_fraction=0.25, rows_per_shard=4)
    assert manifest.num_samples == read_manifest(tiny_shards).num_samples
    assert manifest.source == str(synthetic_kitti)
    for split in ("train", "val"):
        ours = [r for p in read_manifest(tmp_path / "remote").shard_paths(split) for r in pq.read_table(p).to_pylist()]
        theirs = [r for p in read_manifest(tiny_shards).shard_paths(split) for r in pq.read_table(p).to_pylist()]
        assert [r["image"] for r in ours] == [r["image"] for r in theirs]
        assert [r["mask"] for r in ours] == [r["mask"] for r in theirs]


def test_a_file_that_appears_in_out_while_sharding_survives(tmp_path):
    """Publishing never deletes what it did not write: a rename onto a folder that is no longer empty fails."""
    from raytrain.data.synthetic import write_synthetic_kitti

    src = write_synthetic_kitti(tmp_path / "raw", 4, seed=0, size=(32, 16))
    out = tmp_path / "out"
    out.mkdir()  # empty: allowed as --out

    def progress(done: int, total: int) -> None:
        if done == total:  # after the emptiness check, before the shards are published
            (out / "notes.txt").write_text("mine")

    with pytest.raises(DataError, match=rf"^{out}: files appeared in it while sharding"):
        write_shards(src, "kitti", out, val_fraction=0.5, progress=progress)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.tmp-*"))
    # Into an empty folder, publishing still works.
    (out / "notes.txt").unlink()
    assert write_shards(src, "kitti", out, val_fraction=0.5).num_samples["train"] > 0
    assert (out / "manifest.json").is_file()


def test_shard_cli_records_the_group_split_in_the_manifest(grouped_kitti, tmp_path):
    from tests.helpers import CATEGORIES

    run = _shard_cli(grouped_kitti, "--format", "kitti", "--out", tmp_path / "by_name", "--group-by", "^[^_]+", "--val-groups", "uu")
    assert run.returncode == 0, run.stderr
    assert "val groups: uu (5)" in run.stdout
    manifest = json.loads((tmp_path / "by_name/manifest.json").read_text())
    assert manifest["split"] == {"val_fraction": 0.2, "seed": 0, "group_by": "^[^_]+", "val_groups": ["uu"]}
    assert manifest["groups"] == {"train": {"um": 14, "umm": 5}, "val": {"uu": 5}}
    for split in ("train", "val"):
        table = pq.read_table(read_manifest(tmp_path / "by_name").shard_paths(split), columns=["id", "group", "split"]).to_pylist()
        assert all(row["group"] == row["id"].split("_")[0] and row["split"] == split for row in table)
        assert len(table) == manifest["num_samples"][split]

    run = _shard_cli(grouped_kitti, "--format", "kitti", "--out", tmp_path / "seeded", "--group-by", "^[^_]+",
                     "--val-fraction", "0.3", "--seed", "3")
    assert run.returncode == 0, run.stderr
    manifest = read_manifest(tmp_path / "seeded")
    val_groups = manifest.split["val_groups"]
    assert manifest.groups["val"] == {group: CATEGORIES[group] for group in val_groups}
    assert set(manifest.groups["train"]) == set(CATEGORIES) - set(val_groups)


def test_rows_per_shard_sets_the_files_per_split(synthetic_kitti, tmp_path):
    for rows in (None, 5):
        out = tmp_path / f"rows_{rows}"
        run = _shard_cli(synthetic_kitti, "--format", "kitti", "--out", out, *(["--rows-per-shard", rows] if rows else []))
        assert run.returncode == 0, run.stderr
        counts = read_manifest(out).num_samples
        assert sum(counts.values()) == 24 and counts["train"] > 5
        files = {split: len(read_manifest(out).shard_paths(split)) for split in counts}
        assert files == {split: math.ceil(count / (rows or 32)) for split, count in counts.items()}, (files, counts)
    run = _shard_cli(synthetic_kitti, "--format", "kitti", "--out", tmp_path / "zero", "--rows-per-shard", "0")
    assert run.returncode == 2 and "--rows-per-shard" in run.stderr and not (tmp_path / "zero").exists()
