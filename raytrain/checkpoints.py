"""One checkpoint directory per epoch, readable without Ray and safe to load.

    model.pt          the model's state dict (tensors only): with train.ema, the average of its weights
    train_state.pt    optimiser and scheduler state and epochs completed (tensors and plain values);
                      with train.ema, the trained weights too, and the average's count of updates
    config.yaml       the fully resolved config that made it
    metrics.json      the epoch's metrics
    classes.json      class names, in output-channel order
    complete.json     the size of each file above, written last

A checkpoint is complete or it is not one: finding, reading and loading one (check_complete) refuse
a folder without complete.json, or with a file missing or of another size than it records, as a
save or upload that a full disk or a kill stopped short leaves. A run's upload writes complete.json
last (upload_checkpoint) and removes what it copied when it fails.

Tensors load with torch.load(weights_only=True) and everything else is YAML or JSON, so opening a
checkpoint from elsewhere cannot run code. Nor can it cost more memory than its files' size:
model.pt is memory-mapped and checked against the model config.yaml describes (built on the meta
device, its parameters bounded) before any tensor is copied (read_weights, inference.loading.load_model).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
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
from raytrain.storage.atomic import DISK_FULL, cannot_write, write_errors_named
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
COMPLETE_FILE = "complete.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE, METRICS_FILE, CLASSES_FILE)  # what complete.json records


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (or torch.compile), whose state dict has no prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(directory, model, optimizer, scheduler, epoch: int, config: Config, metrics: dict,
                    average=None) -> Path:
    """Save after `epoch` epochs are complete (1-based, as reported). average: the weights' moving
    average (torch's AveragedModel, train.ema), saved as model.pt, or None."""
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    weights = unwrap(model).state_dict()
    if average is not None:
        state.update(trained_weights=weights, average_updates=average.n_averaged)
        weights = average.module.state_dict()
    files = {
        MODEL_FILE: _torch_bytes(weights), STATE_FILE: _torch_bytes(state),
        CONFIG_FILE: config.to_yaml().encode(), METRICS_FILE: json.dumps(metrics, indent=2).encode(),
        CLASSES_FILE: json.dumps(config.classes).encode(),
    }
    directory = Path(directory)
    with write_errors_named(directory):
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (directory / name).write_bytes(data)
    seal(directory)
    return directory


def _torch_bytes(value) -> memoryview:
    """torch.save's bytes, made in memory: torch's own file writer fails a full disk with a RuntimeError
    that says nothing of the disk, where writing bytes is the OSError it is."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getbuffer()


def seal(directory) -> None:
    """Write complete.json, the size of each checkpoint file in `directory`, once they are all written."""
    directory = Path(directory)
    sizes = {name: (directory / name).stat().st_size for name in CHECKPOINT_FILES if (directory / name).is_file()}
    with write_errors_named(directory):
        (directory / COMPLETE_FILE).write_text(json.dumps(sizes, indent=2))


def check_complete(location: str | os.PathLike, files: tuple[str, ...] = CHECKPOINT_FILES) -> None:
    """Raise a CheckpointError naming what is wrong unless `location` (local or a URI) holds these
    `files` of a checkpoint whole: model.pt, config.yaml and metrics.json there, and each of `files`
    that complete.json records there at the size it records. Reads only the listing and complete.json."""
    filesystem, path = filesystem_of(location)
    shown = os.fspath(location).rstrip("/") if is_uri(location) else str(Path(location).expanduser())
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.Directory:
            raise CheckpointError(f"{shown}: not a raytrain checkpoint (missing directory)")
        listing = {info.base_name: info for info in filesystem.get_file_info(pafs.FileSelector(path))}
    except OSError as err:
        raise CheckpointError(f"{shown}: unreadable checkpoint folder ({' '.join(str(err).split())})") from None
    found = {name: info.size for name, info in listing.items() if info.type == pafs.FileType.File}
    for name in sorted((set(listing) - set(found)) & {*files, COMPLETE_FILE}):  # a FIFO or a folder: say which
        if is_uri(location):
            raise CheckpointError(f"{shown}/{name}: cannot read the checkpoint file (not a regular file)")
        checked_size(Path(shown) / name, 0, "checkpoint file", CheckpointError)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE) if name not in found]
    if missing:
        raise CheckpointError(f"{shown}: not a raytrain checkpoint (missing {', '.join(missing)})")
    if COMPLETE_FILE not in found:
        raise CheckpointError(f"{shown}: incomplete checkpoint: no {COMPLETE_FILE}, which saving it writes last "
                              "(a save or copy that was stopped short)")
    for name, size in _recorded_sizes(filesystem, f"{path}/{COMPLETE_FILE}", f"{shown}/{COMPLETE_FILE}").items():
        if name in files and found.get(name) != size:
            there = "missing" if name not in found else f"{found[name]} bytes"
            raise CheckpointError(f"{shown}/{name}: incomplete checkpoint: {there}, where {COMPLETE_FILE} records "
                                  f"{size} bytes (a save or copy that was stopped short)")


def _recorded_sizes(filesystem: pafs.FileSystem, path: str, shown: str) -> dict[str, int]:
    data = read_bounded(RemotePath(filesystem, path, ""), RECORD_BYTES, "checkpoint record", CheckpointError)
    try:
        sizes = json.loads(data)
    except ValueError as err:
        raise CheckpointError(f"{shown}: unreadable ({' '.join(str(err).split())})") from None
    if not (isinstance(sizes, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values())
            and set(sizes) <= set(CHECKPOINT_FILES)):
        raise CheckpointError(f"{shown}: not a record of checkpoint file sizes")
    return sizes


def upload_checkpoint(local: str | os.PathLike, filesystem: pafs.FileSystem, destination: str) -> None:
    """Copy the checkpoint saved in `local` to `destination` on `filesystem` (a run's storage), its
    complete.json last, so that an upload cut short is never a complete checkpoint. When the copy
    fails (a full disk), what it copied is removed and the error is one line naming `destination`."""
    local = Path(local)
    names = sorted(p.name for p in local.iterdir() if p.name != COMPLETE_FILE) + [COMPLETE_FILE]
    try:
        with write_errors_named(destination):
            filesystem.create_dir(destination)
            for name in names:
                # One file at a time (no threads, which pyarrow's S3 uploads cannot take), in big chunks.
                pafs.copy_files(str(local / name), f"{destination}/{name}", destination_filesystem=filesystem,
                                chunk_size=64 << 20, use_threads=False)
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_dir(destination)
        raise


def restore_train_state(directory, model, optimizer, scheduler=None, average=None) -> int:
    """Load weights and optimiser state into the given objects; return the epochs completed. The
    files are a run's own, but a damaged or missing one is still a one-line error that names it,
    raised before anything is loaded into the model. average: the run's AveragedModel (train.ema),
    or None; from a checkpoint saved without one, it starts again from the weights."""
    import torch

    directory = Path(directory)
    weights = read_weights(directory / MODEL_FILE, unwrap(model).state_dict())
    checked_size(directory / STATE_FILE, checkpoint_file_limit(STATE_FILE), "training state", CheckpointError)
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        if "trained_weights" in state:  # model.pt holds the average
            if average is not None:
                average.module.load_state_dict(weights)
                average.n_averaged.fill_(int(state["average_updates"]))
            weights = state["trained_weights"]
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


# What reading and loading one need (not train_state.pt), complete.json to check them by.
LOADED_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, CLASSES_FILE, COMPLETE_FILE)


def checkpoint_file_limit(name: str) -> int:
    """The most bytes a checkpoint's file may have: weights of at most max_parameters() in float64
    (the widest dtype a model is saved in) and some zip overhead; the training state three times that
    (Adam keeps two values a parameter, and with train.ema it holds the trained weights too);
    config.yaml and the JSON files storage.reading's limits."""
    weights = 8 * max_parameters() + RECORD_BYTES
    return {MODEL_FILE: weights, STATE_FILE: 3 * weights, CONFIG_FILE: CONFIG_BYTES}.get(name, RECORD_BYTES)


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
    try:
        partial.mkdir(parents=True)
        for info in wanted:
            pafs.copy_files(info.path, str(partial / info.base_name), source_filesystem=filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
        partial.rename(target)  # whole or not at all: a broken download is never taken for a checkpoint
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:  # the cache's disk; other errors are the source's
            raise cannot_write(cache, err) from None
        raise
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
    check_complete(path, LOADED_FILES)  # where it is: nothing is fetched from a URI for an incomplete one
    path = local_checkpoint(path)
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
