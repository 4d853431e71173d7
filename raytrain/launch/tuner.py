"""One Ray Tune search: every trial trains the base config with the trial's sampled values, under
ASHA, HyperBand, PBT or FIFO; a trial of one worker in Tune's own trial actor (launch.trial), one of
DDP workers as a Ray Train run (trainer.make_trainer)."""
from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.tune
import ray.tune.search
from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.utils.util import _atomic_save

from raytrain.config import Config
from raytrain.console import EPOCH_LINES, QUIET, RAY_LOGS, epoch_line, say
from raytrain.data.manifest import Manifest, read_manifest
from raytrain.errors import RaytrainError
from raytrain.launch import tracking
from raytrain.launch.controller import ProgressRelay, RelayToTune, show_until
from raytrain.launch.session import ensure_ray, environment, user_error_inside
from raytrain.launch.trainer import TRAIN_RUN_NAME, cluster_datasets, make_trainer, storage_and_name
from raytrain.launch.trial import train_in_trial
from raytrain.preflight import TRIAL_DRIVER_CPUS, trains_in_trial_actor


TUNE_CHECKPOINTS_TO_KEEP = 4  # pbt: copies a trial can still be cloned from while the others move on


class _EpochLinesTune(ray.tune.Callback):
    """Tune calls this in the driver: one line per trial and epoch, in place of Tune's status tables."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        say(epoch_line(f"trial {trial.trial_id}", result, self.epochs))

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.checkpoint is not None:  # pbt: from a better trial's checkpoint, or its own after a pause
            source = Path(trial.checkpoint.path)
            say(f"trial {trial.trial_id}  restarts from {source.parent.name}/{source.name} with {trial.config.get('search', {})}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id}  done")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id}  failed")


# Searched keys that change what a trial's datasets hold: such a search cannot share one set.
DATASET_KEYS = ("data.path", "data.size", "data.cache")


def _run_trial(params: dict, base: dict, manifest: Manifest, experiment: str, datasets: dict | None,
               progress_queue=None) -> None:
    """One Tune trial: the base config with this trial's sampled values, trained by Ray Train. The
    base's manifest serves every trial but one that searches data.path itself; `datasets`, decoded
    (and cached) once by the driver, every trial of a search whose space leaves them alone;
    `progress_queue`, where the driver draws each trial's progress from."""
    config = Config.model_validate(base).with_overrides(params.get("search", {}))
    if config.data.path != manifest.location:
        manifest = read_manifest(config.data.path)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_path = f"{experiment}/{_trial_dirname(trial_id)}"
    start = ray.tune.get_checkpoint()  # pbt: Tune's copy of the checkpoint this trial continues from
    # A new Train run for each start, named after it: a run of an existing name carries on from its
    # own last checkpoint (right when the same start is retried, wrong for a new one).
    name = TRAIN_RUN_NAME if start is None else f"{TRAIN_RUN_NAME}_from_{Path(start.path).parent.name}_{Path(start.path).name}"
    scheduler = config.search.scheduler
    checkpoint_every = scheduler.perturbation_interval if scheduler.name == "pbt" else None
    progress = ProgressRelay(progress_queue, f"trial {trial_id}", config.train.epochs) if progress_queue is not None else None
    if trains_in_trial_actor(config.train):
        train_in_trial(config, manifest, f"{trial_path}/{name}", start, datasets, progress, checkpoint_every)
        return
    relay = RelayToTune(checkpoint_every, config.train.epochs)
    relay.fit_and_report(make_trainer(config, manifest, storage_path=trial_path, name=name, callbacks=[relay],
                                      initial_checkpoint=start, datasets=datasets, progress=progress))


