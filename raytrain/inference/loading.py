"""A checkpoint, checked and loaded: the module in eval mode with the config it was trained under.
A checkpoint is untrusted input: its config is bounded and its weights checked before any real
tensor is made (checkpoints.read_weights); it loads with torch and raytrain alone, no Ray.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from raytrain.checkpoints import (
    CONFIG_FILE, LOADED_FILES, MAX_PARAMETERS_ENV, MODEL_FILE, CheckpointInfo, checkpoint_file_limit, max_parameters,
    read_checkpoint, read_weights,
)
from raytrain.config import Config
from raytrain.data.images import MAX_PIXELS_ENV, max_pixels
from raytrain.errors import CheckpointError, RaytrainError, first_line
from raytrain.models import create_model
from raytrain.storage.reading import read_bounded


@dataclass(frozen=True)
class LoadedModel:
    """A trained module with the config it was trained under. predict, evaluate and export read
    the training size and the classes from here; nothing rides along on the module itself."""

    module: torch.nn.Module
    config: Config
    path: Path | None = None  # the checkpoint it came from

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists on this machine, or a one-line RaytrainError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RaytrainError(f"{device!r} is not a device (expected cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (parsed.index or 0) >= count:
            raise RaytrainError(f"{device!r}: no such device (this machine has {count} CUDA device{'s' * (count != 1)})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RaytrainError(f"{device!r}: no such device (MPS is not available here)")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise RaytrainError(f"{device!r}: not a device to run a model on (expected cpu, cuda, cuda:N or mps)")
    return parsed


def load_model(checkpoint: str | os.PathLike | CheckpointInfo, device: str | torch.device = "cpu") -> LoadedModel:
    """The trained module in eval mode on `device`, with its config: pass it to predict.

    A checkpoint is not trusted: its config is bounded (data.size, parameter count) and its weights
    are checked against the config's model, built on the meta device, before any real tensor is
    made; pretrained encoder weights are never downloaded (the weights are model.pt's)."""
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    target = check_device(device)
    state = read_weights(info.path / MODEL_FILE, _expected_state(info))
    module = _build(info.config, info.path / CONFIG_FILE)
    module.load_state_dict(state)
    return LoadedModel(module.to(target).eval(), info.config, info.path)


def checkpoint_files(checkpoint: Path) -> dict[str, bytes]:
    """What load_model reads of a local checkpoint, as bytes: for actors on nodes that cannot see the path."""
    return {name: read_bounded(checkpoint / name, checkpoint_file_limit(name), name, CheckpointError)
            for name in LOADED_FILES if (checkpoint / name).exists()}


def load_model_from_files(files: dict[str, bytes], device: str | torch.device = "cpu") -> LoadedModel:
    """load_model itself on a private copy of checkpoint_files(): the same checks as anywhere."""
    with tempfile.TemporaryDirectory(prefix="raytrain-checkpoint-") as copy:
        for name, data in files.items():
            (Path(copy) / name).write_bytes(data)
        return replace(load_model(copy, device), path=None)


def _expected_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The state dict the config's model has, as meta tensors (no memory), once its sizes are bounded."""
    file, config = info.path / CONFIG_FILE, info.config
    width, height = config.data.size
    if width * height > max_pixels():  # predict resizes every image to data.size
        raise CheckpointError(f"{file}: data.size {width}x{height} is over the limit of {max_pixels()} pixels ({MAX_PIXELS_ENV})")
    state = _build(config, file, "meta").state_dict()
    count, limit = sum(t.numel() for t in state.values()), max_parameters()
    if count > limit:
        raise CheckpointError(f"{file}: model {config.model.name} with these options has {count} parameters, "
                              f"over the limit of {limit} ({MAX_PARAMETERS_ENV})")
    return state


def _build(config: Config, file: Path, device: str = "cpu") -> torch.nn.Module:
    # encoder_weights is dropped (a name here, a file by kwargs()): pretrained weights only seed
    # training; loading takes model.pt's, and must not reach for the network or the file because a
    # config says so.
    options = {k: v for k, v in config.model.kwargs().items() if k != "encoder_weights"}
    try:
        with torch.device(device):
            return create_model(config.model.name, num_classes=config.num_classes, **options)
    except Exception as err:  # noqa: BLE001 - the config is untrusted input; any failure to build is its fault
        raise CheckpointError(f"{file}: cannot build its model ({first_line(err)})") from None
