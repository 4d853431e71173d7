"""One checkpoint directory per epoch, readable without Ray and safe to load.

    model.pt          the model's state dict (tensors only)
    train_state.pt    optimiser and scheduler state and epochs completed (tensors and plain values)
    config.yaml       the fully resolved config that made it
    metrics.json      the epoch's metrics
    classes.json      class names, in output-channel order

Tensors load with torch.load(weights_only=True) and everything else is YAML or JSON, so opening a
checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from raytrain.config import Config, load_config
from raytrain.errors import CheckpointError

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CLASSES_FILE = "classes.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (or torch.compile), whose state dict has no prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(directory, model, optimizer, scheduler, epoch: int, config: Config, metrics: dict) -> Path:
    """Save after `epoch` epochs are complete (1-based, as reported)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), directory / MODEL_FILE)
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(config.to_yaml())
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (directory / CLASSES_FILE).write_text(json.dumps(config.classes))
    return directory


def restore_train_state(directory, model, optimizer, scheduler=None) -> int:
    """Load weights and optimiser state into the given objects; return the epochs completed."""
    directory = Path(directory)
    unwrap(model).load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: Config
    metrics: dict
    classes: list[str]


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    path = Path(path).expanduser()
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE) if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise CheckpointError(f"{path}: not a raytrain checkpoint (missing {', '.join(missing) or 'directory'})")
    try:
        config = load_config(yaml.safe_load((path / CONFIG_FILE).read_text()))
    except Exception as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable checkpoint config ({' '.join(str(err).split())})") from None
    return CheckpointInfo(path, config, read_metrics(path), list(config.classes))


def read_metrics(path: str | os.PathLike) -> dict:
    """A checkpoint's metrics.json."""
    file = Path(path).expanduser() / METRICS_FILE
    try:
        metrics = json.loads(file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{file}: expected a JSON object of metrics, got {type(metrics).__name__}")
    return metrics
