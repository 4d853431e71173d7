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

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from raytrain.config import Config, load_config, load_yaml
from raytrain.data.location import filesystem_of, is_uri
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
    experiment: str | None = None  # the experiment it was found in, when found by best_checkpoint


def fetch_checkpoint(filesystem: pafs.FileSystem, path: str, cache: Path) -> Path:
    """Copy a checkpoint directory from any pyarrow filesystem into `cache`, once; return the copy."""
    target = cache / hashlib.sha1(f"{filesystem.type_name}:{path}".encode()).hexdigest()[:16] / path.rstrip("/").rsplit("/", 1)[-1]
    if (target / MODEL_FILE).is_file():
        return target
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise CheckpointError(f"{path}: checkpoint directory not found")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pafs.copy_files(path, str(partial), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    partial.rename(target)  # whole or not at all: a broken download is never taken for a checkpoint
    return target


def cache_dir() -> Path:
    """raytrain's cache: fetched checkpoints, the quickstart's data."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raytrain"


def local_checkpoint(location: str | os.PathLike) -> Path:
    """A local directory for a checkpoint given as a path or URI; s3://, gs://, ... are fetched into
    ~/.cache/raytrain/checkpoints."""
    if not is_uri(location):
        return Path(location).expanduser()
    filesystem, path = filesystem_of(location)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    return fetch_checkpoint(filesystem, path, cache_dir() / "checkpoints")


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    path = local_checkpoint(path)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE) if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise CheckpointError(f"{path}: not a raytrain checkpoint (missing {', '.join(missing) or 'directory'})")
    try:
        config = load_config(load_yaml((path / CONFIG_FILE).read_text(), CONFIG_FILE))
    except Exception as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable checkpoint config ({' '.join(str(err).split())})") from None
    return CheckpointInfo(path, config, read_metrics(path), list(config.classes))


def read_metrics(location: str | os.PathLike) -> dict:
    """A checkpoint's metrics.json, local or at a URI (without fetching the weights)."""
    filesystem, path = filesystem_of(location)
    file = f"{os.fspath(location).rstrip('/')}/{METRICS_FILE}" if is_uri(location) else Path(path) / METRICS_FILE
    try:
        with filesystem.open_input_stream(f"{path}/{METRICS_FILE}") as stream:
            metrics = json.loads(stream.read())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found") from None
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{file}: expected a JSON object of metrics, got {type(metrics).__name__}")
    return metrics


def list_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Every checkpoint directory below `directory` (an experiment, a trial or a run), local or at a
    URI (s3://...); returned as locations of the same kind."""
    filesystem, root = filesystem_of(directory)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise CheckpointError(f"{directory}: experiment directory not found")
    files = {info.path for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))}
    directories = sorted(
        path[: -len(METRICS_FILE) - 1] for path in files
        if path.endswith(f"/{METRICS_FILE}") and f"{path[: -len(METRICS_FILE) - 1]}/{MODEL_FILE}" in files
    )
    if not is_uri(directory):
        return directories
    prefix = os.fspath(directory).rstrip("/")  # keep the URI's scheme and options
    return [prefix + path[len(root.rstrip("/")) :] for path in directories]


def scored_checkpoints(directory: str | os.PathLike, metric: str) -> list[tuple[float, str]]:
    """(value of `metric`, location) of every checkpoint below `directory` that reports it."""
    scored = []
    for path in list_checkpoints(directory):
        value = read_metrics(path).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            scored.append((value, path))
    return scored


def best_location(directory: str | os.PathLike, metric: str = "val_iou", mode: str = "max") -> str | None:
    """Where the checkpoint with the best `metric` below `directory` is (nothing fetched), or None."""
    if mode not in ("min", "max"):
        raise CheckpointError(f"mode must be 'min' or 'max', not {mode!r}")
    scored = scored_checkpoints(directory, metric)
    if not scored:
        return None
    # On a tie, the Train run's own checkpoint (Tune's copies for PBT, checkpoint_000001, are deleted
    # after a few more), then the first in path order.
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda item: (sign * item[0], not _is_tune_copy(item[1])))[1]


def best_checkpoint_in(directory: str | os.PathLike, metric: str = "val_iou", mode: str = "max") -> CheckpointInfo:
    """The checkpoint with the best `metric` among all trials and epochs kept below `directory`."""
    best = best_location(directory, metric, mode)
    if best is None:
        raise CheckpointError(f"{directory}: no checkpoint reports {metric!r}")
    return read_checkpoint(best)


def _is_tune_copy(path: str) -> bool:
    return re.fullmatch(r"checkpoint_\d{6}", os.path.basename(os.fspath(path).rstrip("/"))) is not None
