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


def transform_block(block: dict, size, augment: Augment | None = None):
    """A whole read block -> transformed batches of ROWS_PER_TASK rows, yielded one at a time.

    Taking the block whole (map_batches with batch_size=None) lets Ray fuse this map into the
    Parquet read task; with a batch_size, Ray 2.60 keeps read and map apart and every encoded block
    takes an extra trip through the object store and an extra task (half the images/s on 2 CPUs).
    Yielding small batches keeps a task's memory bounded and its output streaming.
    """
    for start in range(0, len(block["id"]), ROWS_PER_TASK):
        rows = {name: column[start : start + ROWS_PER_TASK] for name, column in block.items()}
        yield transform_batch(rows, size, augment)


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
        transform_block, fn_kwargs={"size": data.size, "augment": augment_of(config)}, batch_size=None
    )
    val = read_shards(shard_paths(data.path, "val"), shuffle=False).map_batches(
        transform_block, fn_kwargs={"size": data.size}, batch_size=None
    )
    return {"train": train, "val": val}
