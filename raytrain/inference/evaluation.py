"""evaluate: every metric of a checkpoint on one split of a sharded dataset, at each image's own size."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import torch

from raytrain.checkpoints import CheckpointInfo, read_checkpoint
from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.images import read_labels, read_rgb
from raytrain.data.manifest import SPLITS, group_indices, read_manifest
from raytrain.data.transforms import row_name
from raytrain.errors import DataError
from raytrain.inference.image_model import check_tta
from raytrain.inference.loading import load_model
from raytrain.inference.prediction import predict
from raytrain.metrics import SegmentationMetrics


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | CheckpointInfo, dataset: str | os.PathLike, split: str = "val",
    device: str = "cpu", batch_size: int = 8, tta: str | None = None, progress=None,
) -> dict:
    """Every metric of the checkpoint on one split of a sharded dataset.

    Scored at each image's own resolution (predictions are resized up, as the KITTI benchmark scores),
    so on full-size data the figures differ a little from the val_* reported at the training size.
    tta: as for predict. progress: called with (images done, total) after each batch.
    """
    check_tta(tta)
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint(checkpoint)
    manifest = read_manifest(dataset)
    if manifest.class_names != list(info.classes):
        raise DataError(f"{dataset}: its classes {manifest.class_names} differ from the checkpoint's {info.classes}")
    paths = manifest.shard_paths(split)
    if not paths:
        raise DataError(f"{dataset}: no {split!r} shards")
    model = load_model(info, device)
    groups = manifest.metric_groups(split)
    metrics = SegmentationMetrics(model.config.num_classes, ignore_index=IGNORE_INDEX, class_names=info.classes, groups=groups)
    count = 0
    for path in paths:
        table = pq.read_table(path, columns=["id", "image", "mask", *["group"] * bool(groups)]).to_pydict()
        for start in range(0, len(table["image"]), batch_size):
            rows = {name: column[start : start + batch_size] for name, column in table.items()}
            images = [read_rgb(data, row_name(path, sample_id)) for sample_id, data in zip(rows["id"], rows["image"])]
            masks = [read_labels(data, row_name(path, sample_id)) for sample_id, data in zip(rows["id"], rows["mask"])]
            indices = group_indices(rows["group"], rows["id"], groups) if groups else [None] * len(masks)
            predicted = predict(model, images, batch_size=batch_size, tta=tta)
            for probabilities, mask, index, sample_id in zip(predicted, masks, indices, rows["id"]):
                probabilities = torch.from_numpy(probabilities)
                probabilities = probabilities[None, None] if probabilities.ndim == 2 else probabilities[None]
                group = None if index is None else torch.tensor([index])
                metrics.update(probabilities, torch.from_numpy(mask.astype(np.int64))[None], group, ids=[sample_id])
                count += 1
            if progress:
                progress(count, manifest.count(split))
    return {"split": split, "samples": count, **metrics.compute()}
