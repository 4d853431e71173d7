"""The only place that builds Ray Train trainers and Ray Tune tuners.

    train(config): one TorchTrainer run of N DDP workers.
    tune(config):  a Tuner whose every trial is such a run, over config.search.space.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import ray
import ray.train
import ray.tune
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from raytrain.config import Config
from raytrain.data.pipeline import build_datasets
from raytrain.loop import train_worker

TRAIN_RUN_NAME = "train"  # inside a trial directory: EXPERIMENT/<trial>/train/checkpoint_*


class SplitData(DataConfig):
    """Train is split into equal parts (DDP needs the same number of steps on every worker);
    val is split unevenly so that every val sample is evaluated exactly once per epoch."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name == "train"))):
                output[rank][name] = split
        return output


def storage_root(config: Config) -> str:
    path = config.train.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one with explicit logical CPUs."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        # The dashboard stays on: its State API is how Ray Train frees the workers of stopped trials.
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=False)


def make_trainer(
    config: Config,
    *,
    storage_path: str,
    name: str,
    train_fn: Callable[[dict], None] = train_worker,
    callbacks: list | None = None,
) -> TorchTrainer:
    train = config.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.checkpoints_to_keep,
                checkpoint_score_attribute=config.search.metric,
                checkpoint_score_order=config.search.mode,
            ),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=callbacks,
        ),
        datasets=build_datasets(config),
        dataset_config=SplitData(),
    )


def train(config: Config) -> ray.train.Result:
    ensure_ray()
    return make_trainer(config, storage_path=storage_root(config), name=config.name).fit()


def _run_trial(params: dict, base: dict) -> None:
    """One Tune trial: the base config with this trial's sampled values, trained by Ray Train."""
    config = Config.model_validate(base).with_overrides(params.get("search", {}))
    context = ray.tune.get_context()
    trial_path = f"{storage_root(config)}/{context.get_experiment_name()}/{_trial_dirname(context.get_trial_id())}"
    make_trainer(config, storage_path=trial_path, name=TRAIN_RUN_NAME, callbacks=[TuneReportCallback()]).fit()


def _trial_dirname(trial_id: str) -> str:
    return f"trial_{trial_id}"


def _trial_dirname_of(trial) -> str:
    return _trial_dirname(trial.trial_id)


def _search_space(config: Config) -> dict:
    samplers = {
        "choice": ray.tune.choice,
        "grid": ray.tune.grid_search,
        "uniform": lambda values: ray.tune.uniform(*values),
        "loguniform": lambda values: ray.tune.loguniform(*values),
        "randint": lambda values: ray.tune.randint(values[0], values[1] + 1),  # inclusive high
    }
    space = {}
    for key, spec in config.search.space.items():
        (kind, values), = spec.items()
        space[key] = samplers[kind](values)
    return space


def _scheduler(config: Config):
    scheduler = config.search.scheduler
    if scheduler.name == "asha":
        return ray.tune.schedulers.ASHAScheduler(
            time_attr="epoch",
            max_t=config.train.epochs,
            grace_period=scheduler.grace_period,
            reduction_factor=scheduler.reduction_factor,
        )
    return ray.tune.schedulers.FIFOScheduler()


def tune(config: Config, *, resume: bool = False) -> ray.tune.ResultGrid:
    ensure_ray()
    trainable = ray.tune.with_parameters(_run_trial, base=config.model_dump(mode="json"))
    # The trial function only drives a Train run and the workers ask for their own resources;
    # Tune cannot schedule a trial that asks for nothing, so it takes a token share of a CPU.
    trainable = ray.tune.with_resources(trainable, {"CPU": 0.01})
    experiment = f"{storage_root(config)}/{config.name}"
    if resume:
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"search": _search_space(config)},
            tune_config=ray.tune.TuneConfig(
                metric=config.search.metric,
                mode=config.search.mode,
                scheduler=_scheduler(config),
                num_samples=config.search.num_samples,
                max_concurrent_trials=config.search.max_concurrent_trials,
                trial_dirname_creator=_trial_dirname_of,
            ),
            run_config=ray.tune.RunConfig(name=config.name, storage_path=storage_root(config)),
        )
    return tuner.fit()
