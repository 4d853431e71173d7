"""A trained module as a whole-image model: uint8 RGB images (N, H, W, 3) of any size in, class
probabilities (N, C, H, W) at that size out. predict runs these steps, and every export format
traces them, so an exported file needs nothing from raytrain and gives predict's numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain.errors import RaytrainError
from raytrain.inference import TTA_CHOICES
from raytrain.models import to_model_input, to_probabilities


def check_tta(tta: str | None) -> str | None:
    if tta is not None and tta not in TTA_CHOICES:
        raise RaytrainError(f"tta must be None or one of {', '.join(TTA_CHOICES)}, not {tta!r}")
    return tta


def class_probabilities(module: torch.nn.Module, inputs: torch.Tensor, tta: str | None = None) -> torch.Tensor:
    """Probabilities (N, C, h, w) for normalised inputs (N, 3, h, w); with tta="flip", the mean of
    the inputs' and their mirror images' (each mirrored back)."""
    probabilities = to_probabilities(module(inputs))
    if tta == "flip":
        mirrored = to_probabilities(module(inputs.flip(-1))).flip(-1)
        probabilities = (probabilities + mirrored) / 2
    return probabilities


def to_image_size(probabilities: torch.Tensor, height, width) -> torch.Tensor:
    return F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)


class ImageModel(torch.nn.Module):
    """module, resized in and out: the inputs go to the training size `size` (width, height) and
    the probabilities back to each batch's own size."""

    def __init__(self, module: torch.nn.Module, size: tuple[int, int], tta: str | None = None):
        super().__init__()
        self.module, self.size, self.tta = module, tuple(size), check_tta(tta)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[1], images.shape[2]
        probabilities = class_probabilities(self.module, to_model_input(images, size=self.size), self.tta)
        return to_image_size(probabilities, height, width)
