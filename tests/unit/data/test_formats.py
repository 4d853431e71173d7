"""CamVid and generic folder formats -> shards, with all classes or one class as a binary target."""
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.data.formats import CAMVID_CLASSES, CAMVID_COLORS, IGNORE_INDEX, get_format
from raytrain.data.manifest import read_manifest
from raytrain.data.shards import write_shards
from raytrain.errors import DataError

from tests.helpers import CAR, H, PALETTE_MAP, REAL_CAMVID, ROAD, SKY, W, folder_dataset, kitti_with_lanes, palette_mask, run_cli, write_yaml


def _rows(shards):
    return {
        row["id"]: row
        for split in ("train", "val")
        for path in read_manifest(shards).shard_paths(split)
        for row in pq.read_table(path).to_pylist()
    }


def _mask(row):
    return np.asarray(Image.open(io.BytesIO(row["mask"])))


def test_camvid_all_classes_keeps_its_own_split(camvid_tree, tmp_path):
    root, annots = camvid_tree
    manifest = write_shards(root, "camvid", tmp_path / "out", val_fraction=0.0)
    assert manifest.format == "camvid"
    assert manifest.num_samples == {"train": 2, "val": 1}  # own split; test/ never read
    assert [c.model_dump() for c in manifest.classes] == [
        {"name": name, "id": i, "color": list(color)} for i, (name, color) in enumerate(zip(CAMVID_CLASSES, CAMVID_COLORS))
    ]
    assert manifest.classes[3].model_dump() == {"name": "road", "id": 3, "color": [128, 64, 128]}
    assert set(manifest.pixel_frequencies) == set(CAMVID_CLASSES)
    rows = _rows(tmp_path / "out")
    assert {r["id"]: r["split"] for r in rows.values()} == {"0001TP_000010": "train", "0001TP_000020": "train", "0016E5_000030": "val"}
    for stem, row in rows.items():
        expected = annots[stem].copy()
        expected[expected == 11] = IGNORE_INDEX
        assert np.array_equal(_mask(row), expected)
        assert row["image"] == (root / row["split"] / f"{stem}.jpg").read_bytes()


def test_camvid_road_only_is_binary(camvid_tree, tmp_path):
    root, annots = camvid_tree
    manifest = write_shards(root, "camvid", tmp_path / "out", classes=["road"])
    assert [c.model_dump() for c in manifest.classes] == [{"name": "road", "id": 1, "color": [128, 64, 128]}]
    assert set(manifest.pixel_frequencies) == {"background", "road"}
    for stem, row in _rows(tmp_path / "out").items():
        annot = annots[stem]
        expected = np.where(annot == 3, 1, 0).astype(np.uint8)
        expected[annot == 11] = IGNORE_INDEX
        mask = _mask(row)
        assert np.array_equal(mask, expected)
        assert list(mask[0, :4]) == [1, IGNORE_INDEX, 0, 0]


def test_classes_option_is_checked(camvid_tree, tmp_path):
    root, _ = camvid_tree
    assert get_format("camvid", list(CAMVID_CLASSES)).classes == CAMVID_CLASSES
    assert get_format("camvid", ["Road"]).classes == ("road",)
    for bad in (["lane"], ["road", "car"]):
        with pytest.raises(DataError, match="camvid"):
            get_format("camvid", bad)
    assert get_format("kitti", ["road"]) == get_format("kitti")
    with pytest.raises(DataError, match="kitti"):
        get_format("kitti", ["car"])
    with pytest.raises(DataError, match="class_map"):
        get_format("kitti", class_map=tmp_path / "classes.yaml")


def test_camvid_bad_annotation_value_names_the_file(camvid_tree, tmp_path):
    root, _ = camvid_tree
    bad = root / "trainannot" / "0001TP_000020.png"
    annot = np.asarray(Image.open(bad)).copy()
    annot[2, 2] = 14
    Image.fromarray(annot, mode="L").save(bad)
    with pytest.raises(DataError, match=rf"^{bad}: mask values \[14\] are not classes of camvid"):
        write_shards(root, "camvid", tmp_path / "out")
    manifest = write_shards(root, "camvid", tmp_path / "out2", classes=["road"], skip_bad=True)
    assert manifest.num_samples == {"train": 1, "val": 1} and len(manifest.skipped) == 1
    assert not (tmp_path / "out").exists()


