"""Per-sample decode and resize to the training size, on numpy arrays: all a Ray Data task does to
an image. Augmentation happens later, batched on the training device (training/augment.py).

Images stay uint8 HWC until they reach the worker's device; that keeps the bytes moved through
Ray's object store (and held in its decoded cache) four times smaller than float32.
Masks are resized with nearest neighbour so class indices (and IGNORE_INDEX) are never blended.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from raytrain.data.images import read_labels, read_rgb


def resize(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size=(width, height): image bilinear, mask nearest."""
    if image.shape[1::-1] == tuple(size):
        return image, mask
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def decode_sample(image_bytes: bytes, mask_bytes: bytes, size: tuple[int, int], row: str = "shard row") -> tuple[np.ndarray, np.ndarray]:
    """One shard row's image and mask, decoded (data.images: within the pixel limit) and resized;
    `row` names it in errors."""
    image, mask = resize(read_rgb(bytes(image_bytes), row), read_labels(bytes(mask_bytes), row), size)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def row_name(dataset: str, sample_id) -> str:
    """How errors name a shard row: its dataset (or shard file) and its sample id."""
    return f"{dataset}: sample {str(sample_id)!r}" if dataset else f"sample {str(sample_id)!r}"


def decode_batch(batch: dict[str, np.ndarray], size, dataset: str = "") -> dict[str, np.ndarray]:
    """A batch of encoded rows of `dataset` -> {"id", "image": (N, H, W, 3) uint8, "mask": (N, H, W) uint8}."""
    pairs = [decode_sample(image, mask, size, row_name(dataset, sample_id))
             for sample_id, image, mask in zip(batch["id"], batch["image"], batch["mask"])]
    return {
        "id": batch["id"],
        "image": np.stack([image for image, _ in pairs]),
        "mask": np.stack([mask for _, mask in pairs]),
    }
