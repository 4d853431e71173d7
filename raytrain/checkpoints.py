"""One checkpoint directory per epoch, readable without Ray and safe to load.

    model.pt          the model's state dict (tensors only)
    train_state.pt    optimiser and scheduler state and epochs completed (tensors and plain values)
    config.yaml       the fully resolved config that made it
    metrics.json      the epoch's metrics
    classes.json      class names, in output-channel order

Tensors load with torch.load(weights_only=True) and everything else is YAML or JSON, so opening a
checkpoint from elsewhere cannot run code. Nor can it cost more memory than its files' size:
model.pt is memory-mapped and checked against the model config.yaml describes (built on the meta
device, its parameters bounded) before any tensor is copied (read_weights, inference.loading.load_model).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from raytrain.config import Config, load_config
from raytrain.errors import CheckpointError, first_line, limit_from_env
from raytrain.storage.paths import RemotePath, filesystem_of, is_uri, join
from raytrain.storage.reading import CONFIG_BYTES, RECORD_BYTES, checked_size, read_bounded
from raytrain.storage.safe_yaml import load_yaml

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that read or write tensors: finding checkpoints and reading
# their metrics (`raytrain runs`, a config error at the CLI) should not wait for it.

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
    import torch

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
    """Load weights and optimiser state into the given objects; return the epochs completed. The
    files are a run's own, but a damaged or missing one is still a one-line error that names it,
    raised before anything is loaded into the model."""
    import torch

    directory = Path(directory)
    weights = read_weights(directory / MODEL_FILE, unwrap(model).state_dict())
    checked_size(directory / STATE_FILE, checkpoint_file_limit(STATE_FILE), "training state", CheckpointError)
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        return int(state["epoch"])
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; all are the same one-line error
        raise CheckpointError(f"{directory / STATE_FILE}: cannot resume from it ({first_line(err)})") from None


MAX_PARAMETERS_ENV = "RAYTRAIN_MAX_PARAMETERS"
# 4 GB of float32: well above the segmentation models in use (tens to a few hundred million), far
# below what a hand-edited config.yaml can ask for (a unet of base_channels 4096: 127 billion).
DEFAULT_MAX_PARAMETERS = 1_000_000_000


def max_parameters() -> int:
    return limit_from_env(MAX_PARAMETERS_ENV, DEFAULT_MAX_PARAMETERS, "parameters", CheckpointError)


def read_weights(file: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model.pt's state dict, checked against `expected` (the config's model built on the meta
    device: names, shapes, dtypes) before a byte of it is copied. Memory-mapped, weights only:
    loading a file from elsewhere runs no code and costs no more memory than the file's size."""
    import torch

    _check_weights_file(file, sum(t.numel() * t.element_size() for t in expected.values()))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _unloadable(file, err) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = found.group(1) if found else "Python objects"
        raise CheckpointError(
            f"{file}: refused: not a weights-only checkpoint (it pickles {what}, which could run code)"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; all are the same one-line error
        raise _unloadable(file, err) from None
    _check_names_and_shapes(file, state, expected)
    return state


def _check_weights_file(file: Path, needed: int) -> None:
    """Before torch reads it: big enough to hold the weights the config asks for (so a tiny file
    cannot make raytrain build a huge model), torch's zip format (what mmap needs), nothing compressed
    (torch.save stores; a deflated entry of 1 MB can expand to 1 GB)."""
    size = checked_size(file, checkpoint_file_limit(MODEL_FILE), "weights", CheckpointError, MAX_PARAMETERS_ENV)
    if needed > size:
        raise _unloadable(file, f"config.yaml's model needs {needed} bytes of weights, the file holds {size}")
    if not zipfile.is_zipfile(file):
        raise _unloadable(file, "not in torch's zip format; a legacy torch.save file (torch < 1.6) must be saved again")
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _unloadable(file, err) from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise _unloadable(file, f"{entry.filename} is compressed, which torch.save never does")


def _check_names_and_shapes(file: Path, state, expected: dict[str, torch.Tensor]) -> None:
    import torch

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _unloadable(file, "not a state dict of named tensors")
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise _unloadable(file, f"not the model in config.yaml: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise _unloadable(file, f"not the model in config.yaml: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                                    f"the model's is {tuple(want.shape)} {want.dtype}")


def _unloadable(file: Path, reason) -> CheckpointError:
    if isinstance(reason, BaseException):
        reason = first_line(reason)
    return CheckpointError(f"{file}: cannot load the weights ({reason})")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: Config
    metrics: dict
    classes: list[str]
    experiment: str | None = None  # the experiment it was found in, when found by best_checkpoint


LOADED_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, CLASSES_FILE)  # what reading and loading one need (not train_state.pt)


