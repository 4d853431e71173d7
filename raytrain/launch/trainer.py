"""One Ray Train run: a TorchTrainer of N DDP workers, each running training.loop.train_worker on
its part of the datasets that data.pipeline builds, checkpointing into the experiment directory."""
from __future__ import annotations

import threading
import time
from typing import Callable

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raytrain.config import Config
from raytrain.console import EPOCH_LINES, QUIET
from raytrain.data.manifest import Manifest
from raytrain.data.pipeline import FIRST_EPOCH, build_datasets
from raytrain.launch import tracking
from raytrain.launch.controller import EpochLines, ProgressRelay, SplitData, show_until
from raytrain.launch.session import ensure_ray, quiet_progress_warning, user_error_inside
from raytrain.preflight import cache_decision, decoded_bytes, human_size


TRAIN_RUN_NAME = "train"  # inside a trial directory: EXPERIMENT/<trial>/train/checkpoint_*


TENSORBOARD_DIR = "tensorboard"  # inside a run directory, written by rank 0


def train_worker(loop_config: dict) -> None:
    """training.loop.train_worker in a Ray Train worker, imported there only: the processes that only
    launch runs (the driver, each trial's Tune actor) skip importing the loop, its models and losses."""
    from raytrain.training.loop import train_worker as loop

    loop(loop_config, RayTrainRun())


class RayTrainRun:
    """training.loop's RunContext in a worker of a Ray Train run: Ray Train holds the record of its
    checkpoints (which to keep, the latest to restart from) and relays its reports."""

    def __init__(self):
        context = ray.train.get_context()
        self.world_rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self._storage = context.get_storage()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def storage(self) -> tuple:
        return self._storage.storage_filesystem, self._storage.experiment_fs_path

    def report(self, metrics: dict, directory: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=self._upload)

    def register(self, checkpoint: ray.train.Checkpoint, metrics: dict) -> None:
        # Every rank reports, rank 0 with the checkpoint, so that Ray Train's record, its kept
        # checkpoints and the run's result hold it.
        ray.train.report(metrics, checkpoint=checkpoint if self.world_rank == 0 else None,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    def _upload(self, checkpoint: ray.train.Checkpoint, directory_name: str) -> ray.train.Checkpoint:
        """Ray Train's upload of a reported checkpoint into the run's storage, done by
        checkpoints.upload_checkpoint: complete.json last, nothing left of an upload that fails."""
        from raytrain.checkpoints import upload_checkpoint

        destination = self._storage.build_checkpoint_path_from_name(directory_name)
        upload_checkpoint(checkpoint.path, self._storage.storage_filesystem, destination)
        return ray.train.Checkpoint(destination, filesystem=self._storage.storage_filesystem)


def cluster_datasets(config: Config, manifest: Manifest, verbosity: int = QUIET) -> dict[str, ray.data.Dataset]:
    """config's datasets on the running cluster: decoded by all its CPUs, and cached when data.cache
    and its object store allow (preflight.cache_decision; a note when auto streams instead)."""
    resources = ray.cluster_resources()
    cache, note = cache_decision(config, manifest, resources.get("object_store_memory"))
    if note and verbosity >= EPOCH_LINES:
        print(note, flush=True)
    started = time.perf_counter()
    with quiet_progress_warning():  # a cache is filled here, in the driver
        datasets = build_datasets(config, manifest, cpus=int(resources.get("CPU", 1)), cache=cache)
    if cache and verbosity >= EPOCH_LINES:
        size = human_size(decoded_bytes(config, manifest))
        print(f"data.cache: {size} decoded into Ray's object store in {time.perf_counter() - started:.1f} s", flush=True)
    return datasets


def make_trainer(
    config: Config,
    manifest: Manifest,
    *,
    storage_path: str,
    name: str,
    train_fn: Callable[[dict], None] = train_worker,
    callbacks: list | None = None,
    initial_checkpoint: ray.train.Checkpoint | None = None,
    datasets: dict[str, ray.data.Dataset] | None = None,
    progress: ProgressRelay | None = None,
) -> TorchTrainer:
    """manifest: config.data.path's, read once on the driver; the workers get it with the config.
    initial_checkpoint: where a new run starts (PBT's copy of a better trial); a run restarted after
    a failure carries on from its own latest checkpoint instead.
    datasets: cluster_datasets' (a search shares them between its trials); made here when None.
    progress: where rank 0 tells how far each epoch is (the driver draws it)."""
    datasets = datasets if datasets is not None else cluster_datasets(config, manifest)
    train = config.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config=trainer_loop_config(config, manifest, f"{storage_path}/{name}", initial_checkpoint, datasets,
                                              progress),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=checkpoint_retention(config),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=SplitData(),
    )


def trainer_loop_config(config: Config, manifest: Manifest, run_folder: str, initial_checkpoint, datasets: dict,
                        progress: ProgressRelay | None) -> dict:
    """training.loop.train_worker's loop_config for a run whose checkpoints go in `run_folder`."""
    return {
        "config": config.model_dump(mode="json"),
        "manifest": manifest,
        "log_dir": f"{run_folder}/{TENSORBOARD_DIR}",
        "initial_checkpoint": initial_checkpoint,
        "cached_train": datasets.get(FIRST_EPOCH),  # later epochs: data.pipeline.cached_epoch
        "progress": progress,
    }


def checkpoint_retention(config: Config) -> CheckpointConfig:
    """Which checkpoints a run keeps: those that can stand for it by search.select. For best, the
    train.checkpoints_to_keep best by search.metric; for last and mean_last, whose checkpoint is the
    last epoch's, the latest (Ray keeps the most recent when no score attribute is given)."""
    by_metric = config.search.select == "best"
    return CheckpointConfig(
        num_to_keep=config.train.checkpoints_to_keep,
        checkpoint_score_attribute=config.search.metric if by_metric else None,
        checkpoint_score_order=config.search.mode,
    )


def storage_and_name(experiment: str) -> tuple[str, str]:
    """(storage path, name) as Ray Train and Tune take an experiment directory."""
    parent, name = experiment.rstrip("/").rsplit("/", 1)
    return parent, name


def run_training(config: Config, manifest: Manifest, experiment: str, *, num_cpus: int | None = None,
                 verbosity: int = QUIET) -> ray.train.Result:
    """One run into `experiment` (a new directory, or one to continue from its last checkpoint), on
    the cluster in RAY_ADDRESS or a local one of `num_cpus` logical CPUs."""
    ensure_ray(num_cpus, verbosity=verbosity)
    storage_path, name = storage_and_name(experiment)
    lines = EpochLines(config.name, config.train.epochs) if verbosity >= EPOCH_LINES else None
    done = threading.Event()
    printer = show_until(lines.queue, done) if lines else None
    try:
        callbacks = [*([lines] if lines else []), *tracking.train_callbacks(config, experiment)]
        datasets = cluster_datasets(config, manifest, verbosity)
        progress = ProgressRelay(lines.queue, config.name, config.train.epochs) if lines else None
        return make_trainer(config, manifest, storage_path=storage_path, name=name, callbacks=callbacks or None,
                            datasets=datasets, progress=progress).fit()
    except Exception as err:
        user_error = user_error_inside(err, writing=experiment)
        if user_error is None:
            raise
        raise user_error from None
    finally:
        done.set()
        if printer:
            printer.join(timeout=5)
