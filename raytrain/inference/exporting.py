"""export: a checkpoint as one file that loads with torch (or onnxruntime) alone and gives predict's
numbers: uint8 RGB images of any size in, probabilities at that size out (image_model.ImageModel)."""
from __future__ import annotations

import importlib
import io
import json
import os
import warnings
from pathlib import Path

import torch

from raytrain.checkpoints import CheckpointInfo
from raytrain.errors import CheckpointError, RaytrainError, first_line
from raytrain.inference import EXPORT_FORMATS
from raytrain.inference.image_model import ImageModel, check_tta
from raytrain.inference.loading import LoadedModel, load_model
from raytrain.storage.atomic import write_atomically
from raytrain.storage.paths import filesystem_of, is_remote, is_uri


EXPORT_NAMES = {"torchscript": "model.torchscript.pt", "torch.export": "model.pt2", "onnx": "model.onnx"}


METADATA_FILE = "raytrain.json"  # TorchScript's and torch.export's extra file; ONNX has metadata_props
ONNX_MAX_BYTES = 2**31  # protobuf's limit on one message: a whole .onnx file, weights inside


def default_export_path(checkpoint: str | os.PathLike | CheckpointInfo, format: str) -> Path:
    """Beside the checkpoint's own files (a file:// URI is a local path); a remote checkpoint
    needs --out, since the export is always written locally."""
    if isinstance(checkpoint, CheckpointInfo):
        return checkpoint.path / EXPORT_NAMES.get(format, "model")
    if is_remote(checkpoint):  # known from the URI: no request to a store the export never writes to
        raise CheckpointError(f"{checkpoint}: a remote checkpoint; give --out, the local file to export to")
    if is_uri(checkpoint):
        return Path(filesystem_of(checkpoint)[1]) / EXPORT_NAMES.get(format, "model")
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
    # Serialised in memory, then written as bytes: torch's own file writers abort the process on a
    # full disk (a C++ exception), where a write of bytes is an OSError like any other.
    return write_atomically(out, _serialised(exported, format, export_metadata(model, tta)))


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


def _serialised(exported, format: str, metadata: dict[str, str]) -> bytes:
    """The exported file's bytes, its metadata inside."""
    if format == "onnx":
        weights = sum(v.const_value.nbytes for v in exported.model.graph.initializers.values() if v.const_value is not None)
        if weights >= ONNX_MAX_BYTES:
            raise CheckpointError(f"{metadata['model']}: {weights} bytes of weights, over ONNX's one-file limit of "
                                  f"{ONNX_MAX_BYTES}; export it as torchscript or torch.export")
        exported.model.metadata_props.update(metadata)
        return exported.model_proto.SerializeToString()
    extra, buffer = {METADATA_FILE: json.dumps(metadata)}, io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if format == "torchscript":
            torch.jit.save(exported, buffer, _extra_files=extra)
        else:
            torch.export.save(exported, buffer, extra_files=extra)
    return buffer.getvalue()


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
