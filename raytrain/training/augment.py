"""Training augmentation on the worker's device, a whole batch at a time, in plain torch.

Each sample's random parameters are drawn on the host from (seed, epoch, sample id), when the batch
is collated (`draw_params`), so a seeded run repeats exactly wherever the pixels are computed;
`augment_batch` then applies them on the device: one warp per sample for zoom, crop or pad and
flip (bilinear for images, nearest for masks so class indices and IGNORE_INDEX are never blended),
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


def augment_batch(images: torch.Tensor, masks: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 (N, H, W, 3) and masks uint8 (N, H, W) on the training device; params (N, PARAMS)
    float64 on the host, where every choice is made, so no step waits for the device.
    Returns float (N, 3, H, W) images in [0, 255] (channels-last in memory) and uint8 masks."""
    images, masks = warp(images, masks, params)
    images = images.permute(0, 3, 1, 2)
    images = color_jitter(images, params[:, BRIGHTNESS], params[:, CONTRAST], params[:, SATURATION])
    images = gaussian_blur(images, params[:, BLUR_SIGMA])
    return gaussian_noise(images, params[:, NOISE_STD], params[:, NOISE_SEED]), masks


def on_device(values: torch.Tensor, like: torch.Tensor, shape=(-1, 1, 1, 1)) -> torch.Tensor:
    return values.to(like.dtype).view(shape).to(like.device, non_blocking=True)


def warp(images, masks, params):
    """Zoom each sample by its factor, pad (image 0, mask IGNORE_INDEX) to at least the training size
    at the right and bottom, crop at (top, left), then flip: uint8 (N, H, W, 3) in, float out.

    Zoom, crop and flip are axis-aligned, so the warp is separable: each output row, then column,
    reads its source position from host-made tables (`axis_lookup`), bilinear for images and nearest
    for masks. Rows are gathered while still uint8, the cheapest place. A pure crop, pad or flip
    reads whole pixels: it is exact.
    """
    zoom, flip = params[:, ZOOM], params[:, FLIP] > 0
    if bool((zoom == 1).all()) and not bool(flip.any()):
        return images.float(), masks
    height, width = images.shape[1:3]
    columns = axis_lookup(width, zoom, params[:, LEFT], flip, images.device)
    rows = axis_lookup(height, zoom, params[:, TOP], torch.zeros_like(flip), images.device)
    warped_images, warped_masks = [], []
    for i in range(len(images)):
        image = images[i]
        top = image.index_select(0, rows.low[i]).float()
        image = top.lerp_(image.index_select(0, rows.high[i]).float(), rows.weight[i].view(-1, 1, 1))
        left = image.index_select(1, columns.low[i])
        image = left.lerp_(image.index_select(1, columns.high[i]), columns.weight[i].view(1, -1, 1))
        inside = rows.inside[i][:, None] & columns.inside[i][None, :]
        warped_images.append(image.mul_(inside[:, :, None]))
        mask = masks[i].index_select(0, rows.nearest[i]).index_select(1, columns.nearest[i])
        warped_masks.append(mask.masked_fill_(~inside, IGNORE_INDEX))
    return torch.stack(warped_images), torch.stack(warped_masks)


@dataclass
class AxisLookup:
    """For each sample and output position along one axis: the two source pixels, the weight of the
    second, the nearest source pixel, and whether the position is inside the zoomed image."""

    low: torch.Tensor
    high: torch.Tensor
    weight: torch.Tensor
    nearest: torch.Tensor
    inside: torch.Tensor


def axis_lookup(length: int, zoom, offset, flip, device) -> AxisLookup:
    """Output position c reads canvas position c' + offset, where c' is c or its mirror; a canvas
    position's centre sits at (c' + offset + 0.5) / s - 0.5 of the source, s = scaled / length, as
    resizing with pixel centres aligned puts it (PIL's, torch's align_corners=False)."""
    scaled = torch.clamp(torch.round(length * zoom), min=1)[:, None]
    positions = torch.arange(length, dtype=torch.float64).expand(len(zoom), length)
    canvas = torch.where(flip[:, None], length - 1 - positions, positions) + offset[:, None]
    centre = (canvas + 0.5) * (length / scaled)
    source = (centre - 0.5).clamp(0, length - 1)
    low = source.floor()
    tables = AxisLookup(
        low=low.long(), high=(low + 1).clamp(max=length - 1).long(), weight=(source - low).float(),
        nearest=centre.floor().clamp(0, length - 1).long(), inside=canvas < scaled,
    )
    return AxisLookup(*(table.to(device, non_blocking=True) for table in vars(tables).values()))


def color_jitter(images, brightness, contrast, saturation):
    """Brightness, then saturation, then contrast, folded into one pass: out = a*pixel + b*gray + c,
    where gray is the pixel's channel mean and c carries the image mean (which saturation keeps).
    In place: `images` is the warp's fresh output."""
    if bool((brightness == 1).all() and (contrast == 1).all() and (saturation == 1).all()):
        return images
    offset = images.mean(dim=1, keepdim=True).mul_(on_device(contrast * brightness * (1 - saturation), images))
    offset += on_device((1 - contrast) * brightness, images) * images.mean(dim=(1, 2, 3), keepdim=True)
    return images.mul_(on_device(contrast * brightness * saturation, images)).add_(offset).clamp_(0, 255)


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
    images = images.clone()
    images[chosen.to(images.device)] = flat.reshape(n, channels, height, width)
    return images


def gaussian_noise(images, deviations, seeds):
    """Add per-pixel, per-channel normal noise of each sample's deviation, from a generator seeded
    with the sample's own seed: the same noise for the same parameters, on any device of one kind."""
    chosen = torch.nonzero(deviations > 0).flatten().tolist()
    if not chosen:
        return images
    images = images.clone()
    for i in chosen:
        generator = torch.Generator(device=images.device).manual_seed(int(seeds[i]))
        noise = torch.randn(images.shape[1:], generator=generator, device=images.device, dtype=images.dtype)
        images[i] = (images[i] + noise * float(deviations[i])).clamp_(0, 255)
    return images


def augment_of(data) -> Augment | None:
    """The training augmentation a config's data section asks for; None when data.augment is off."""
    if not data.augment:
        return None
    return Augment(data.hflip, tuple(data.scale), data.color_jitter, data.blur, tuple(data.blur_sigma), data.noise)
