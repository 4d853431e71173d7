"""Training augmentation on the worker's device, a whole batch at a time, in plain torch.

Each sample's random parameters are drawn on the host from (seed, epoch, sample id), when the batch
is collated (`draw_params`), so a seeded run repeats exactly wherever the pixels are computed;
`augment_batch` then applies them on the device: one resize, crop or pad and flip per sample
(bilinear for images, nearest for masks so class indices and IGNORE_INDEX are never blended),
then colour jitter, blur and noise. Why by hand and not kornia: docs/decisions.md.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raytrain.data.formats import IGNORE_INDEX


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.5
    scale: tuple[float, float] = (0.8, 1.25)
    color_jitter: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    noise: float = 0.0


# The columns of a batch's parameter tensor, one row per sample.
ZOOM, TOP, LEFT, FLIP, BRIGHTNESS, CONTRAST, SATURATION, BLUR_SIGMA, NOISE_STD, NOISE_SEED = range(10)
PARAMS = 10


def sample_rng(seed: int, epoch: int, sample_id) -> np.random.Generator:
    """The random stream of one sample in one epoch: the same whichever worker or batch it lands in."""
    key = sample_id if isinstance(sample_id, bytes) else str(sample_id).encode()
    # SeedSequence takes non-negative integers only; the modulus keeps negative seeds distinct.
    return np.random.default_rng([seed % 2**64, epoch, zlib.crc32(key)])


def draw_params(augment: Augment, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One sample's parameters (a row of PARAMS floats) for a training size (width, height)."""
    width, height = size
    row = np.zeros(PARAMS)
    row[[ZOOM, BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    if augment.scale != (1.0, 1.0):
        zoom = rng.uniform(*augment.scale)
        scaled_w, scaled_h = scaled_size(size, zoom)
        row[ZOOM] = zoom
        row[TOP] = rng.integers(0, max(scaled_h, height) - height + 1)
        row[LEFT] = rng.integers(0, max(scaled_w, width) - width + 1)
    row[FLIP] = rng.random() < augment.hflip
    if augment.color_jitter > 0:
        row[[BRIGHTNESS, CONTRAST, SATURATION]] = rng.uniform(1 - augment.color_jitter, 1 + augment.color_jitter, 3)
    # Drawn only when switched on, so configs without them keep their random streams.
    if augment.blur > 0 and rng.random() < augment.blur:
        row[BLUR_SIGMA] = rng.uniform(*augment.blur_sigma)
    if augment.noise > 0:
        row[NOISE_STD] = rng.uniform(0, augment.noise) * 255
        row[NOISE_SEED] = rng.integers(0, 2**31)
    return row


def batch_params(augment: Augment, size, ids, *, seed: int | None, epoch: int) -> np.ndarray:
    """(N, PARAMS): with a seed, each row from sample_rng(seed, epoch, its id); without, from fresh entropy."""
    fresh = np.random.default_rng()
    return np.stack([draw_params(augment, size, sample_rng(seed, epoch, i) if seed is not None else fresh) for i in ids])


def scaled_size(size: tuple[int, int], zoom: float) -> tuple[int, int]:
    return max(1, round(size[0] * zoom)), max(1, round(size[1] * zoom))


class AugmentBuffers:
    """augment_batch's output tensors, written again by the next batch of the same shape: on the
    CPU, a new tensor the size of a batch is fresh pages, which the kernel zero-fills on first touch."""

    def __init__(self):
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None

    def take(self, images_shape: tuple[int, ...], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is None or tuple(self.images.shape) != images_shape or self.images.device != masks.device:
            self.images = torch.empty(images_shape, dtype=torch.float32, device=masks.device)
            self.masks = torch.empty_like(masks)
        return self.images, self.masks


def augment_batch(images: torch.Tensor, masks: torch.Tensor, params: torch.Tensor,
                  buffers: AugmentBuffers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 (N, H, W, 3) and masks uint8 (N, H, W) on the training device; params (N, PARAMS)
    float64 on the host, where every choice is made, so no step waits for the device.
    Returns float (N, 3, H, W) images in [0, 255], one plane per channel, and uint8 masks: new
    tensors, or with `buffers` theirs, which the next call with them overwrites.

    The warp and jitter run one sample at a time, each on its own slice of the output: the sample's
    planes are still in the CPU's cache when the jitter reads them."""
    n, height, width = masks.shape
    out, out_masks = (buffers or AugmentBuffers()).take((n, 3, height, width), masks)
    for i, row in enumerate(params.tolist()):
        warp(images[i], masks[i], row, out[i], out_masks[i])
        color_jitter(out[i], row[BRIGHTNESS], row[CONTRAST], row[SATURATION])
    out = gaussian_blur(out, params[:, BLUR_SIGMA])
    return gaussian_noise(out, params[:, NOISE_STD], params[:, NOISE_SEED]), out_masks


def warp(image, mask, row: list[float], out_image, out_mask) -> None:
    """One sample: zoom by its factor, pad (image 0, mask IGNORE_INDEX) to at least the training size
    at the right and bottom, crop at (top, left), then flip; uint8 (H, W, 3) and (H, W) in, written
    into out_image, float (3, H, W), and out_mask.

    The zoom is a resize with pixel centres aligned (torch's align_corners=False, as PIL's): bilinear
    for images, nearest-exact for masks. On the CPU it resizes uint8, torch's fastest path; other
    devices resize float, as torch's bilinear takes no uint8 there. A pure crop, pad or flip copies
    whole pixels: it is exact.
    """
    height, width = mask.shape
    image, mask = image.permute(2, 0, 1)[None], mask[None, None]
    scaled_w, scaled_h = scaled_size((width, height), row[ZOOM])
    if (scaled_w, scaled_h) != (width, height):
        source = image if image.device.type == "cpu" else image.float()
        image = F.interpolate(source, size=(scaled_h, scaled_w), mode="bilinear", align_corners=False)
        mask = F.interpolate(mask, size=(scaled_h, scaled_w), mode="nearest-exact")
    top, left = int(row[TOP]), int(row[LEFT])
    image, mask = image[0, :, top : top + height, left : left + width], mask[0, 0, top : top + height, left : left + width]
    rows, cols = mask.shape
    inside, outside = slice(0, cols), slice(cols, width)
    if row[FLIP]:  # the canvas's padding is at the right before the flip, so at the left after it
        image, mask = image.flip(2), mask.flip(1)
        inside, outside = slice(width - cols, width), slice(0, width - cols)
    out_image[:, :rows, inside] = image
    out_image[:, :rows, outside] = 0
    out_image[:, rows:] = 0
    out_mask[:rows, inside] = mask
    out_mask[:rows, outside] = IGNORE_INDEX
    out_mask[rows:] = IGNORE_INDEX


def color_jitter(image, brightness: float, contrast: float, saturation: float) -> None:
    """Brightness, then saturation, then contrast, folded into one pass over a float (3, H, W) image,
    in place: out = a*pixel + b*gray + c, where gray is the pixel's channel mean and c carries the
    image mean (which saturation keeps). The mean stays on the device: nothing waits for it."""
    if brightness == contrast == saturation == 1:
        return
    offset = image.sum(dim=0)  # three times the gray
    image_mean = offset.mean() / 3
    offset.mul_(contrast * brightness * (1 - saturation) / 3).add_(image_mean * ((1 - contrast) * brightness))
    torch.add(offset, image, alpha=contrast * brightness * saturation, out=image).clamp_(0, 255)


def gaussian_kernels(sigmas: torch.Tensor, radius: int, dtype) -> torch.Tensor:
    """(len(sigmas), 2 * radius + 1) normalised 1-D Gaussian kernels."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float64)
    kernels = torch.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
    return (kernels / kernels.sum(dim=1, keepdim=True)).to(dtype)


def gaussian_blur(images, sigmas):
    """Blur the samples whose sigma is above 0, each with its own sigma (pixels), separably, with
    reflected borders; the kernel reaches 3 sigma of the batch's largest."""
    chosen = torch.nonzero(sigmas > 0).flatten()
    if len(chosen) == 0:
        return images
    picked = images[chosen.to(images.device)]
    n, channels, height, width = picked.shape
    radius = min(math.ceil(3 * float(sigmas[chosen].max())), height - 1, width - 1)
    kernels = gaussian_kernels(sigmas[chosen], radius, images.dtype).repeat_interleave(channels, dim=0)
    kernels = kernels.to(images.device, non_blocking=True)
    flat = picked.reshape(1, n * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None], groups=n * channels)
    images[chosen.to(images.device)] = flat.reshape(n, channels, height, width)  # in place: augment_batch's own buffer
    return images


def gaussian_noise(images, deviations, seeds):
    """Add per-pixel, per-channel normal noise of each sample's deviation, from a generator seeded
    with the sample's own seed: the same noise for the same parameters, on any device of one kind."""
    chosen = torch.nonzero(deviations > 0).flatten().tolist()
    if not chosen:
        return images
    for i in chosen:  # in place: augment_batch's own buffer
        generator = torch.Generator(device=images.device).manual_seed(int(seeds[i]))
        noise = torch.randn(images.shape[1:], generator=generator, device=images.device, dtype=images.dtype)
        images[i] = (images[i] + noise * float(deviations[i])).clamp_(0, 255)
    return images


def augment_of(data) -> Augment | None:
    """The training augmentation a config's data section asks for; None when data.augment is off."""
    if not data.augment:
        return None
    return Augment(data.hflip, tuple(data.scale), data.color_jitter, data.blur, tuple(data.blur_sigma), data.noise)
