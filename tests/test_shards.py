"""KITTI-layout folders -> validated Parquet shards with a manifest, written atomically."""
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.data.formats import IGNORE_INDEX, decode_kitti_gt, encode_kitti_gt
from raytrain.data.shards import read_manifest, shard_paths, split_of, write_shards
from raytrain.errors import DataError


def test_manifest_and_rows_match_the_source(synthetic_kitti, tiny_shards):
    manifest = read_manifest(tiny_shards)
    assert manifest["format"] == "kitti"
    assert manifest["classes"] == [{"name": "road", "id": 1, "color": [255, 0, 255]}]
    assert manifest["num_samples"]["train"] + manifest["num_samples"]["val"] == 24
    assert manifest["num_samples"]["val"] > 0
    assert 0.05 < manifest["pixel_frequencies"]["road"] < 0.5
    rows = [row for split in ("train", "val") for path in shard_paths(tiny_shards, split) for row in pq.read_table(path).to_pylist()]
    assert sorted(row["id"] for row in rows) == [f"um_{i:06d}" for i in range(24)]
    row = next(r for r in rows if r["id"] == "um_000003")
    assert row["image"] == (synthetic_kitti / "training/image_2/um_000003.png").read_bytes()  # not re-encoded
    gt = np.asarray(Image.open(synthetic_kitti / "training/gt_image_2/um_road_000003.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]))), decode_kitti_gt(gt))
    assert (row["width"], row["height"]) == (64, 32)
    assert row["split"] == split_of("um_000003", 0.25, 0)


def test_split_is_deterministic_by_id():
    splits = [split_of(f"um_{i:06d}", 0.2, seed=0) for i in range(1000)]
    assert splits == [split_of(f"um_{i:06d}", 0.2, seed=0) for i in range(1000)]
    assert 0.15 < splits.count("val") / 1000 < 0.25
    assert splits != [split_of(f"um_{i:06d}", 0.2, seed=1) for i in range(1000)]


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
    row = pq.read_table(shard_paths(tmp_path / "out", "train")[0]).to_pylist()[0]
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
    Image.open(path).resize((60, 32)).save(path)
    return path


def _drop_mask(root):
    (root / "training/gt_image_2/um_road_000002.png").unlink()
    return root / "training/image_2/um_000002.png"


@pytest.mark.parametrize(
    "breakage, message",
    [(_truncate, "unreadable image"), (_resize_mask, "mask is 60x32 but its image is 64x32"), (_drop_mask, "image has no mask")],
)
def test_bad_sample_is_one_line_exit_2_and_nothing_written(synthetic_kitti, tmp_path, breakage, message):
    root, bad_file = _broken_copy(synthetic_kitti, tmp_path, breakage)
    out = tmp_path / "shards"
    run = subprocess.run(
        [sys.executable, "-m", "raytrain.cli", "data", "shard", str(root), "--format", "kitti", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().startswith(f"raytrain: error: {bad_file}: {message}")
    assert len(run.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".shards.tmp-*"))

    skipped = subprocess.run(
        [sys.executable, "-m", "raytrain.cli", "data", "shard", str(root), "--format", "kitti", "--out", str(out), "--skip-bad"],
        capture_output=True, text=True, timeout=120,
    )
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


def test_inverse_frequency_class_weights_come_from_the_manifest(tiny_shards, tmp_path):
    from raytrain.loop import loss_class_weights
    from tests.conftest import tiny_config

    frequencies = read_manifest(tiny_shards)["pixel_frequencies"]
    background, road = loss_class_weights(tiny_config(tiny_shards, tmp_path, **{"loss.class_weights": "inverse_frequency"}))
    assert road / background == pytest.approx(frequencies["background"] / frequencies["road"])
    assert background + road == pytest.approx(2.0)
    assert loss_class_weights(tiny_config(tiny_shards, tmp_path, **{"loss.class_weights": [1.0, 3.0]})) == [1.0, 3.0]
