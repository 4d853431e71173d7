"""Overlays paint exactly the predicted pixels; the TensorBoard logger writes files TensorBoard reads."""
from __future__ import annotations

import numpy as np
import pytest

from raytrain.data.formats import CAMVID_CLASSES, CAMVID_COLORS, IGNORE_INDEX
from raytrain.viz import GRID_GAP, TensorBoardLogger, mask_overlay, overlay, overlay_grid, palette
from tests.helpers import read_events


def _image(rng, height=12, width=20):
    # values below 200: no pixel of the image itself is pure red
    return rng.integers(0, 200, size=(height, width, 3), dtype=np.uint8)


def _red(array):
    return np.all(array == (255, 0, 0), axis=-1)


@pytest.mark.parametrize("with_channel", [False, True])
def test_binary_overlay_is_red_exactly_where_probability_exceeds_half(with_channel):
    rng = np.random.default_rng(0)
    image = _image(rng)
    probabilities = rng.random((12, 20)).astype(np.float32)
    probabilities[0, :4] = 0.5  # exactly 0.5 is not road
    result = overlay(image, probabilities[None] if with_channel else probabilities, ["road"])

    assert result.dtype == np.uint8 and result.shape == image.shape
    np.testing.assert_array_equal(_red(result), probabilities > 0.5)
    np.testing.assert_array_equal(result[probabilities <= 0.5], image[probabilities <= 0.5])


def test_ground_truth_overlay_leaves_ignored_pixels_as_they_are():
    rng = np.random.default_rng(1)
    image = _image(rng)
    mask = rng.integers(0, 2, size=(12, 20)).astype(np.uint8)
    mask[:3] = IGNORE_INDEX
    result = mask_overlay(image, mask, ["road"])

    np.testing.assert_array_equal(_red(result), mask == 1)
    np.testing.assert_array_equal(result[mask != 1], image[mask != 1])


def test_multiclass_overlay_blends_the_argmax_class_colour():
    classes = list(CAMVID_CLASSES[:3])
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 2, 0, 1, 2]] * 4)
    probabilities = np.eye(3, dtype=np.float32)[labels].transpose(2, 0, 1)  # one-hot (C, H, W)
    result = overlay(image, probabilities, classes)

    expected = 0.5 * 100 + 0.5 * np.array(CAMVID_COLORS[:3], dtype=np.float32)[labels]
    np.testing.assert_allclose(result, expected, atol=1)  # within a unit: rounding is torchvision's
    # the ground truth of the same labels looks the same; an ignored pixel keeps the image
    mask = labels.astype(np.uint8)
    mask[0, 0] = IGNORE_INDEX
    truth = mask_overlay(image, mask, classes)
    np.testing.assert_array_equal(truth[1:], result[1:])
    np.testing.assert_array_equal(truth[0, 0], image[0, 0])


def test_palette_uses_camvid_colours_by_name_and_a_fixed_fallback():
    assert [tuple(c) for c in palette(["road"])] == [(255, 0, 0)]  # binary: red, whatever the name
    assert [tuple(c) for c in palette(["lane"])] == [(255, 0, 0)]
    colours = palette(["road", "my_class", "sky"])
    assert tuple(colours[0]) == CAMVID_COLORS[CAMVID_CLASSES.index("road")]
    assert tuple(colours[2]) == CAMVID_COLORS[CAMVID_CLASSES.index("sky")]
    assert len({tuple(c) for c in palette([f"c{i}" for i in range(10)])}) == 10


def test_overlay_grid_puts_prediction_beside_ground_truth():
    rng = np.random.default_rng(2)
    images = np.stack([_image(rng) for _ in range(3)])
    masks = rng.integers(0, 2, size=(3, 12, 20)).astype(np.uint8)
    probabilities = rng.random((3, 1, 12, 20)).astype(np.float32)
    grid = overlay_grid(images, masks, probabilities, ["road"])

    assert grid.shape == (3 * 12 + 2 * GRID_GAP, 2 * 20 + GRID_GAP, 3)
    second_row = grid[12 + GRID_GAP : 2 * 12 + GRID_GAP]
    np.testing.assert_array_equal(_red(second_row[:, :20]), probabilities[1, 0] > 0.5)
    np.testing.assert_array_equal(_red(second_row[:, 20 + GRID_GAP :]), masks[1] == 1)


def _write_two_epochs(log_dir):
    rng = np.random.default_rng(3)
    images = np.stack([_image(rng) for _ in range(2)])
    masks = rng.integers(0, 2, size=(2, 12, 20)).astype(np.uint8)
    logger = TensorBoardLogger(str(log_dir), ["road"])
    for epoch in (1, 2):
        report = {
            "epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 0.8 / epoch, "val_f1": 0.5 + 0.1 * epoch,
            "val_iou_road": None, "val_ap": float("nan"), "lr": 1e-3, "images_per_s": 10.0,
        }
        logger.log_epoch(epoch, report, images, masks, rng.random((2, 1, 12, 20)).astype(np.float32))
    logger.close()


def _check_event_files(log_dir):
    train, val = read_events(log_dir / "train"), read_events(log_dir / "val")
    assert set(train.Tags()["scalars"]) == {"loss", "lr", "images_per_s"}
    assert set(val.Tags()["scalars"]) == {"loss", "f1"}  # None and NaN are skipped
    assert [(e.step, round(e.value, 6)) for e in train.Scalars("loss")] == [(1, 1.0), (2, 0.5)]
    assert [(e.step, round(e.value, 6)) for e in val.Scalars("loss")] == [(1, 0.8), (2, 0.4)]
    images = val.Images("val/overlay")
    assert [e.step for e in images] == [1, 2]
    assert (images[0].width, images[0].height) == (2 * 20 + GRID_GAP, 2 * 12 + GRID_GAP)
    assert train.Tags()["images"] == []


def test_logger_writes_train_and_val_runs_that_tensorboard_reads(tmp_path):
    _write_two_epochs(tmp_path / "tb")
    _check_event_files(tmp_path / "tb")


def test_logger_copies_event_files_to_a_uri(tmp_path):
    _write_two_epochs(f"file://{tmp_path}/remote/tb")
    _check_event_files(tmp_path / "remote" / "tb")
