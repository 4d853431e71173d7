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


def augment_of(config: Config) -> Augment | None:
    """The training augmentation the config asks for; None when data.augment is off."""
    data = config.data
    return Augment(data.hflip, tuple(data.scale), data.color_jitter) if data.augment else None


def read_shards(paths: list[str], *, shuffle: bool) -> ray.data.Dataset:
    """One read task (and one block) per shard file, files in a new random order each epoch if `shuffle`.

    Ray 2.60's default Parquet reader (DataSourceV2) packs small files into few read tasks, and
    each block is then decoded by a single task: measured on 2 CPUs, one task did all the work
    and listing the files took seconds every epoch. The V1 reader with a block per file streams
    from the first file and keeps every CPU decoding (benchmarks/ingest.py).
    """
    context = ray.data.DataContext.get_current()
    default_reader = context.use_datasource_v2
    context.use_datasource_v2 = False  # read at plan time: the dataset keeps the V1 read
    try:
        return ray.data.read_parquet(
            paths, shuffle="files" if shuffle else None, override_num_blocks=max(1, len(paths))
        ).select_columns(COLUMNS)
    finally:
        context.use_datasource_v2 = default_reader


def build_datasets(config: Config) -> dict[str, ray.data.Dataset]:
    data = config.data
    train = read_shards(shard_paths(data.path, "train"), shuffle=True).map_batches(
        transform_batch, fn_kwargs={"size": data.size, "augment": augment_of(config)}, batch_size=ROWS_PER_TASK
    )
    val = read_shards(shard_paths(data.path, "val"), shuffle=False).map_batches(
        transform_batch, fn_kwargs={"size": data.size}, batch_size=ROWS_PER_TASK
    )
    return {"train": train, "val": val}
