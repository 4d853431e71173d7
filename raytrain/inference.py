"""What a trained checkpoint is for: load it, predict images, evaluate it on a sharded dataset,
predict files, export it. No Ray: a checkpoint loads with torch and raytrain alone.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from raytrain.checkpoints import MODEL_FILE, CheckpointInfo, read_checkpoint
from raytrain.config import Config
from raytrain.data.transforms import to_model_input
from raytrain.data.formats import IGNORE_INDEX, check_8bit, open_checked
from raytrain.data.shards import read_manifest, shard_paths
from raytrain.errors import CheckpointError, DataError
from raytrain.metrics import SegmentationMetrics
from raytrain.models import create_model, to_probabilities

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm"}


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
        with open_checked(image, image) as opened:
            check_8bit(opened, image)
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


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | CheckpointInfo, dataset: str | os.PathLike, split: str = "val",
    device: str = "cpu", batch_size: int = 8,
) -> dict:
    """Every metric of the checkpoint on one split of a sharded dataset.

    Scored at each image's own resolution (predictions are resized up, as the KITTI benchmark scores),
    so on full-size data the figures differ a little from the val_* reported at the training size.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    dataset_classes = [entry["name"] for entry in read_manifest(dataset)["classes"]]
    if dataset_classes != list(info.classes):
        raise DataError(f"{dataset}: its classes {dataset_classes} differ from the checkpoint's {info.classes}")
    paths = shard_paths(dataset, split)
    if not paths:
        raise DataError(f"{dataset}: no {split!r} shards")
    model = load_model(info, device)
    metrics = SegmentationMetrics(model.raytrain_config.num_classes, ignore_index=IGNORE_INDEX, class_names=info.classes)
    count = 0
    for path in paths:
        table = pq.read_table(path, columns=["image", "mask"]).to_pydict()
        for start in range(0, len(table["image"]), batch_size):
            images = [_decode(b, "RGB") for b in table["image"][start : start + batch_size]]
            masks = [_decode(b, None) for b in table["mask"][start : start + batch_size]]
            for probabilities, mask in zip(predict(model, images, batch_size=batch_size), masks):
                probabilities = torch.from_numpy(probabilities)
                probabilities = probabilities[None, None] if probabilities.ndim == 2 else probabilities[None]
                metrics.update(probabilities, torch.from_numpy(mask.astype(np.int64))[None])
                count += 1
    return {"split": split, "samples": count, **metrics.compute()}


def _decode(data: bytes, mode: str | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode) if mode else image)


def read_images(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, np.ndarray]]:
    """Image files and folders of images -> (path, RGB array); every file is checked before any is used."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not files:
        raise DataError(f"{', '.join(map(str, inputs))}: no images found")
    images = []
    for path in files:
        try:
            with open_checked(path, path) as image:
                check_8bit(image, path)
                images.append((path, np.asarray(image.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: not a readable image ({err.__class__.__name__})") from None
    return images


def predict_files(
    checkpoint: str | os.PathLike | CheckpointInfo, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
    device: str = "cpu", batch_size: int = 8, progress=None,
) -> list[Path]:
    """For each image: `<name>_mask.png` (class index per pixel; road = 1) and `<name>_overlay.png`
    (predicted road painted red, or the class palette), both at the image's own size.

    Files appear whole or not at all: each is written beside its final name, then renamed.
    """
    from raytrain.viz import overlay

    model = load_model(checkpoint, device)
    classes = model.raytrain_config.classes
    images = read_images(inputs)
    names = [path.stem for path, _ in images]
    if len(set(names)) != len(names):
        raise DataError("two inputs share a file name; predict them into separate --out folders")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        arrays = [array for _, array in chunk]
        for (path, array), probabilities in zip(chunk, predict(model, arrays, batch_size=batch_size)):
            labels = (probabilities > 0.5) if probabilities.ndim == 2 else probabilities.argmax(0)
            written.append(_save_png(labels.astype(np.uint8), out / f"{path.stem}_mask.png"))
            written.append(_save_png(overlay(array, probabilities, classes), out / f"{path.stem}_overlay.png"))
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    return written


def _save_png(array: np.ndarray, path: Path) -> Path:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp.name, path)
    return path


EXPORT_FORMATS = ("torchscript", "torch.export")


def export_model(checkpoint: str | os.PathLike | CheckpointInfo, out: str | os.PathLike, format: str = "torchscript") -> Path:
    """A file that maps a normalised (N, 3, H, W) float batch to logits and loads without raytrain:
    `torch.jit.load(out)` (torchscript) or `torch.export.load(out).module()` (torch.export, the
    format PyTorch now recommends). Traced at the training size."""
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    model = load_model(checkpoint, "cpu")
    width, height = model.raytrain_config.data.size
    example = torch.zeros(2, 3, height, width)  # batch 2: torch.export would fix a batch of 1 as a constant
    batch = ({0: torch.export.Dim("batch")},)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ marks TorchScript deprecated; it still works
            exported = torch.jit.trace(model, example, check_trace=False) if format == "torchscript" else torch.export.export(model, (example,), dynamic_shapes=batch)
    except Exception as err:  # export failures are model-specific; say which model
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CheckpointError(f"{model.raytrain_config.model.name}: cannot be exported as {format} ({reason})") from None
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix, delete=False) as tmp:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(exported, tmp.name) if format == "torchscript" else torch.export.save(exported, tmp.name)
    os.replace(tmp.name, out)
    return out
