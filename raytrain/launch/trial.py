"""A one-worker trial trained in Ray Tune's own trial actor, with no Ray Train run: a Train run would
start its controller, worker, placement-group cleaner, barrier and dataset manager, one process
after another, for a worker that has no one to synchronise with (docs/decisions.md). The loop and
the experiment's layout are a Train run's: checkpoints in TRIAL/train/checkpoint_*, TensorBoard
beside them."""
from __future__ import annotations

import contextlib
import math
from datetime import datetime

import ray
import ray.train
import ray.tune

from raytrain.checkpoints import checkpoints_by_epoch, upload_checkpoint
from raytrain.config import Config
from raytrain.data.manifest import Manifest
from raytrain.launch.controller import ProgressRelay, relays_checkpoint, single_reader
from raytrain.launch.trainer import cluster_datasets, trainer_loop_config
from raytrain.storage.paths import filesystem_of


CHECKPOINT_NAME = "checkpoint_%Y-%m-%d_%H-%M-%S.%f"  # Ray Train's, so that both kinds of run look alike


class TrialRun:
    """training.loop's RunContext in a trial actor: the run's record of checkpoints is its folder,
    pruned as Ray Train's CheckpointConfig would (the best train.checkpoints_to_keep by the score,
    or the latest, and always the latest); each epoch's metrics go to Tune, with the checkpoint on
    PBT's epochs. A trial that Tune restarts (a failure) carries on from its folder's latest."""

    world_rank, world_size = 0, 1

    def __init__(self, config: Config, datasets: dict, run_folder: str, checkpoint_every: int | None):
        self.config, self.datasets, self.checkpoint_every = config, datasets, checkpoint_every
        self.filesystem, self.folder = filesystem_of(run_folder)
        self.filesystem.create_dir(self.folder, recursive=True)
        # Oldest first, the latest last: (metrics, path) of every checkpoint the run holds.
        self.kept = [(metrics, path) for _, path, metrics in reversed(checkpoints_by_epoch(self.filesystem, self.folder))]

    def device(self):
        import torch

        return torch.device("cuda") if self.config.train.use_gpu and ray.get_gpu_ids() else torch.device("cpu")

    def prepare_model(self, model):
        return model.to(self.device())

    def dataset(self, name: str):
        return single_reader(self.datasets[name])

    def checkpoint(self) -> None:
        return None  # no record besides the folder, which the loop reads for its latest

    def storage(self) -> tuple:
        return self.filesystem, self.folder

    def report(self, metrics: dict, directory: str | None) -> None:
        destination = f"{self.folder}/{datetime.now().strftime(CHECKPOINT_NAME)}"
        upload_checkpoint(directory, self.filesystem, destination)
        self.kept.append((metrics, destination))
        self._prune()
        relay = relays_checkpoint(metrics["epoch"], self.checkpoint_every, self.config.train.epochs)
        ray.tune.report(metrics, checkpoint=ray.train.Checkpoint(destination, filesystem=self.filesystem) if relay else None)

    def register(self, checkpoint: ray.train.Checkpoint, metrics: dict) -> None:
        pass  # the folder is the record, and Tune had the epoch's metrics when it was saved

    def _prune(self) -> None:
        gone = checkpoints_to_delete(self.kept, self.config)
        for path in gone:
            with contextlib.suppress(OSError):
                self.filesystem.delete_dir(path)
        self.kept = [(metrics, path) for metrics, path in self.kept if path not in gone]


def checkpoints_to_delete(kept: list[tuple[dict, str]], config: Config) -> list[str]:
    """Of a run's checkpoints, (metrics, path) oldest first, the paths that Ray Train's
    checkpoint_retention would delete: all but the train.checkpoints_to_keep best by search.metric
    (select: best; a checkpoint without the metric ranks last) or, for last and mean_last, the most
    recent; never the latest."""
    keep = config.train.checkpoints_to_keep
    ranked = list(kept)
    if config.search.select == "best":
        metric, sign = config.search.metric, 1 if config.search.mode == "max" else -1
        ranked.sort(key=lambda entry: -math.inf if entry[0].get(metric) is None else sign * entry[0][metric])
    latest = kept[-1][1] if kept else None
    return [path for _, path in ranked[:-keep] if path != latest] if len(kept) > keep else []


def train_in_trial(config: Config, manifest: Manifest, run_folder: str, initial_checkpoint: ray.train.Checkpoint | None,
                   datasets: dict | None, progress: ProgressRelay | None, checkpoint_every: int | None) -> None:
    """training.loop.train_worker in this trial's actor, as trainer.make_trainer's run would train:
    its checkpoints in run_folder, from initial_checkpoint if given; `datasets` as make_trainer's."""
    from raytrain.training.loop import train_worker  # here: the driver never needs it

    datasets = datasets if datasets is not None else cluster_datasets(config, manifest)
    loop_config = trainer_loop_config(config, manifest, run_folder, initial_checkpoint, datasets, progress)
    train_worker(loop_config, TrialRun(config, datasets, run_folder, checkpoint_every))
