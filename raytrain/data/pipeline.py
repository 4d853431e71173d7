"""Ray Data: Parquet shards -> decoded, resized, augmented batches for the Train workers.

Decoding runs in Ray Data tasks, not in the training processes; Ray Train's DataConfig then
streams each worker its own disjoint part (see launch.SplitData).
"""
from __future__ import annotations

import ray.data

from raytrain.config import Config
from raytrain.data.shards import shard_paths
from raytrain.data.transforms import Augment, transform_batch

COLUMNS = ["id", "image", "mask"]
ROWS_PER_TASK = 16


def build_datasets(config: Config) -> dict[str, ray.data.Dataset]:
    data = config.data
    augment = Augment(data.hflip, tuple(data.scale), data.color_jitter) if data.augment else None
    train = (
        ray.data.read_parquet(shard_paths(data.path, "train"))
        .select_columns(COLUMNS)
        .randomize_block_order()
        .map_batches(transform_batch, fn_kwargs={"size": data.size, "augment": augment}, batch_size=ROWS_PER_TASK)
    )
    val = ray.data.read_parquet(shard_paths(data.path, "val")).select_columns(COLUMNS).map_batches(
        transform_batch, fn_kwargs={"size": data.size}, batch_size=ROWS_PER_TASK
    )
    return {"train": train, "val": val}
