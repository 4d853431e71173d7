"""Dataset formats on disk -> samples (image path, class-index mask).

Every reader turns its format's ground truth into one convention: a uint8 mask holding the class
index of each pixel, with IGNORE_INDEX where the label is unknown (outside KITTI's valid area,
CamVid's void). Shards, the pipeline, losses and metrics only ever see that convention.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from raytrain.errors import DataError

IGNORE_INDEX = 255

# KITTI road ground truth colours: blue > 0 marks road, red == 0 marks pixels outside the valid area.
KITTI_ROAD_RGB = (255, 0, 255)
KITTI_NON_ROAD_RGB = (255, 0, 0)
KITTI_INVALID_RGB = (0, 0, 0)


def encode_kitti_gt(road: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Boolean road mask (H, W) -> KITTI ground-truth RGB image (H, W, 3) uint8."""
    road = np.asarray(road, dtype=bool)
    rgb = np.empty(road.shape + (3,), dtype=np.uint8)
    rgb[...] = KITTI_NON_ROAD_RGB
    rgb[road] = KITTI_ROAD_RGB
    if valid is not None:
        rgb[~np.asarray(valid, dtype=bool)] = KITTI_INVALID_RGB
    return rgb


def decode_kitti_gt(rgb: np.ndarray) -> np.ndarray:
    """KITTI ground-truth RGB (H, W, 3) -> uint8 labels: 1 road, 0 not road, IGNORE_INDEX invalid."""
    rgb = np.asarray(rgb)
    labels = (rgb[..., 2] > 0).astype(np.uint8)
    labels[rgb[..., 0] == 0] = IGNORE_INDEX
    return labels


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth, as found on disk."""

    id: str
    image_path: Path
    mask_path: Path | None
    split: str | None = None  # the dataset's own split, when it has one


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    list_samples: Callable[[Path], list[Sample]]
    load_mask: Callable[[Path], np.ndarray]  # -> uint8 class indices, IGNORE_INDEX where unknown


def _list_kitti(root: Path) -> list[Sample]:
    image_dir, gt_dir = root / "training" / "image_2", root / "training" / "gt_image_2"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: not found (KITTI layout: training/image_2 and training/gt_image_2)")
    samples = []
    for image_path in sorted(image_dir.glob("*.png")):
        # um_000000.png -> gt_image_2/um_road_000000.png
        category, _, number = image_path.stem.rpartition("_")
        mask_path = gt_dir / f"{category}_road_{number}.png"
        samples.append(Sample(image_path.stem, image_path, mask_path if mask_path.exists() else None))
    return samples


def _load_kitti_mask(path: Path) -> np.ndarray:
    with Image.open(path) as gt:
        return decode_kitti_gt(np.asarray(gt.convert("RGB")))


FORMATS: dict[str, DatasetFormat] = {
    "kitti": DatasetFormat("kitti", ("road",), (KITTI_ROAD_RGB,), _list_kitti, _load_kitti_mask),
}


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise DataError(f"unknown dataset format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]
