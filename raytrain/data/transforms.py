"""Per-sample transforms on numpy arrays: decode, resize, augment. No Ray here.

Images stay uint8 HWC until they reach the worker's device, where they are scaled and
normalised; that keeps the bytes moved through Ray's object store four times smaller than float32.
Masks are resized with nearest neighbour so class indices (and IGNORE_INDEX) are never blended.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.images import decode_image, decode_mask


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.5
    scale: tuple[float, float] = (0.8, 1.25)
    color_jitter: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    noise: float = 0.0


def resize(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size=(width, height): image bilinear, mask nearest."""
    if image.shape[1::-1] == tuple(size):
        return image, mask
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def random_scale_crop(image, mask, size, scale, rng):
    """Zoom by a random factor, then crop (or pad, mask with IGNORE_INDEX) back to size."""
    width, height = size
    factor = rng.uniform(*scale)
    scaled = (max(1, round(width * factor)), max(1, round(height * factor)))
    image, mask = resize(image, mask, scaled)
    pad_h, pad_w = max(0, height - scaled[1]), max(0, width - scaled[0])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    top = rng.integers(0, image.shape[0] - height + 1)
    left = rng.integers(0, image.shape[1] - width + 1)
    return image[top : top + height, left : left + width], mask[top : top + height, left : left + width]


def color_jitter(image: np.ndarray, strength: float, rng) -> np.ndarray:
    """Random brightness, then saturation, then contrast, each by a factor in [1 - s, 1 + s].

    All three are linear, so they fold into one pass over the pixels: out = a*pixel + b*gray + c
    (gray: the pixel's channel mean; the image mean is unchanged by saturation).
    """
    brightness, contrast, saturation = (float(f) for f in rng.uniform(1 - strength, 1 + strength, size=3))
    pixels = image.astype(np.float32)
    gray = pixels.mean(axis=2, keepdims=True)
    gray *= contrast * brightness * (1 - saturation)
    gray += (1 - contrast) * brightness * float(pixels.mean())
    pixels *= contrast * brightness * saturation
    pixels += gray
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation sigma in pixels (PIL's radius is the deviation)."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def gaussian_noise(image: np.ndarray, strength: float, rng) -> np.ndarray:
    """Additive sensor noise: per-pixel, per-channel normal noise whose deviation is drawn in
    [0, strength] x 255 for this image."""
    deviation = float(rng.uniform(0, strength)) * 255
    pixels = image.astype(np.float32)
    pixels += rng.normal(0, deviation, size=image.shape).astype(np.float32)
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def transform_sample(image_bytes, mask_bytes, size, augment: Augment | None, rng):
    image, mask = decode_image(image_bytes), decode_mask(mask_bytes)
    image, mask = resize(image, mask, size)
    if augment is not None:
        if augment.scale != (1.0, 1.0):
            image, mask = random_scale_crop(image, mask, size, augment.scale, rng)
        if rng.random() < augment.hflip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if augment.color_jitter > 0:
            image = color_jitter(image, augment.color_jitter, rng)
        # Drawn only when switched on, so configs without them keep their random streams.
        if augment.blur > 0 and rng.random() < augment.blur:
            image = gaussian_blur(image, float(rng.uniform(*augment.blur_sigma)))
        if augment.noise > 0:
            image = gaussian_noise(image, augment.noise, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def sample_rng(seed: int, epoch: int, sample_id) -> np.random.Generator:
    """The random stream of one sample in one epoch: the same whichever task or batch it lands in."""
    key = sample_id if isinstance(sample_id, bytes) else str(sample_id).encode()
    # SeedSequence takes non-negative integers only; the modulus keeps negative seeds distinct.
    return np.random.default_rng([seed % 2**64, epoch, zlib.crc32(key)])


def transform_batch(
    batch: dict[str, np.ndarray], size, augment: Augment | None = None, *, seed: int | None = None, epoch: int = 0
) -> dict[str, np.ndarray]:
    """A batch of encoded rows -> {"id", "image": (N, H, W, 3) uint8, "mask": (N, H, W) uint8}.

    With a seed, each sample is augmented from sample_rng(seed, epoch, its id), so a run can be
    repeated; without one, from fresh OS entropy.
    """
    if augment is None or seed is None:
        rngs = itertools.repeat(np.random.default_rng())
    else:
        rngs = (sample_rng(seed, epoch, i) for i in batch["id"])
    pairs = [transform_sample(i, m, size, augment, r) for i, m, r in zip(batch["image"], batch["mask"], rngs)]
    return {
        "id": batch["id"],
        "image": np.stack([image for image, _ in pairs]),
        "mask": np.stack([mask for _, mask in pairs]),
    }