def _trial_resources(base: dict):
    """What each trial's actor holds: a one-worker trial's worker (launch.trial), or for a Ray Train
    run, a share of a CPU to start and watch it, its workers being Ray Train's."""

    def resources(params: dict):
        from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

        config = Config.model_validate(base).with_overrides(params.get("search", {}))
        if not trains_in_trial_actor(config.train):
            return resource_dict_to_pg_factory({"CPU": TRIAL_DRIVER_CPUS})
        train = config.train
        return resource_dict_to_pg_factory({"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if train.use_gpu else {})})

    return resources


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
    if scheduler.name == "fifo":
        return ray.tune.schedulers.FIFOScheduler()
    if scheduler.name == "pbt":
        # Lists shift to a neighbouring value; ranges are multiplied by 0.8 or 1.2 (or resampled).
        samplers, mutations = _search_space(config), {}
        for key in config.search.pbt_mutations:
            (kind, values), = config.search.space[key].items()
            mutations[key] = values if kind in ("choice", "grid") else samplers[key]
        return _PopulationBasedTraining(
            config.train.epochs,
            time_attr="epoch",
            perturbation_interval=scheduler.perturbation_interval,
            hyperparam_mutations={"search": mutations},
            synch=scheduler.synch,
        )
    # HyperBand runs as its asynchronous form (ASHA over several brackets): Tune's synchronous
    # HyperBandScheduler pauses trials, and a paused trial here would restart its Train run from scratch.
    return ray.tune.schedulers.ASHAScheduler(
        time_attr="epoch",
        max_t=config.train.epochs,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
        brackets=3 if scheduler.name == "hyperband" else 1,
    )


class _PopulationBasedTraining(ray.tune.schedulers.PopulationBasedTraining):
    """Tune's PBT, except at a trial's last epoch: a copy then would have nothing left to train, and
    pausing it there (synch) would train its last epochs again."""

    def __init__(self, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_result(self, tune_controller, trial, result):
        epochs = trial.config.get("search", {}).get("train.epochs", self.epochs)
        if result.get("epoch", 0) >= epochs:
            return ray.tune.schedulers.TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class VariantGenerator(ray.tune.search.BasicVariantGenerator):
    """Tune's sampler of grid and random settings, saved as it was at the search's start.

    Tune saves a search in two files, its trials' states and its sampler's, and a search stored in
    a bucket uploads the two side by side. A driver killed during an upload can leave them a step
    apart; Tune's own sampler then counts as running a trial the restored search does not have
    (under max_concurrent it waits for that trial forever), or samples a trial twice or never.
    This one saves only its start, which never changes, and on restore samples again the trials
    the experiment state holds: it is seeded, so they come back the same, ids included."""

    def add_configurations(self, experiments):
        super().add_configurations(experiments)
        self._start = self._state_now()

    def _state_now(self):
        state = self.get_state()  # False for a grid too large to save (Tune's lazy sampling)
        if state:
            state = copy.deepcopy({key: value for key, value in state.items() if key != "_start"})
        return state

    def save_to_dir(self, dirpath: str, session_str: str):
        if not self._start:
            return False
        file_name = self.CKPT_FILE_TMPL.format(session_str)
        _atomic_save(state=self._start, checkpoint_dir=dirpath, file_name=file_name, tmp_file_name=f"tmp-{file_name}")

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        self._start = self._state_now()
        statuses = restored_trial_statuses(dirpath)
        limit, self.max_concurrent = self.max_concurrent, 0
        sampled = [self.next_trial() for _ in statuses]
        self.max_concurrent = limit
        self._live_trials = {trial_id for trial_id, status in statuses.items() if status != "TERMINATED"}
        if {trial.trial_id for trial in sampled if trial is not None} != set(statuses):
            say(f"note: the resumed search's sampler did not give back the trials of {dirpath}'s state; "
                "it may sample a setting again")


def restored_trial_statuses(dirpath: str) -> dict[str, str]:
    """{trial id: status} of the newest experiment state in dirpath, the one Tune restores from
    (Tune downloads it there before it restores the sampler)."""
    newest = _find_newest_experiment_checkpoint(dirpath, fs=pyarrow.fs.LocalFileSystem())
    if newest is None:
        return {}
    states = [json.loads(trial_json) for trial_json, _ in json.loads(Path(newest).read_text())["trial_data"]]
    return {state["trial_id"]: state["status"] for state in states}


def _search_algorithm(config: Config):
    if config.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise RaytrainError("search.algorithm optuna needs Optuna: pip install 'raytrain[optuna]'") from None
        return OptunaSearch(seed=config.train.seed)
    # max_concurrent here: Tune ignores TuneConfig.max_concurrent_trials when given a generator.
    return VariantGenerator(random_state=config.train.seed, max_concurrent=config.search.max_concurrent_trials or 0)


def run_search(config: Config, manifest: Manifest, experiment: str, *, resume: bool = False,
               num_cpus: int | None = None, verbosity: int = QUIET) -> ray.tune.ResultGrid:
    """A search into `experiment` (a new directory, or one whose search to continue with `resume`),
    on the cluster in RAY_ADDRESS or a local one of `num_cpus` logical CPUs. Raises the first
    trial's error when every trial failed."""
    ensure_ray(num_cpus, verbosity=verbosity)
    shared = not any(key in config.search.space for key in DATASET_KEYS)
    progress_queue = None
    if verbosity >= EPOCH_LINES:
        from ray.util.queue import Queue

        progress_queue = Queue(actor_options={"num_cpus": 0})
    trainable = ray.tune.with_parameters(_run_trial, base=config.model_dump(mode="json"), manifest=manifest,
                                         experiment=experiment,
                                         datasets=cluster_datasets(config, manifest, verbosity) if shared else None,
                                         progress_queue=progress_queue)
    trainable = ray.tune.with_resources(trainable, _trial_resources(config.model_dump(mode="json")))
    if resume:
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        storage_path, name = storage_and_name(experiment)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"search": _search_space(config)},
            tune_config=ray.tune.TuneConfig(
                metric=config.search.metric,
                mode=config.search.mode,
                scheduler=_scheduler(config),
                search_alg=_search_algorithm(config),
                num_samples=config.search.num_samples,
                max_concurrent_trials=config.search.max_concurrent_trials,
                time_budget_s=config.search.time_budget_s,
                trial_dirname_creator=_trial_dirname_of,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=storage_path,
                # A trial whose node is lost is rerun; finished trials are kept in the experiment state.
                failure_config=ray.tune.FailureConfig(max_failures=config.train.max_failures),
                checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=TUNE_CHECKPOINTS_TO_KEEP),
                # Tune's result files (progress.csv, result.json), which ResultGrid and `raytrain report`
                # read, named here because Tune's automatic loggers are off (see below).
                callbacks=[*([_EpochLinesTune(config.train.epochs)] if verbosity >= EPOCH_LINES else []),
                           *tracking.tune_callbacks(config, experiment), CSVLoggerCallback(), JsonLoggerCallback()],
                verbose=2 if verbosity >= RAY_LOGS else 0,
            ),
        )
    # Tune's new console output prints its header box even at verbose=0; the legacy one is silent.
    # No automatic loggers: Tune's TensorBoard one would copy every curve rank 0 already writes
    # (docs/decisions.md); the CSV and JSON ones are in the callbacks above.
    done = threading.Event()
    drawer = show_until(progress_queue, done) if progress_queue is not None else None
    try:
        with environment(RAY_AIR_NEW_OUTPUT=os.environ.get("RAY_AIR_NEW_OUTPUT", "1" if verbosity >= RAY_LOGS else "0"),
                         TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
            grid = tuner.fit()
    finally:
        done.set()
        if drawer:
            drawer.join(timeout=5)
    if grid.errors and len(grid.errors) == len(grid):
        raise user_error_inside(grid.errors[0], writing=experiment) or grid.errors[0]
    return grid
