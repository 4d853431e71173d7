"""What a trained checkpoint is for: load it, predict images, evaluate it on a sharded dataset,
predict files, export it. No Ray: a checkpoint loads with torch and raytrain alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from raytrain.checkpoints import (
    CONFIG_FILE, LOADED_FILES, MAX_PARAMETERS_ENV, MODEL_FILE, CheckpointInfo, max_parameters, read_checkpoint,
    read_weights,
)
from raytrain.config import Config
from raytrain.data.location import (
    RemotePath, as_path, filesystem_of, is_uri, join, temporary_beside, write_remote_atomically,
)
from raytrain.data.transforms import to_model_input
from raytrain.data.formats import IGNORE_INDEX, MAX_PIXELS_ENV, check_8bit, max_pixels, open_checked
from raytrain.data.shards import group_indices, metric_groups, read_manifest, shard_paths
from raytrain.errors import CheckpointError, DataError, RaytrainError, first_line
from raytrain.metrics import SegmentationMetrics, to_labels
from raytrain.image_model import ImageModel, check_tta, class_probabilities, to_image_size
from raytrain.models import create_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm"}


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


@dataclass(frozen=True)
class PredictionSummary:
    """What a run of predict over files did: images written, images skipped because their mask and
    overlay were already there, inputs that were not readable images (their one-line errors), and
    the file those are listed in."""

    written: int
    already_done: int = 0
    unreadable: tuple[str, ...] = ()
    unreadable_list: str | None = None
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


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
    return {name: (checkpoint / name).read_bytes() for name in LOADED_FILES if (checkpoint / name).is_file()}


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
    # encoder_weights is dropped: pretrained weights only seed training; loading takes model.pt's,
    # and must not reach for the network because a config says so.
    options = {k: v for k, v in config.model.kwargs().items() if k != "encoder_weights"}
    try:
        with torch.device(device):
            return create_model(config.model.name, num_classes=config.num_classes, **options)
    except Exception as err:  # noqa: BLE001 - the config is untrusted input; any failure to build is its fault
        raise CheckpointError(f"{file}: cannot build its model ({first_line(err)})") from None


def read_rgb(source, name=None, formats: Sequence[str] | None = None) -> np.ndarray:
    """An 8-bit image (a path, a RemotePath or a binary file object) as an RGB array (H, W, 3), checked
    against the pixel limit before it is decoded; a one-line DataError naming it (or `name`) otherwise.
    formats: the Pillow formats accepted (e.g. PNG, JPEG); default any that Pillow reads."""
    name = source if name is None else name
    try:
        with contextlib.ExitStack() as opened:
            if isinstance(source, RemotePath):  # closed here: Pillow leaves a stream it was given open
                source = opened.enter_context(source.filesystem.open_input_file(source.path))
            image = opened.enter_context(open_checked(source, name))
            if formats is not None and image.format not in formats:
                raise DataError(f"{name}: a {image.format} image, expected {' or '.join(formats)}")
            check_8bit(image, name)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{name}: not a readable image ({err.__class__.__name__})") from None


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


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | CheckpointInfo, dataset: str | os.PathLike, split: str = "val",
    device: str = "cpu", batch_size: int = 8, tta: str | None = None,
) -> dict:
    """Every metric of the checkpoint on one split of a sharded dataset.

    Scored at each image's own resolution (predictions are resized up, as the KITTI benchmark scores),
    so on full-size data the figures differ a little from the val_* reported at the training size.
    tta: as for predict.
    """
    check_tta(tta)
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    manifest = read_manifest(dataset)
    dataset_classes = [entry["name"] for entry in manifest["classes"]]
    if dataset_classes != list(info.classes):
        raise DataError(f"{dataset}: its classes {dataset_classes} differ from the checkpoint's {info.classes}")
    paths = shard_paths(dataset, split)
    if not paths:
        raise DataError(f"{dataset}: no {split!r} shards")
    model = load_model(info, device)
    groups = metric_groups(manifest, split)
    metrics = SegmentationMetrics(model.config.num_classes, ignore_index=IGNORE_INDEX, class_names=info.classes, groups=groups)
    count = 0
    for path in paths:
        table = pq.read_table(path, columns=["id", "image", "mask", *["group"] * bool(groups)]).to_pydict()
        for start in range(0, len(table["image"]), batch_size):
            rows = {name: column[start : start + batch_size] for name, column in table.items()}
            images = [_decode(b, "RGB") for b in rows["image"]]
            masks = [_decode(b, None) for b in rows["mask"]]
            indices = group_indices(rows["group"], rows["id"], groups) if groups else [None] * len(masks)
            for probabilities, mask, index in zip(predict(model, images, batch_size=batch_size, tta=tta), masks, indices):
                probabilities = torch.from_numpy(probabilities)
                probabilities = probabilities[None, None] if probabilities.ndim == 2 else probabilities[None]
                group = None if index is None else torch.tensor([index])
                metrics.update(probabilities, torch.from_numpy(mask.astype(np.int64))[None], group)
                count += 1
    return {"split": split, "samples": count, **metrics.compute()}


def _decode(data: bytes, mode: str | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode) if mode else image)


def image_locations(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files and folders of images (local paths or URIs) -> each image's location, in order;
    a folder gives its files with an image suffix, sorted. Nothing is read but the listings."""
    found: list[str] = []
    for item in inputs:
        path = as_path(item)
        if path.is_dir():
            found += [join(item, child.name) for child in sorted(path.iterdir()) if child.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            found.append(os.fspath(item))
        else:
            raise DataError(f"{path}: no such file or directory")
    if not found:
        raise DataError(f"{', '.join(map(str, inputs))}: no images found")
    return found


def labels_of(probabilities: np.ndarray) -> np.ndarray:
    """The mask predict writes (class index per pixel, uint8; road = 1) of what predict returns."""
    return to_labels(probabilities[None] if probabilities.ndim == 2 else probabilities)


def masks_and_overlays(model: LoadedModel, arrays: Sequence[np.ndarray], batch_size: int = 8, tta: str | None = None):
    """(class index per pixel, the image with the prediction painted on) for each RGB array, at its own size."""
    from raytrain.viz import overlay

    for array, probabilities in zip(arrays, predict(model, arrays, batch_size=batch_size, tta=tta)):
        yield labels_of(probabilities), overlay(array, probabilities, model.classes)


def predict_files(
    checkpoint: str | os.PathLike | CheckpointInfo, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
    device: str = "cpu", batch_size: int = 8, progress=None, tta: str | None = None,
) -> list[Path]:
    """For each image: `<name>_mask.png` (class index per pixel; road = 1) and `<name>_overlay.png`
    (predicted road painted red, or the class palette), both at the image's own size. Inputs and
    `out_dir` are local paths or URIs.

    Files appear whole or not at all: each is written beside its final name, then renamed.
    """
    checked = check_prediction(checkpoint, inputs, out_dir, tta, device)
    model = checked.model
    paths = [as_path(location) for location in checked.locations]  # a URI's is a RemotePath, which read_rgb opens on its filesystem
    images = [(path, read_rgb(path)) for path in paths]  # all checked before any is used
    out = as_path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{out}: cannot create the output folder ({err.strerror or err})") from None
    write_prediction_record(out_dir, checked.record)
    written = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        results = masks_and_overlays(model, [array for _, array in chunk], batch_size, tta)
        for (path, _), (labels, painted) in zip(chunk, results):
            written.append(save_png(labels, out / mask_name(path.stem)))
            written.append(save_png(painted, out / overlay_name(path.stem)))
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    return written


# ---------------------------------------------------------------- the output folder of predict

PREDICTION_RECORD = "prediction.json"  # which weights and tta made the masks in an output folder


def _check_output_folder(out: str | os.PathLike) -> None:
    filesystem, folder = filesystem_of(as_path(out).expanduser())
    if filesystem.get_file_info(folder).type == pafs.FileType.File:
        raise DataError(f"{out}: exists and is not a folder (--out takes the folder for the masks)")


def _check_unique_names(locations: list[str]) -> None:
    first: dict[str, str] = {}
    for location in locations:
        stem = as_path(location).stem
        if stem in first:
            raise DataError(f"{first[stem]} and {location} share a file name; predict them into separate --out folders")
        first[stem] = location


@dataclass(frozen=True)
class CheckedPrediction:
    locations: list[str]  # the input images, in order
    model: LoadedModel
    files: dict[str, bytes]  # the checkpoint's files, for actors on other nodes
    record: dict[str, str]  # what makes the masks in the output folder: PREDICTION_RECORD


def check_prediction(
    checkpoint: str | os.PathLike | CheckpointInfo, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
    tta: str | None, device: str | torch.device = "cpu",
) -> CheckedPrediction:
    """Everything predict checks before it writes a file, cheapest first: tta, `out`, the input
    listing and its names, the checkpoint, and that `out` holds no masks of other weights or tta."""
    check_tta(tta)
    _check_output_folder(out)  # a wrong --out must not cost a model load
    locations = image_locations(inputs)
    _check_unique_names(locations)
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    model = load_model(info, device)
    files = checkpoint_files(info.path)  # model.pt read once more: hashed here, shipped by batch prediction
    record = {"checkpoint": str(info.path), "model_sha256": hashlib.sha256(files[MODEL_FILE]).hexdigest(), "tta": tta or "none"}
    _check_same_model(out, record)
    return CheckedPrediction(locations, model, files, record)


def _check_same_model(out: str | os.PathLike, record: dict[str, str]) -> None:
    """Masks already in `out` must come from the same weights and tta: a folder never mixes two models'."""
    filesystem, path = filesystem_of(join(out, PREDICTION_RECORD))
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return
    try:
        with filesystem.open_input_stream(path) as stream:
            earlier = json.loads(stream.read(1 << 16))
        same = all(earlier[key] == record[key] for key in ("model_sha256", "tta"))
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{join(out, PREDICTION_RECORD)}: not a record of raytrain predict; predict into a new --out") from None
    if not same:
        raise DataError(
            f"{out}: holds masks of another model or tta ({earlier.get('checkpoint')}, tta {earlier.get('tta')}); "
            "predict into a new --out, or delete that folder first"
        )


def write_prediction_record(out: str | os.PathLike, record: dict[str, str]) -> None:
    write_whole(as_path(join(out, PREDICTION_RECORD)), json.dumps(record, indent=1).encode())


def mask_name(stem: str) -> str:
    return f"{stem}_mask.png"


def overlay_name(stem: str) -> str:
    return f"{stem}_overlay.png"


def save_png(array: np.ndarray, path: Path | RemotePath) -> Path | RemotePath:
    """`array` as a PNG file at `path`, local or remote, that appears whole or not at all."""
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="PNG")
    return write_whole(path, encoded.getvalue())


