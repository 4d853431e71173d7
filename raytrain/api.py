"""The Python API: train, tune, find the best checkpoint, load it, predict. No Ray needed to load."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from PIL import Image

from raytrain.checkpoints import METRICS_FILE, MODEL_FILE, CheckpointInfo, read_checkpoint, read_metrics
from raytrain.data.location import filesystem_of, is_uri
from raytrain.config import Config, load_config
from raytrain.data.transforms import to_model_input
from raytrain.errors import CheckpointError
from raytrain.models import create_model, to_probabilities


def train(config: str | os.PathLike | dict | Config, overrides: dict[str, Any] | None = None):
    """One Ray Train run; returns Ray's Result (its .checkpoint and .metrics)."""
    from raytrain import launch

    return launch.train(load_config(config, overrides))


def tune(config: str | os.PathLike | dict | Config, overrides: dict[str, Any] | None = None, *, resume: bool = False):
    """A Ray Tune search over config.search.space; returns Ray's ResultGrid."""
    from raytrain import launch

    return launch.tune(load_config(config, overrides), resume=resume)


def list_checkpoints(experiment_path: str | os.PathLike) -> list[str]:
    """Every checkpoint directory below an experiment (or a single run) directory, local or at a
    URI (s3://...); returned as locations of the same kind."""
    filesystem, root = filesystem_of(experiment_path)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise CheckpointError(f"{experiment_path}: experiment directory not found")
    files = {info.path for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))}
    directories = sorted(
        path[: -len(METRICS_FILE) - 1] for path in files
        if path.endswith(f"/{METRICS_FILE}") and f"{path[: -len(METRICS_FILE) - 1]}/{MODEL_FILE}" in files
    )
    if not is_uri(experiment_path):
        return directories
    prefix = os.fspath(experiment_path).rstrip("/")  # keep the URI's scheme and options
    return [prefix + directory[len(root.rstrip("/")) :] for directory in directories]


def best_checkpoint(experiment_path: str | os.PathLike, metric: str = "val_iou", mode: str = "max") -> CheckpointInfo:
    """The checkpoint with the best `metric` among all trials and epochs kept in the experiment."""
    if mode not in ("min", "max"):
        raise CheckpointError(f"mode must be 'min' or 'max', not {mode!r}")
    scored = []
    for path in list_checkpoints(experiment_path):
        value = read_metrics(path).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            scored.append((value, path))
    if not scored:
        raise CheckpointError(f"{experiment_path}: no checkpoint reports {metric!r}")
    # On a tie, the Train run's own checkpoint (Tune's copies for PBT, checkpoint_000001, are deleted
    # after a few more), then the first in path order.
    ranked = sorted(scored, key=lambda item: (item[0] if mode == "max" else -item[0], not _is_tune_copy(item[1])), reverse=True)
    return read_checkpoint(ranked[0][1])


def _is_tune_copy(path: str) -> bool:
    return re.fullmatch(r"checkpoint_\d{6}", os.path.basename(os.fspath(path).rstrip("/"))) is not None


def load_model(checkpoint: str | os.PathLike | CheckpointInfo, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained module in eval mode on `device`; its config rides along as `.raytrain_config`."""
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    config = info.config
    model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs())
    try:
        model.load_state_dict(torch.load(info.path / MODEL_FILE, map_location="cpu", weights_only=True))
    except Exception as err:  # truncated file, foreign pickle, or weights of another architecture
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CheckpointError(f"{info.path / MODEL_FILE}: cannot load the weights ({reason})") from None
    model.raytrain_config = config
    return model.to(device).eval()


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    return np.asarray(image)


@torch.no_grad()
def predict(model: torch.nn.Module, images: Sequence, *, masks: bool = False, batch_size: int = 8) -> list[np.ndarray]:
    """Road probability (H, W) -- or class probabilities (C, H, W) -- at each image's own size.

    images: paths or uint8 RGB arrays (H, W, 3), of any sizes. With masks=True the result is the
    predicted class index per pixel instead (road: probability > 0.5; multi-class: argmax).
    """
    config: Config = model.raytrain_config
    device = next(model.parameters()).device
    width, height = config.data.size
    arrays = [_as_array(image) for image in images]
    outputs = []
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start : start + batch_size]
        resized = np.stack([np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR)) for a in chunk])
        probabilities = to_probabilities(model(to_model_input(torch.from_numpy(resized), device)))
        for array, probs in zip(chunk, probabilities):
            probs = F.interpolate(probs[None], size=array.shape[:2], mode="bilinear", align_corners=False)[0]
            if masks:
                result = (probs[0] > 0.5).to(torch.uint8) if probs.shape[0] == 1 else probs.argmax(0).to(torch.uint8)
            else:
                result = probs[0] if probs.shape[0] == 1 else probs
            outputs.append(result.cpu().numpy())
    return outputs
