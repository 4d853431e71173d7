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
A model.encoder_weights file, from elsewhere too, is read the same way into the model a run starts
from (initial_model); loading a checkpoint never reads it.
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
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from raytrain.config import Config, load_config
from raytrain.errors import CheckpointError, ConfigError, RaytrainError, first_line, limit_from_env
from raytrain.storage.atomic import DISK_FULL, cannot_write, write_errors_named
from raytrain.storage.paths import RemotePath, as_path, filesystem_of, is_uri, join
from raytrain.storage.reading import CONFIG_BYTES, RECORD_BYTES, checked_size, copy_bounded, read_bounded
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
    state = _load_tensors(file, file, sum(t.numel() * t.element_size() for t in expected.values()), "config.yaml's model")
    _check_names_and_shapes(file, state, expected, "the model in config.yaml")
    return state


def initial_model(config: Config) -> tuple[torch.nn.Module, Config]:
    """The model a run starts from, as every worker (and preflight) builds it, with the config that
    says how: with model.encoder_weights a file, its encoder holds the file's weights
    (load_encoder_weights) and the config records the file's SHA-256 in model.encoder_weights_sha256,
    which a digest already there must equal. create_model's ValueError or KeyError for options the
    model does not take; a ConfigError naming model.encoder_weights and the file for anything wrong
    with the file."""
    from raytrain.models import create_model

    location = config.model.encoder_weights_file
    options = config.model.kwargs() | ({"encoder_weights": None} if location else {})  # None: a model without one says so
    model = create_model(config.model.name, num_classes=config.num_classes, **options)
    if location is None:
        return model, config
    try:
        digest = load_encoder_weights(model.encoder, location, config.model.encoder_weights_sha256)
    except RaytrainError as err:
        raise ConfigError(f"model.encoder_weights: {err}") from None
    return model, config.with_overrides({"model.encoder_weights_sha256": digest})


def load_encoder_weights(encoder: torch.nn.Module, location: str | os.PathLike, sha256: str | None = None) -> str:
    """Load the weights file at `location` (a local path or a URI, a remote one copied to a temporary
    file first) into `encoder`; return the file's SHA-256, which must equal `sha256` where given.
    The file is read as model.pt is (its size bounded, uncompressed, memory-mapped, weights only)
    and holds the encoder's state dict, torch.save(model.encoder.state_dict()) of an smp model; or a
    whole smp model's (torch.save(model.state_dict()), a raytrain model.pt), of which the encoder.*
    tensors are taken. Its tensors must be the encoder's by name, shape and dtype, less what the
    encoder's own load_state_dict drops (smp's ResNet drops the classifier fc.* that torchvision's
    and timm's files hold) and the stages that a shallower model.depth pruned (the file may be
    saved at any depth); BatchNorm counters it lacks keep the encoder's own."""
    source = as_path(location)
    if isinstance(source, Path):
        return _load_encoder_file(encoder, source.expanduser(), source, sha256)
    with tempfile.TemporaryDirectory(prefix="raytrain-weights-") as folder:
        copy = Path(folder) / "weights.pt"
        with write_errors_named(folder):  # the copy's disk: copy_bounded names the source for a failed read
            copy_bounded(source, copy, checkpoint_file_limit(MODEL_FILE), "weights", CheckpointError, MAX_PARAMETERS_ENV)
        return _load_encoder_file(encoder, copy, source, sha256)


def _load_encoder_file(encoder: torch.nn.Module, file: Path, shown, sha256: str | None) -> str:
    from torch import nn

    # No lower bound on its size (needed 0): the model is built from the config, not from the file.
    state = _load_tensors(file, shown, 0, "the encoder")
    sha = hashlib.sha256()
    with open(file, "rb") as weights:  # in blocks: the file may be gigabytes (hashlib.file_digest is Python 3.11's)
        for block in iter(lambda: weights.read(1 << 24), b""):
            sha.update(block)
    digest = sha.hexdigest()
    if sha256 is not None and sha256 != digest:
        raise CheckpointError(f"{shown}: its SHA-256 is {digest}, not model.encoder_weights_sha256's {sha256} "
                              "(another file, or this one changed)")
    own = encoder.state_dict()
    if not own.keys() & state.keys() and any(name.startswith("encoder.") for name in state):
        state = {name.removeprefix("encoder."): tensor for name, tensor in state.items() if name.startswith("encoder.")}

    def pruned(name: str) -> bool:  # inside a stage that pruning replaced by nn.Identity
        module = encoder
        for part in name.split(".")[:-1]:
            module = module._modules.get(part)
            if module is None or isinstance(module, nn.Identity):
                return module is not None
        return False

    state = {name: tensor for name, tensor in state.items() if not pruned(name)}
    for name, tensor in own.items():
        if name.endswith(".num_batches_tracked"):
            state.setdefault(name, tensor)
    _check_names_and_shapes(shown, state, own, "the encoder", complete=False)  # before a tensor is copied
    try:
        encoder.load_state_dict(state)  # the encoder's own, which may drop its classifier from `state`
    except RuntimeError as err:
        _check_names_and_shapes(shown, state, own, "the encoder")  # which names, in one line
        raise _unloadable(shown, err) from None
    return digest


def _load_tensors(file: Path, shown, needed: int, what: str) -> dict[str, torch.Tensor]:
    """The state dict in `file`, once _check_weights_file passes it; errors name `shown`, where it is
    from. `what` needs `needed` bytes of weights."""
    import torch

    _check_weights_file(file, shown, needed, what)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _unloadable(shown, err) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        pickled = found.group(1) if found else "Python objects"
        raise CheckpointError(
            f"{shown}: refused: not a weights-only file (it pickles {pickled}, which could run code)"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; all are the same one-line error
        raise _unloadable(shown, err) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _unloadable(shown, "not a state dict of named tensors")
    return state


def _check_weights_file(file: Path, shown, needed: int, what: str) -> None:
    """Before torch reads it: big enough to hold the weights the config asks for (so a tiny file
    cannot make raytrain build a huge model), torch's zip format (what mmap needs), nothing compressed
    (torch.save stores; a deflated entry of 1 MB can expand to 1 GB)."""
    size = checked_size(file, checkpoint_file_limit(MODEL_FILE), "weights", CheckpointError, MAX_PARAMETERS_ENV)
    if needed > size:
        raise _unloadable(shown, f"{what} needs {needed} bytes of weights, the file holds {size}")
    if not zipfile.is_zipfile(file):
        raise _unloadable(shown, "not a torch.save file in its zip format (a legacy one, of torch < 1.6, must be saved again)")
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _unloadable(shown, err) from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise _unloadable(shown, f"{entry.filename} is compressed, which torch.save never does")


def _check_names_and_shapes(shown, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str,
                            complete: bool = True) -> None:
    """`state` holds `expected`'s tensors by name, shape and dtype, and no others; complete=False:
    the tensors of `expected`'s names that it holds are of their shape and dtype."""
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if complete and (missing or unexpected):
        raise _unloadable(shown, f"not the weights of {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and (tensor.shape != want.shape or tensor.dtype != want.dtype):
            raise _unloadable(shown, f"not the weights of {what}: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"the model's is {tuple(want.shape)} {want.dtype}")


def _unloadable(shown, reason) -> CheckpointError:
    if isinstance(reason, BaseException):
        reason = first_line(reason)
    return CheckpointError(f"{shown}: cannot load the weights ({reason})")


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