def write_whole(path: Path | RemotePath, data: bytes) -> Path | RemotePath:
    """`data` as the file `path`, local or on a remote filesystem, whole or not at all."""
    if isinstance(path, Path):
        return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
    return write_remote_atomically(path, data)


def _umask() -> int:
    """The process's umask; /proc reads it without the brief os.umask() change other threads could see."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write) -> Path:
    """write(temporary path) beside `path`, then rename: the file appears whole or not at all, with
    the permissions open() would give it (it is made 0600). A failure leaves no temporary file
    and is a one-line RaytrainError naming `path`."""
    tmp = temporary_beside(str(path))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise RaytrainError(f"{path}: cannot write ({err.strerror or err})") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise RaytrainError(f"{path}: cannot write ({err.strerror or err})") from None
        raise
    return path


EXPORT_FORMATS = ("torchscript", "torch.export", "onnx")
EXPORT_NAMES = {"torchscript": "model.torchscript.pt", "torch.export": "model.pt2", "onnx": "model.onnx"}
METADATA_FILE = "raytrain.json"  # TorchScript's and torch.export's extra file; ONNX has metadata_props


def default_export_path(checkpoint: str | os.PathLike | CheckpointInfo, format: str) -> Path:
    """Beside the checkpoint's own files (a file:// URI is a local path); a remote checkpoint
    needs --out, since the export is always written locally."""
    if isinstance(checkpoint, CheckpointInfo):
        return checkpoint.path / EXPORT_NAMES.get(format, "model")
    if is_uri(checkpoint):
        filesystem, path = filesystem_of(checkpoint)
        if not isinstance(filesystem, pafs.LocalFileSystem):
            raise CheckpointError(f"{checkpoint}: a remote checkpoint; give --out, the local file to export to")
        return Path(path) / EXPORT_NAMES.get(format, "model")
    return Path(checkpoint).expanduser() / EXPORT_NAMES.get(format, "model")


def export_model(checkpoint: str | os.PathLike | CheckpointInfo, out: str | os.PathLike, format: str = "torchscript",
                 tta: str | None = None) -> Path:
    """A file that maps uint8 RGB images (N, H, W, 3) of any size to class probabilities
    (N, C, H, W) at that size, as predict does (resizing, normalisation and tta inside), and loads
    without raytrain: `torch.jit.load(out)`, `torch.export.load(out).module()` or
    `onnxruntime.InferenceSession(out)`. Its metadata holds the classes, training size and tta."""
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    check_tta(tta)
    if format == "onnx":
        _require_onnx()
    out = Path(out).expanduser()
    if out.is_dir():  # checked first: a wrong --out must not cost a model load and a trace
        raise CheckpointError(f"{out}: is a folder; --out takes the file to export to")
    model = load_model(checkpoint, "cpu")
    exported = _trace(ImageModel(model.module, model.config.data.size, tta).eval(), model.config.model.name, format)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{out.parent}: cannot create the output folder ({err.strerror or err})") from None
    metadata = export_metadata(model, tta)
    return write_atomically(out, lambda tmp: _save(exported, tmp, format, metadata))


def _require_onnx() -> None:
    try:  # torch.onnx needs both, and would say so only deep inside an export
        for name in ("onnx", "onnxscript"):
            importlib.import_module(name)
    except ImportError:
        raise RaytrainError("--format onnx needs the onnx packages: pip install 'raytrain[onnx]'") from None


def export_metadata(model: LoadedModel, tta: str | None) -> dict[str, str]:
    """What a user of an exported file needs to read its output, as strings (ONNX's metadata_props)."""
    from raytrain import __version__

    width, height = model.config.data.size
    return {"classes": json.dumps(model.classes), "training_size": f"{width}x{height}", "tta": tta or "none",
            "model": model.config.model.name, "raytrain_version": __version__}


def _save(exported, tmp: str, format: str, metadata: dict[str, str]) -> None:
    if format == "onnx":
        exported.model.metadata_props.update(metadata)
        return exported.save(tmp)
    extra = {METADATA_FILE: json.dumps(metadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if format == "torchscript":
            torch.jit.save(exported, tmp, _extra_files=extra)
        else:
            torch.export.save(exported, tmp, extra_files=extra)


def _trace(whole: ImageModel, name: str, format: str):
    width, height = whole.size
    # Batch 2 (torch.export would fix a batch of 1 as a constant), at neither the training size nor
    # a multiple of it, so that no size is taken for a constant.
    example = torch.zeros(2, height + 3, width + 5, 3, dtype=torch.uint8)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("height"), 2: torch.export.Dim("width")},)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and its tracer's shape warnings
            if format == "torchscript":
                return torch.jit.trace(whole, example, check_trace=False)
            if format == "onnx":
                return torch.onnx.export(whole, (example,), dynamo=True, dynamic_shapes=dims, verbose=False,
                                         input_names=["images"], output_names=["probabilities"])
            return torch.export.export(whole, (example,), dynamic_shapes=dims)
    except Exception as err:  # export failures are model-specific; say which model
        raise CheckpointError(f"{name}: cannot be exported as {format} ({first_line(err)})") from None
