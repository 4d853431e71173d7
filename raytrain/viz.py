"""What the model sees: prediction overlays, overlay grids and TensorBoard logging. No Ray here.

Drawing is torchvision's (draw_segmentation_masks, make_grid), with one palette for every task:
palette(classes). Binary road: every pixel whose road probability is > 0.5 (metrics.to_labels) is painted pure
red (255, 0, 0), opaque, so the overlay shows exactly the pixels counted as road by the metrics.
Multi-class: the argmax class of every pixel is blended with its palette colour (CamVid's own
colours for CamVid class names). Ground truth is drawn the same way; IGNORE_INDEX pixels are left
as the image has them.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.utils import draw_segmentation_masks, make_grid

from raytrain.data.formats import CAMVID_CLASSES, CAMVID_COLORS
from raytrain.metrics import to_labels
from raytrain.storage.paths import is_uri

ROAD_RGB = (255, 0, 0)  # the one class of a binary task, whatever its name
BLEND = 0.5  # weight of the class colour in a multi-class overlay
GRID_GAP = 2  # white pixels between the tiles of an overlay grid
# matplotlib's tab20, for class names that have no CamVid colour
FALLBACK_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
)


def palette(classes: Sequence[str]) -> np.ndarray:
    """(C, 3) uint8, one colour per class: red for a binary task's one class; otherwise CamVid's colour
    for a CamVid class name, else a fixed colour by index."""
    if len(classes) == 1:
        return np.array([ROAD_RGB], dtype=np.uint8)
    camvid = dict(zip(CAMVID_CLASSES, CAMVID_COLORS))
    colours = [camvid.get(name, FALLBACK_PALETTE[i % len(FALLBACK_PALETTE)]) for i, name in enumerate(classes)]
    return np.array(colours, dtype=np.uint8)


def _paint(image: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Binary: label 1 in the palette's red, opaque. Multi-class: each label blended with its colour.
    Other labels (0 when binary, IGNORE_INDEX) untouched."""
    image = np.array(image, dtype=np.uint8)  # a copy: torch warns on read-only arrays (decoded images)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    binary = len(classes) == 1
    # Opaque for binary: the red pixels are exactly the road pixels, whatever the image has there.
    values, alpha = ((1,), 1.0) if binary else (range(len(classes)), BLEND)
    masks = torch.from_numpy(np.stack([labels == value for value in values]))
    colours = [tuple(int(v) for v in colour) for colour in palette(classes)]
    painted = draw_segmentation_masks(torch.from_numpy(image).permute(2, 0, 1), masks, alpha=alpha, colors=colours)
    return np.ascontiguousarray(painted.permute(1, 2, 0).numpy())


def overlay(image: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """The prediction painted on an RGB image (H, W, 3) uint8.

    probabilities: (H, W) or (1, H, W) road probabilities, or (C, H, W) class probabilities.
    """
    probabilities = np.asarray(probabilities)
    if len(classes) == 1:
        road = probabilities[0] if probabilities.ndim == 3 else probabilities
        return _paint(image, to_labels(road[None]), classes)
    if probabilities.ndim != 3 or probabilities.shape[0] != len(classes):
        raise ValueError(f"expected ({len(classes)}, H, W) probabilities, got {probabilities.shape}")
    return _paint(image, to_labels(probabilities), classes)


def mask_overlay(image: np.ndarray, mask: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """The ground truth (H, W) class indices painted like `overlay`; IGNORE_INDEX left as is."""
    return _paint(image, np.asarray(mask).astype(np.int64), classes)


def overlay_grid(images, masks, probabilities, classes: Sequence[str], gap: int = GRID_GAP) -> np.ndarray:
    """One row per image: [prediction overlay | ground-truth overlay], white gaps between tiles.

    images (N, H, W, 3) uint8, masks (N, H, W), probabilities (N, C, H, W) -> (N*H + (N-1)*gap, 2*W + gap, 3).
    """
    tiles = []
    for image, mask, probs in zip(images, masks, probabilities, strict=True):
        tiles += [overlay(image, probs, classes), mask_overlay(image, mask, classes)]
    if not tiles:
        raise ValueError("overlay_grid needs at least one image")
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    grid = make_grid(batch, nrow=2, padding=gap, pad_value=255)
    # make_grid also pads the outer border; only the gaps between tiles are kept
    return np.ascontiguousarray(grid[:, gap : grid.shape[1] - gap, gap : grid.shape[2] - gap].permute(1, 2, 0).numpy())


def _run_and_tag(key: str) -> tuple[str, str] | None:
    """A reported metric -> (TensorBoard run, tag): train_loss and val_loss both become "loss".

    val_* goes to the val run; everything else (train_*, lr, images_per_s, ...) to the train run.
    """
    if key == "epoch":
        return None  # the step, not a curve
    if key.startswith("val_"):
        return "val", key[len("val_"):]
    return "train", key.removeprefix("train_")


class TensorBoardLogger:
    """Writes one training run's metrics and overlays as TensorBoard event files.

    Train and val go to the runs `log_dir/train` and `log_dir/val` under the same tag names, so
    TensorBoard draws train and val loss on one chart. A URI log_dir (s3://, file://, ...) is
    written locally and copied there with pyarrow.fs after every epoch.
    """

    def __init__(self, log_dir: str, classes: list[str]):
        from torch.utils.tensorboard import SummaryWriter

        self.classes = list(classes)
        self.remote = log_dir if is_uri(log_dir) else None
        self._local = Path(tempfile.mkdtemp(prefix="raytrain-tb-")) if self.remote else Path(log_dir)
        self.writers = {run: SummaryWriter(str(self._local / run)) for run in ("train", "val")}

    def log_epoch(self, epoch: int, report: dict, images=None, masks=None, probabilities=None) -> None:
        for key, value in report.items():
            run_and_tag = _run_and_tag(key)
            if run_and_tag is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isnan(value):
                continue
            run, tag = run_and_tag
            self.writers[run].add_scalar(tag, value, epoch)
        if images is not None and len(images):
            grid = overlay_grid(images, masks, probabilities, self.classes)
            self.writers["val"].add_image("val/overlay", grid, epoch, dataformats="HWC")
        for writer in self.writers.values():
            writer.flush()
        if self.remote:
            self._upload()

    def _upload(self) -> None:
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(self.remote)
        filesystem.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(
            str(self._local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem
        )

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)
