"""Ray Data: Parquet shards -> decoded, resized, augmented batches for the Train workers.

Decoding runs in Ray Data tasks, not in the training processes; Ray Train's DataConfig then
streams each worker its own disjoint part (see launch.trainer.SplitData). Every epoch is a new Ray Data
execution, so what it costs to start one is paid every epoch (docs/decisions.md).
"""
from __future__ import annotations

import ray.data

from raytrain.config import Config
from raytrain.data.manifest import Manifest, group_indices
from raytrain.data.transforms import Augment, transform_batch

COLUMNS = ["id", "image", "mask"]
ROWS_PER_TASK = 16


def augment_of(config: Config) -> Augment | None:
    """The training augmentation the config asks for; None when data.augment is off."""
    data = config.data
    if not data.augment:
        return None
    return Augment(data.hflip, tuple(data.scale), data.color_jitter, data.blur, tuple(data.blur_sigma), data.noise)


def transform_block(block: dict, size, augment: Augment | None = None, seed: int | None = None,
                    groups: list[str] | None = None):
    """A whole read block -> transformed batches of ROWS_PER_TASK rows, yielded one at a time.

    Taken whole (map_batches with batch_size=None) so that Ray fuses this map into the Parquet read
    task; the small batches bound the decoding's scratch memory, and Ray still packs what a task
    yields into one block per task. Why both: docs/decisions.md ("Decode inside the read task").
    With a seed, each sample's augmentation depends on (seed, epoch, its id) only. With `groups`,
    each row's group becomes its index into them ("group"), which the metrics count by.
    """
    epoch = execution_index() if augment is not None and seed is not None else 0
    for start in range(0, len(block["id"]), ROWS_PER_TASK):
        rows = {name: column[start : start + ROWS_PER_TASK] for name, column in block.items()}
        batch = transform_batch(rows, size, augment, seed=seed, epoch=epoch)
        if groups:
            batch["group"] = group_indices(rows["group"], rows["id"], groups)
        yield batch


def execution_index() -> int:
    """In a Ray Data task: which execution of its dataset this is, from 0. Every epoch of a Ray Train
    run executes the dataset anew, so this is the epoch (counted from the run's or the restarted
    worker group's start).

    Ray has no public API for it. Ray 2.60's ExecutionIdxUpdateCallback increments the private
    DataContext._execution_idx after each successful execution, and map tasks run under their
    operator's DataContext; FileShuffleConfig reseeds from the same counter. It is private, which is
    one reason pyproject.toml pins Ray below the next minor version (tests/test_pipeline.py checks it).
    """
    return ray.data.DataContext.get_current()._execution_idx


def read_shards(paths: list[str], *, shuffle: bool, seed: int | None = None, columns: list[str] = COLUMNS) -> ray.data.Dataset:
    """One read task (and one block) per shard file, files in a new random order each epoch if `shuffle`:
    with a seed, an order drawn from (seed, epoch), the same in every run.

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
        return ray.data.read_parquet(paths, shuffle=order, override_num_blocks=max(1, len(paths))).select_columns(columns)
    finally:
        context.use_datasource_v2, context.op_resource_reservation_enabled = saved


def build_datasets(config: Config, manifest: Manifest) -> dict[str, ray.data.Dataset]:
    """The train and val datasets of config.data.path, whose manifest is `manifest`."""
    data = config.data
    seed = config.train.seed
    train = read_shards(manifest.shard_paths("train"), shuffle=True, seed=seed).map_batches(
        transform_block, fn_kwargs={"size": data.size, "augment": augment_of(config), "seed": seed}, batch_size=None
    )
    groups = manifest.metric_groups("val")  # val metrics per group: rows carry their group
    val = read_shards(manifest.shard_paths("val"), shuffle=False, columns=COLUMNS + ["group"] * bool(groups)).map_batches(
        transform_block, fn_kwargs={"size": data.size, "groups": groups}, batch_size=None
    )
    return {"train": train, "val": val}