def test_folder_palette_all_classes_and_binary(tmp_path):
    pairs = {f"img{i}": palette_mask(i) for i in range(3)}
    root = folder_dataset(tmp_path, PALETTE_MAP, {stem: rgb for stem, (_, rgb) in pairs.items()}, rgb=True)
    manifest = write_shards(root, "folder", tmp_path / "multi", val_fraction=0.0)
    assert manifest.format == "folder"
    assert [c.model_dump() for c in manifest.classes] == [
        {"name": "road", "id": 0, "color": list(ROAD)}, {"name": "car", "id": 1, "color": list(CAR)},
        {"name": "sky", "id": 2, "color": list(SKY)},
    ]
    for stem, row in _rows(tmp_path / "multi").items():
        choice = pairs[stem][0]
        assert np.array_equal(_mask(row), np.where(choice == 3, IGNORE_INDEX, choice))

    manifest = write_shards(root, "folder", tmp_path / "road", val_fraction=0.0, classes=["road"])
    assert [c.model_dump() for c in manifest.classes] == [{"name": "road", "id": 1, "color": list(ROAD)}]
    for stem, row in _rows(tmp_path / "road").items():
        choice = pairs[stem][0]
        assert np.array_equal(_mask(row), np.select([choice == 0, choice == 3], [1, IGNORE_INDEX], 0))


