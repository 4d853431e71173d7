"""What every model takes: uint8 RGB images, scaled and normalised on their device. Predict and
every exported file go through `to_model_input`, training through `normalise` after its device-side
augmentation, so all of them see the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ImageNet statistics: what pretrained encoders expect, and a sane scale for scratch models too.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_model_input(images, device=None, size: tuple[int, int] | None = None):
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) on `device` (None: where it is), resized
    to size (width, height) if given. predict and every exported model resize here: bilinear,
    antialiased when shrinking as PIL's resize of the training images is."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    images = images.permute(0, 3, 1, 2).float()
    if size is not None:
        images = F.interpolate(images, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    return normalise(images)


def normalise(images):
    """float (N, 3, H, W) in [0, 255] -> the model's input: scaled to [0, 1], then ImageNet-normalised."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, images, 1 / (255 * std))  # (x / 255 - mean) / std in one pass
