"""predict into a folder: `<name>_mask.png` and `<name>_overlay.png` for every input image, each
written whole or not at all, and OUT/prediction.json, which records the weights and tta that made
them so a folder never mixes two models' masks. The record is created exclusively before the first
mask, so of two predicts started together into one new folder only one writes there. One summary
type for this and the cluster's run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from PIL import Image

from raytrain.checkpoints import MODEL_FILE, CheckpointInfo, read_checkpoint
from raytrain.data.images import read_rgb
from raytrain.errors import DataError
from raytrain.inference.image_model import check_tta
from raytrain.inference.loading import LoadedModel, checkpoint_files, load_model
from raytrain.inference.prediction import masks_and_overlays
from raytrain.storage.atomic import create_exclusively, write_atomically
from raytrain.storage.paths import RemotePath, as_path, filesystem_of, join


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm"}


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


def image_locations(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files and folders of images (local paths or URIs) -> each image's location, in order;
    a folder gives its files with an image suffix, sorted. Nothing is read but the listings: what
    else than an image file a name may be (a FIFO, a device) the image reader says."""
    found: list[str] = []
    for item in inputs:
        path = as_path(item)
        if path.is_dir():
            found += [join(item, child.name) for child in sorted(path.iterdir()) if child.suffix.lower() in IMAGE_SUFFIXES]
        elif path.exists():
            found.append(os.fspath(item))
        else:
            raise DataError(f"{path}: no such file or directory")
    if not found:
        raise DataError(f"{', '.join(map(str, inputs))}: no images found")
    return found


def predict_files(
    checkpoint: str | os.PathLike | CheckpointInfo, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
    device: str = "cpu", batch_size: int = 8, progress=None, tta: str | None = None,
) -> PredictionSummary:
    """For each image: `<name>_mask.png` (class index per pixel; road = 1) and `<name>_overlay.png`
    (predicted road painted red, or the class palette), both at the image's own size. Inputs and
    `out_dir` are local paths or URIs.

    Files appear whole or not at all: each is written beside its final name, then renamed.
    """
    started = time.monotonic()
    checked = check_prediction(checkpoint, inputs, out_dir, tta, device)
    model = checked.model
    paths = [as_path(location) for location in checked.locations]  # a URI's is a RemotePath, which read_rgb opens on its filesystem
    images = [(path, read_rgb(path)) for path in paths]  # all checked before any is used
    out = as_path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{out}: cannot create the output folder ({err.strerror or err})") from None
    claim_output_folder(out_dir, checked.record)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        results = masks_and_overlays(model, [array for _, array in chunk], batch_size, tta)
        for (path, _), (labels, painted) in zip(chunk, results):
            save_png(labels, out / mask_name(path.stem))
            save_png(painted, out / overlay_name(path.stem))
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    return PredictionSummary(len(images), seconds=time.monotonic() - started)


PREDICTION_RECORD = "prediction.json"  # which weights and tta made the masks in an output folder
RECORD_WAIT_S = 0.5  # how long a record that another predict has just created may stay empty


def _check_output_folder(out: str | os.PathLike) -> None:
    filesystem, folder = filesystem_of(as_path(out).expanduser())
    if filesystem.get_file_info(folder).type == pafs.FileType.File:
        raise DataError(f"{out}: exists and is not a folder (--out takes the folder for the masks)")


def _check_names(locations: list[str]) -> None:
    """Each input's name makes its mask's: it must be UTF-8, and no two may share one."""
    first: dict[str, str] = {}
    for location in locations:
        stem = as_path(location).stem
        try:
            stem.encode("utf-8")
        except UnicodeEncodeError:  # bytes of another encoding, which Python holds as surrogates
            raise DataError(f"{location}: file name is not valid UTF-8; rename the file") from None
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
    _check_names(locations)
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    model = load_model(info, device)
    files = checkpoint_files(info.path)  # model.pt read once more: hashed here, shipped by batch prediction
    record = {"checkpoint": str(info.path), "model_sha256": hashlib.sha256(files[MODEL_FILE]).hexdigest(), "tta": tta or "none"}
    _check_same_model(out, record)
    return CheckedPrediction(locations, model, files, record)


def _check_same_model(out: str | os.PathLike, record: dict[str, str]) -> None:
    """Masks already in `out` must come from the same weights and tta: a folder never mixes two models'."""
    earlier = _earlier_record(out)
    if earlier is not None and not all(earlier[key] == record[key] for key in ("model_sha256", "tta")):
        raise DataError(
            f"{out}: holds masks of another model or tta ({earlier.get('checkpoint')}, tta {earlier.get('tta')}); "
            "predict into a new --out, or delete that folder first"
        )


def _earlier_record(out: str | os.PathLike) -> dict | None:
    """The record in `out`, None where there is none; one just created by another predict is waited
    for while it is empty."""
    location = join(out, PREDICTION_RECORD)
    filesystem, path = filesystem_of(location)
    not_a_record = DataError(f"{location}: not a record of raytrain predict; predict into a new --out")
    waited_until = time.monotonic() + RECORD_WAIT_S
    while True:
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            return None
        if kind != pafs.FileType.File:
            raise not_a_record
        try:
            with filesystem.open_input_stream(path) as stream:
                data = stream.read(1 << 16)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{location}: cannot read it ({' '.join(str(err).split())})") from None
        if data or time.monotonic() > waited_until:
            break
        time.sleep(0.01)
    if not data:
        raise DataError(f"{location}: empty: another predict is starting in {out}, or one was killed as it started "
                        "(then delete the file)")
    try:
        earlier = json.loads(data)
        if not all(isinstance(earlier[key], str) for key in ("model_sha256", "tta")):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise not_a_record from None
    return earlier


def claim_output_folder(out: str | os.PathLike, record: dict[str, str]) -> None:
    """Make the existing folder `out` the folder of `record`'s masks, before the first is written:
    the record is created exclusively (storage.atomic.create_exclusively), so of two predicts into one
    new folder one claims it and the other, of other weights or tta, is a one-line error. Into a
    folder of the same weights and tta (a rerun) it goes on."""
    if not create_exclusively(join(out, PREDICTION_RECORD), json.dumps(record, indent=1).encode()):
        _check_same_model(out, record)


def mask_name(stem: str) -> str:
    return f"{stem}_mask.png"


def overlay_name(stem: str) -> str:
    return f"{stem}_overlay.png"


def save_png(array: np.ndarray, path: Path | RemotePath) -> Path | RemotePath:
    """`array` as a PNG file at `path`, local or remote, that appears whole or not at all."""
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="PNG")
    return write_atomically(path, encoded.getvalue())