def checkpoint_file_limit(name: str) -> int:
    """The most bytes a checkpoint's file may have: weights of at most max_parameters() in float64
    (the widest dtype a model is saved in) and some zip overhead; the training state twice that
    (Adam keeps two values a parameter); config.yaml and the JSON files storage.reading's limits."""
    weights = 8 * max_parameters() + RECORD_BYTES
    return {MODEL_FILE: weights, STATE_FILE: 2 * weights, CONFIG_FILE: CONFIG_BYTES}.get(name, RECORD_BYTES)


def fetch_checkpoint(filesystem: pafs.FileSystem, path: str, cache: Path) -> Path:
    """Copy what reading and loading a checkpoint need (not its training state) from any pyarrow
    filesystem into `cache`, once, each file's size checked from the listing first; return the copy."""
    target = cache / hashlib.sha1(f"{filesystem.type_name}:{path}".encode()).hexdigest()[:16] / path.rstrip("/").rsplit("/", 1)[-1]
    if (target / MODEL_FILE).is_file():
        return target
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise CheckpointError(f"{path}: checkpoint directory not found")
    listing = {info.base_name: info for info in filesystem.get_file_info(pafs.FileSelector(path))}
    wanted = [listing[name] for name in LOADED_FILES if name in listing and listing[name].type == pafs.FileType.File]
    for info in wanted:
        if info.size is not None and info.size > checkpoint_file_limit(info.base_name):
            raise CheckpointError(f"{path}/{info.base_name}: {info.size} bytes, over the limit of "
                                  f"{checkpoint_file_limit(info.base_name)} for a checkpoint's {info.base_name} ({MAX_PARAMETERS_ENV})")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for info in wanted:
        pafs.copy_files(info.path, str(partial / info.base_name), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
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
    # Present, not necessarily files: what else they are (a FIFO, a folder) the readers say in words.
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE) if not (path / name).exists()]
    if not path.is_dir() or missing:
        raise CheckpointError(f"{path}: not a raytrain checkpoint (missing {', '.join(missing) or 'directory'})")
    text = read_bounded(path / CONFIG_FILE, CONFIG_BYTES, "checkpoint config", CheckpointError)
    try:
        config = load_config(load_yaml(text.decode(), CONFIG_FILE))
    except Exception as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable checkpoint config ({' '.join(str(err).split())})") from None
    return CheckpointInfo(path, config, read_metrics(path), list(config.classes))


def read_metrics(location: str | os.PathLike) -> dict:
    """A checkpoint's metrics.json, local or at a URI (without fetching the weights)."""
    file = join(location, METRICS_FILE)
    return _parsed_metrics(read_bounded(file, RECORD_BYTES, "metrics", CheckpointError), file)


def checkpoints_by_epoch(filesystem: pafs.FileSystem, folder: str) -> list[tuple[int, str, dict]]:
    """(epoch, path, metrics) of every checkpoint directly in `folder` (a run's), the latest epoch
    first. One without all its files, or whose metrics.json does not read, is left out."""
    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        names = {child.base_name for child in filesystem.get_file_info(pafs.FileSelector(info.path))}
        if not {*LOADED_FILES, STATE_FILE} <= names:
            continue
        file = RemotePath(filesystem, f"{info.path}/{METRICS_FILE}", "")
        try:
            metrics = _parsed_metrics(read_bounded(file, RECORD_BYTES, "metrics", CheckpointError), file)
        except CheckpointError:
            continue
        if type(metrics.get("epoch")) is int:
            found.append((metrics["epoch"], info.path, metrics))
    return sorted(found, key=lambda entry: entry[0], reverse=True)


def _parsed_metrics(data: bytes, file) -> dict:
    try:
        metrics = json.loads(data)
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{file}: expected a JSON object of metrics, got {type(metrics).__name__}")
    return metrics
