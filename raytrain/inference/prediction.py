"""predict: a loaded model's probabilities (or masks) for images of any size, at each one's size."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from raytrain.data.images import read_rgb
from raytrain.errors import DataError
from raytrain.inference.image_model import check_tta, class_probabilities, to_image_size
from raytrain.inference.loading import LoadedModel
from raytrain.metrics import to_labels
from raytrain.models import to_model_input
from raytrain.viz import overlay


def _as_tensor(image) -> torch.Tensor:
    """A path or an array as a uint8 (H, W, 3) tensor (a copy: PIL's arrays are read-only)."""
    if isinstance(image, (str, os.PathLike)):
        return torch.tensor(read_rgb(image))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"predict takes uint8 RGB images (H, W, 3), not {array.dtype} {array.shape}")
    return torch.tensor(array)


@torch.no_grad()
def predict(model: LoadedModel, images: Sequence, *, masks: bool = False, batch_size: int = 8,
            tta: str | None = None) -> list[np.ndarray]:
    """Road probability (H, W) -- or class probabilities (C, H, W) -- at each image's own size.

    model: what load_model returns. images: paths or uint8 RGB arrays (H, W, 3), of any sizes.
    With masks=True the result is the predicted class index per pixel instead (road: probability
    > 0.5; multi-class: argmax). tta="flip" averages the image's and its mirror image's.
    """
    if not isinstance(model, LoadedModel):
        raise TypeError(f"predict takes what raytrain.load_model returns, not {type(model).__name__}")
    check_tta(tta)
    tensors = [_as_tensor(image) for image in images]
    outputs = []
    for start in range(0, len(tensors), batch_size):
        chunk = tensors[start : start + batch_size]
        inputs = torch.cat([to_model_input(image[None], model.device, model.config.data.size) for image in chunk])
        for image, probs in zip(chunk, class_probabilities(model.module, inputs, tta)):
            probs = to_image_size(probs[None], *image.shape[:2])[0]
            if masks:
                result = to_labels(probs)
            else:
                result = probs[0] if probs.shape[0] == 1 else probs
            outputs.append(result.cpu().numpy())
    return outputs


def labels_of(probabilities: np.ndarray) -> np.ndarray:
    """The mask predict writes (class index per pixel, uint8; road = 1) of what predict returns."""
    return to_labels(probabilities[None] if probabilities.ndim == 2 else probabilities)


def masks_and_overlays(model: LoadedModel, arrays: Sequence[np.ndarray], batch_size: int = 8, tta: str | None = None):
    """(class index per pixel, the image with the prediction painted on) for each RGB array, at its own size."""
    for array, probabilities in zip(arrays, predict(model, arrays, batch_size=batch_size, tta=tta)):
        yield labels_of(probabilities), overlay(array, probabilities, model.classes)
