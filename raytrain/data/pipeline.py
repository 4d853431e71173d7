"""Ray Data: Parquet shards -> decoded uint8 batches at the training size, for the Train workers.

Ray Data tasks only decode and resize; augmentation runs batched on each worker's device
(training/augment.py). Ray Train's DataConfig streams each worker its own disjoint part (see
launch.controller.SplitData). A decoded split that fits the object store's budget is kept there
after one pass (data.cache), so later epochs and later trials decode nothing; otherwise every epoch
is a new Ray Data execution that decodes again (docs/decisions.md).
"""
from __future__ import annotations

import math

import ray.data

from raytrain.config import Config
from raytrain.data.manifest import Manifest, group_indices
from raytrain.data.transforms import decode_batch

COLUMNS = ["id", "image", "mask"]
ROWS_PER_TASK = 16
# The train split's first epoch when the split is cached: the streamed order, which later epochs
# reshuffle by block (cached_epoch).
FIRST_EPOCH = "train_first_epoch"


def decode_block(block: dict, size, groups: list[str] | None = None, dataset: str = ""):
    """A whole read block -> decoded batches of ROWS_PER_TASK rows, yielded one at a time.

    Taken whole (map_batches with batch_size=None) so that, with one block per file, Ray fuses this
    map into the Parquet read task; the small batches bound the decoding's scratch memory, and Ray
    still packs what a task yields into one block per task. With `groups`, each row's group becomes
    its index into them ("group"), which the metrics count by. `dataset` names the rows in errors.
    """
    for start in range(0, len(block["id"]), ROWS_PER_TASK):
        rows = {name: column[start : start + ROWS_PER_TASK] for name, column in block.items()}
        batch = decode_batch(rows, size, dataset)
        if groups:
            batch["group"] = group_indices(rows["group"], rows["id"], groups)
        yield batch


def read_blocks(files: int, rows: int, cpus: int) -> int:
    """Blocks to read a split into: one per file, or, with fewer files than CPUs, enough blocks of at
    least ROWS_PER_TASK rows for every CPU. Ray then splits each file's rows into blocks and decodes
    them in a map of their own (a read split further does not fuse with the map), so the decode's
    parallelism no longer depends on how many files a split has."""
    return max(files, min(cpus, math.ceil(rows / ROWS_PER_TASK)))


def read_shards(paths: list[str], *, shuffle: bool, seed: int | None = None, columns: list[str] = COLUMNS,
                blocks: int | None = None) -> ray.data.Dataset:
    """A read of `paths` into `blocks` blocks (default one per file), files in a new random order each
    epoch if `shuffle`: with a seed, an order drawn from (seed, epoch), the same in every run.

    The read is Ray Data's V1 Parquet reader, and Ray Data's per-operator resource allocator is off
    for these datasets: Ray core's CPU slots still bound the tasks, and the executor's output
    backpressure the object store. Why, with the measurements: docs/decisions.md ("V1 Parquet reader,
    one task per file" and "Ray Data's resource allocator off").
    """
    context = ray.data.DataContext.get_current()
    saved = context.use_datasource_v2, context.op_resource_reservation_enabled
    # A dataset keeps the context it was made with: the V1 read at plan time, no allocator when run.
    context.use_datasource_v2, context.op_resource_reservation_enabled = False, False
    try:
        # Reseeded from (seed, execution index) every execution. The new dataset copies the driver's
        # DataContext, whose index stays 0: executions advance only their own dataset's copy.
        order = ray.data.FileShuffleConfig(seed=seed) if shuffle else None
        blocks = blocks or max(1, len(paths))
        return ray.data.read_parquet(paths, shuffle=order, override_num_blocks=blocks).select_columns(columns)
    finally:
        context.use_datasource_v2, context.op_resource_reservation_enabled = saved


def decoded_split(manifest: Manifest, split: str, size, cpus: int, *, shuffle: bool, seed: int | None = None) -> ray.data.Dataset:
    """One split of the dataset, decoded and resized to `size` by every one of `cpus` CPUs."""
    paths = manifest.shard_paths(split)
    groups = manifest.metric_groups(split) if split == "val" else []  # val metrics per group
    blocks = read_blocks(len(paths), manifest.count(split), cpus)
    columns = COLUMNS + ["group"] * bool(groups)
    return read_shards(paths, shuffle=shuffle, seed=seed, columns=columns, blocks=blocks).map_batches(
        decode_block, fn_kwargs={"size": size, "groups": groups, "dataset": manifest.location}, batch_size=None
    )


def build_datasets(config: Config, manifest: Manifest, *, cpus: int, cache: bool) -> dict[str, ray.data.Dataset]:
    """The datasets of config.data.path, whose manifest is `manifest`, for a cluster of `cpus` CPUs.

    cache: decode both splits once now, into the object store. Train's first epoch then reads them in
    the order a streamed first epoch would (FIRST_EPOCH), and every later epoch in a new block order
    drawn from (seed, epoch) (cached_epoch, from FIRST_EPOCH's blocks: there is no "train"); without
    a cache, every epoch decodes its files again, in a new file order.
    """
    seed = config.train.seed
    train = decoded_split(manifest, "train", config.data.size, cpus, shuffle=True, seed=seed)
    val = decoded_split(manifest, "val", config.data.size, cpus, shuffle=False)
    if not cache:
        return {"train": train, "val": val}
    for split in (train, val):  # the cache keeps the blocks in the dataset's order, not their tasks' finishing order
        split.context.execution_options.preserve_order = True
    return {FIRST_EPOCH: train.materialize(), "val": val.materialize()}


def cached_epoch(split: ray.data.MaterializedDataset, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1) -> ray.data.Dataset:
    """Worker `rank`'s part of a later epoch of a cached split: its blocks in an order drawn from
    (seed, epoch) alone, then, for several workers, the rank's share of equal rows (DDP needs the
    same number of steps on every worker; Dataset.split's equal split drops fewer than world_size
    rows). Every worker computes the same order and the same split, without Ray Data's reseeding
    per execution (why: docs/decisions.md, the decoded cache)."""
    shuffled = split.randomize_block_order(seed=seed * 10_007 + epoch)
    if world_size == 1:
        return shuffled
    return shuffled.materialize().split(world_size, equal=True)[rank]