def test_folder_unknown_colour_is_an_error_naming_the_mask(tmp_path):
    _, good = palette_mask(0)
    bad = good.copy()
    bad[1, 1] = (1, 2, 3)
    root = folder_dataset(tmp_path, PALETTE_MAP, {"a": good, "b": bad}, rgb=True)
    mask_path = root / "masks" / "b.png"
    with pytest.raises(DataError, match=rf"^{mask_path}: mask colours \[\[1, 2, 3\]\] are not classes of folder"):
        write_shards(root, "folder", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    # no ignore_color: black pixels are unknown too
    no_ignore = {"classes": PALETTE_MAP["classes"]}
    with pytest.raises(DataError, match=r"mask colours \[\[0, 0, 0\]"):
        write_shards(root, "folder", tmp_path / "out", class_map=write_yaml(tmp_path / "plain.yaml", no_ignore))


def test_folder_index_masks_and_class_map_path(tmp_path):
    # Indices need not be 0..C-1: classes are numbered in index order (sky 2 -> 0, road 5 -> 1, car 9 -> 2).
    class_map = {"classes": [{"name": "road", "index": 5}, {"name": "car", "index": 9}, {"name": "sky", "index": 2}], "ignore_index": 0}
    raw = np.random.default_rng(0).choice([0, 2, 5, 9], (H, W))
    root = folder_dataset(tmp_path, class_map, {"x": raw}, rgb=False)
    (root / "classes.yaml").unlink()
    elsewhere = write_yaml(tmp_path / "map.yaml", class_map)
    with pytest.raises(DataError, match="class map not found"):
        write_shards(root, "folder", tmp_path / "out")
    manifest = write_shards(root, "folder", tmp_path / "multi", val_fraction=0.0, class_map=elsewhere)
    assert [(c.name, c.id) for c in manifest.classes] == [("sky", 0), ("road", 1), ("car", 2)]
    lut = {0: IGNORE_INDEX, 2: 0, 5: 1, 9: 2}
    assert np.array_equal(_mask(_rows(tmp_path / "multi")["x"]), np.vectorize(lut.get)(raw))
    manifest = write_shards(root, "folder", tmp_path / "road", val_fraction=0.0, class_map=elsewhere, classes=["road"])
    assert [(c.name, c.id) for c in manifest.classes] == [("road", 1)]
    lut = {0: IGNORE_INDEX, 2: 0, 5: 1, 9: 0}
    assert np.array_equal(_mask(_rows(tmp_path / "road")["x"]), np.vectorize(lut.get)(raw))

    raw[3, 3] = 7
    Image.fromarray(raw.astype(np.uint8), mode="L").save(root / "masks" / "x.png")
    with pytest.raises(DataError, match=rf"^{root / 'masks' / 'x.png'}: mask values \[7\] are not classes of folder"):
        write_shards(root, "folder", tmp_path / "out", class_map=elsewhere)


def test_cli_classes_option(camvid_tree, tmp_path):
    root, _ = camvid_tree
    out = tmp_path / "cli"
    run = run_cli(["data", "shard", root, "--format", "camvid", "--classes", "road", "--out", out], timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote 2 train and 1 val samples" in run.stdout
    assert json.loads((out / "manifest.json").read_text())["classes"] == [{"name": "road", "id": 1, "color": [128, 64, 128]}]


@pytest.fixture
def real_camvid_subset(tmp_path):
    if not (REAL_CAMVID / "train").is_dir():
        pytest.skip(f"{REAL_CAMVID} not present")
    root = tmp_path / "camvid_subset"
    for split, count in (("train", 6), ("val", 3)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for image in sorted((REAL_CAMVID / split).glob("*.jpg"))[:count]:
            os.symlink(image, root / split / image.name)
            os.symlink(REAL_CAMVID / f"{split}annot" / f"{image.stem}.png", root / f"{split}annot" / f"{image.stem}.png")
    return root


@pytest.mark.parametrize("classes, values", [(None, set(range(11))), (["road"], {0, 1})])
def test_real_camvid_subset(real_camvid_subset, tmp_path, classes, values):
    manifest = write_shards(real_camvid_subset, "camvid", tmp_path / "out", classes=classes)
    assert manifest.num_samples == {"train": 6, "val": 3}
    assert manifest.skipped == []
    rows = _rows(tmp_path / "out")
    seen = set()
    for row in rows.values():
        assert (row["width"], row["height"]) == (480, 360)
        mask = _mask(row)
        assert mask.shape == (360, 480)
        seen |= set(np.unique(mask).tolist())
    assert seen <= values | {IGNORE_INDEX}
    if classes:
        assert {0, 1} <= seen and 0.05 < manifest.pixel_frequencies["road"] < 0.6


def test_kitti_lane_target_reads_the_lane_ground_truth(tmp_path):
    root, lanes = kitti_with_lanes(tmp_path)
    road = write_shards(root, "kitti", tmp_path / "road", val_fraction=0.0)
    assert road.num_samples["train"] == 3 and road.class_names == ["road"]

    out = tmp_path / "lane"
    run = run_cli(["data", "shard", root, "--format", "kitti", "--classes", "lane", "--out", out, "--val-fraction", "0"], timeout=120)
    assert run.returncode == 0, run.stderr
    manifest = read_manifest(out)
    assert [c.model_dump() for c in manifest.classes] == [{"name": "lane", "id": 1, "color": [255, 0, 255]}]
    assert set(manifest.pixel_frequencies) == {"background", "lane"}
    rows = _rows(out)
    assert set(rows) == set(lanes)  # umm has no lane ground truth: not a lane sample
    for stem, row in rows.items():
        assert np.array_equal(_mask(row), lanes[stem])

    (root / "training/gt_image_2/um_lane_000001.png").unlink()
    with pytest.raises(DataError, match=rf"^{root / 'training/image_2/um_000001.png'}: image has no mask"):
        write_shards(root, "kitti", tmp_path / "missing", classes=["lane"])
    with pytest.raises(DataError, match="or lane alone"):
        get_format("kitti", ["road", "lane"])


@pytest.mark.parametrize("layout", ["camvid", "folder"])
def test_cli_mask_values_outside_the_class_map_exit_2(camvid_tree, tmp_path, layout):
    if layout == "camvid":
        root, _ = camvid_tree
        bad = root / "valannot" / "0016E5_000030.png"
        annot = np.asarray(Image.open(bad)).copy()
        annot[1, 1] = 12
        Image.fromarray(annot, mode="L").save(bad)
        message = "mask values [12] are not classes of camvid"
    else:
        _, good = palette_mask(0)
        wrong = good.copy()
        wrong[2, 3] = (9, 9, 9)
        root = folder_dataset(tmp_path, PALETTE_MAP, {"a": good, "b": wrong}, rgb=True)
        bad = root / "masks" / "b.png"
        message = "mask colours [[9, 9, 9]] are not classes of folder"
    out = tmp_path / "out"
    # The folder dataset has two samples: after skipping one, no val split can be drawn (an error unless asked for).
    command = ["data", "shard", root, "--format", layout, "--out", out, "--val-fraction", "0"]
    run = run_cli(command, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith(f"raytrain: error: {bad}: {message}") and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    run = run_cli([*command, "--skip-bad"], timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"skipped: {bad}: {message}" in run.stderr
    skipped = read_manifest(out).skipped
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: {message}")


def test_pixel_limit_comes_from_raytrain_max_pixels(tmp_path, monkeypatch):
    from raytrain.data.synthetic import write_synthetic_kitti

    root = write_synthetic_kitti(tmp_path / "raw", 2, seed=0, size=(32, 16))
    monkeypatch.setenv("RAYTRAIN_MAX_PIXELS", "511")
    with pytest.raises(DataError, match=r"um_00000\d.png: image is 32x16, over the limit of 511 pixels \(RAYTRAIN_MAX_PIXELS\)"):
        write_shards(root, "kitti", tmp_path / "out", val_fraction=0.0)
    monkeypatch.setenv("RAYTRAIN_MAX_PIXELS", "512")
    assert write_shards(root, "kitti", tmp_path / "out", val_fraction=0.0).num_samples["train"] == 2
    monkeypatch.setenv("RAYTRAIN_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="RAYTRAIN_MAX_PIXELS='lots': expected a positive number of pixels"):
        write_shards(root, "kitti", tmp_path / "out2", val_fraction=0.0)
