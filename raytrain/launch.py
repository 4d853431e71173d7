"""The only place that builds Ray Train trainers and Ray Tune tuners.

    train(config, experiment): one TorchTrainer run of N DDP workers, in the experiment directory.
    tune(config, experiment):  a Tuner whose every trial is such a run, over config.search.space.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Callable

import ray
import ray.train
import ray.tune
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from raytrain import tracking
from raytrain.config import Config
from raytrain.console import EPOCH_LINES, QUIET, RAY_LOGS, epoch_line
from raytrain.errors import RaytrainError
from raytrain.data.pipeline import build_datasets
from raytrain.loop import train_worker
from raytrain.preflight import TRIAL_DRIVER_CPUS, local_cpus

TRAIN_RUN_NAME = "train"  # inside a trial directory: EXPERIMENT/<trial>/train/checkpoint_*
TUNE_CHECKPOINTS_TO_KEEP = 4  # pbt: copies a trial can still be cloned from while the others move on
TENSORBOARD_DIR = "tensorboard"  # inside a run directory, written by rank 0



class SplitData(DataConfig):
    """Train is split into equal parts (DDP needs the same number of steps on every worker);
    val is split unevenly so that every val sample is evaluated exactly once per epoch.

    Blocks keep the dataset's order (preserve_order), not the order their tasks finish in, and the
    splitter then ignores locality and hands each block to the split with the fewest rows so far:
    which worker sees which samples in which order is the same in every run with the same seed.
    """

    preserve_order = True  # no measurable cost: docs/decisions.md (benchmarks/order.py)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            options = self._resolve_execution_options(name)  # a copy: the driver's stay as they are
            options.preserve_order = self.preserve_order
            dataset.context.execution_options = options
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name == "train"))):
                output[rank][name] = split
        return output


def ensure_ray(num_cpus: int | None = None, verbosity: int = EPOCH_LINES) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one with explicit logical CPUs."""
    if ray.is_initialized():
        return
    log_to_driver = verbosity >= RAY_LOGS
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return
    port = _free_port()
    with environment(
        # Every process of this cluster is told its own address. Ray Train frees the CPUs of a stopped
        # run (a trial that ASHA stops, that PBT pauses) from a helper that looks "the" cluster up on
        # this machine; with a second cluster running (another search, a test) the lookup fails and
        # those CPUs stay taken for good: later trials wait forever.
        RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}", RAY_GCS_SERVER_PORT=str(port),
        # Ray starts its workers at nice 15, so on a busy machine training yields to every other
        # process; Ray's own job submission runs at 0 too. A RAY_worker_niceness the user set wins.
        RAY_worker_niceness=os.environ.get("RAY_worker_niceness", "0"),
    ):
        # The dashboard stays on: its State API is how Ray Train frees the workers of stopped trials.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), log_to_driver=log_to_driver)


@contextlib.contextmanager
def environment(**values: str):
    """Set environment variables for what runs inside, then restore the caller's environment."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class _EpochLinesTrain(ray.train.UserCallback):
    """Runs in Ray Train's controller actor, whose prints never reach the terminal: it sends its lines
    through a Ray queue to a thread in the driver."""

    def __init__(self, label: str, epochs: int):
        from ray.util.queue import Queue

        self.label, self.epochs = label, epochs
        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(epoch_line(self.label, metrics[0], self.epochs))

    def print_lines_until(self, done: threading.Event) -> threading.Thread:
        from ray.util.queue import Empty

        def pump():
            while not done.is_set() or not self.queue.empty():
                try:
                    print(self.queue.get(timeout=0.5), flush=True)
                except Empty:
                    continue

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread


class _EpochLinesTune(ray.tune.Callback):
    """Tune calls this in the driver: one line per trial and epoch, in place of Tune's status tables."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(epoch_line(f"trial {trial.trial_id}", result, self.epochs), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.checkpoint is not None:  # pbt: from a better trial's checkpoint, or its own after a pause
            source = Path(trial.checkpoint.path)
            print(f"trial {trial.trial_id}  restarts from {source.parent.name}/{source.name} with {trial.config.get('search', {})}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id}  done", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id}  failed", flush=True)


def make_trainer(
    config: Config,
    *,
    storage_path: str,
    name: str,
    train_fn: Callable[[dict], None] = train_worker,
    callbacks: list | None = None,
    initial_checkpoint: ray.train.Checkpoint | None = None,
) -> TorchTrainer:
    """initial_checkpoint: where a new run starts (PBT's copy of a better trial); a run restarted after
    a failure carries on from its own latest checkpoint instead."""
    train = config.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "log_dir": f"{storage_path}/{name}/{TENSORBOARD_DIR}",
            "initial_checkpoint": initial_checkpoint,
        },
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


def _start(config: Config, num_cpus: int | None, search: bool, verbosity: int) -> None:
    """Ray: joined, or a local cluster of the right size. (raytrain.api has made preflight's checks.)"""
    ensure_ray(num_cpus or local_cpus(config, search=search), verbosity=verbosity)


def _split_location(experiment: str) -> tuple[str, str]:
    """(storage path, name) as Ray Train and Tune take an experiment directory."""
    parent, name = experiment.rstrip("/").rsplit("/", 1)
    return parent, name


def train(config: Config, experiment: str, *, num_cpus: int | None = None, verbosity: int = QUIET) -> ray.train.Result:
    """One run into `experiment` (a new directory, or one to continue from its last checkpoint)."""
    _start(config, num_cpus, search=False, verbosity=verbosity)
    storage_path, name = _split_location(experiment)
    lines = _EpochLinesTrain(config.name, config.train.epochs) if verbosity >= EPOCH_LINES else None
    done = threading.Event()
    printer = lines.print_lines_until(done) if lines else None
    try:
        callbacks = [*([lines] if lines else []), *tracking.train_callbacks(config, experiment)]
        return make_trainer(config, storage_path=storage_path, name=name, callbacks=callbacks or None).fit()
    except Exception as err:
        user_error = user_error_inside(err)
        if user_error is None:
            raise
        raise user_error from None
    finally:
        done.set()
        if printer:
            printer.join(timeout=5)


class _RelayToTune(ray.train.UserCallback):
    """Runs in Ray Train's controller: hands each epoch's metrics, and on PBT's epochs the checkpoint,
    to the trial function, which reports them to Tune. (Ray's TuneReportCallback relays metrics only,
    and PBT clones trials by their Tune checkpoints: docs/decisions.md.)"""

    def __init__(self, checkpoint_every: int | None, epochs: int):
        from ray.util.queue import Queue

        self.checkpoint_every, self.epochs = checkpoint_every, epochs
        # One item at a time: Train waits for Tune's decision (stop, pause) before its next epoch.
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        epoch = metrics[0]["epoch"]
        # PBT's epochs, except the last, where _PopulationBasedTraining leaves trials alone.
        relay = checkpoint is not None and self.checkpoint_every and epoch % self.checkpoint_every == 0 and epoch < self.epochs
        self.queue.put((metrics[0], checkpoint if relay else None))

    def fit_and_report(self, trainer: TorchTrainer) -> None:
        """trainer.fit() in a thread while this one reports to Tune; Tune ends the trial by raising
        in ray.tune.report, and the Train run, owned by this trial's actor, ends with it."""
        failure = []

        def fit():
            try:
                trainer.fit()
            except BaseException as err:  # re-raised below, in Tune's thread
                failure.append(err)
            finally:
                self.queue.put(None)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        while (item := self.queue.get()) is not None:
            metrics, checkpoint = item
            ray.tune.report(metrics, checkpoint=checkpoint)
        thread.join()
        if failure:
            raise failure[0]


def _run_trial(params: dict, base: dict, experiment: str) -> None:
    """One Tune trial: the base config with this trial's sampled values, trained by Ray Train."""
    config = Config.model_validate(base).with_overrides(params.get("search", {}))
    trial_path = f"{experiment}/{_trial_dirname(ray.tune.get_context().get_trial_id())}"
    start = ray.tune.get_checkpoint()  # pbt: Tune's copy of the checkpoint this trial continues from
    # A new Train run for each start, named after it: a run of an existing name carries on from its
    # own last checkpoint (right when the same start is retried, wrong for a new one).
    name = TRAIN_RUN_NAME if start is None else f"{TRAIN_RUN_NAME}_from_{Path(start.path).parent.name}_{Path(start.path).name}"
    scheduler = config.search.scheduler
    relay = _RelayToTune(scheduler.perturbation_interval if scheduler.name == "pbt" else None, config.train.epochs)
    relay.fit_and_report(make_trainer(config, storage_path=trial_path, name=name, callbacks=[relay], initial_checkpoint=start))


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


def _search_algorithm(config: Config):
    if config.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise RaytrainError("search.algorithm optuna needs Optuna: pip install 'raytrain[optuna]'") from None
        return OptunaSearch(seed=config.train.seed)
    # max_concurrent here: Tune ignores TuneConfig.max_concurrent_trials when given a generator.
    return ray.tune.search.BasicVariantGenerator(random_state=config.train.seed, max_concurrent=config.search.max_concurrent_trials or 0)


def tune(config: Config, experiment: str, *, resume: bool = False, num_cpus: int | None = None,
         verbosity: int = QUIET) -> ray.tune.ResultGrid:
    """A search into `experiment` (a new directory, or one whose search to continue with `resume`).
    Raises the first trial's error when every trial failed."""
    _start(config, num_cpus, search=True, verbosity=verbosity)
    trainable = ray.tune.with_parameters(_run_trial, base=config.model_dump(mode="json"), experiment=experiment)
    trainable = ray.tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
    if resume:
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        storage_path, name = _split_location(experiment)
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
    with environment(RAY_AIR_NEW_OUTPUT=os.environ.get("RAY_AIR_NEW_OUTPUT", "1" if verbosity >= RAY_LOGS else "0"),
                     TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
        grid = tuner.fit()
    if grid.errors and len(grid.errors) == len(grid):
        raise user_error_inside(grid.errors[0]) or grid.errors[0]
    return grid


def user_error_inside(err: BaseException) -> RaytrainError | None:
    """The RaytrainError behind `err`: itself, or the one a Ray Train worker or Tune trial raised,
    which reaches the driver wrapped (TrainingFailedError's worker_failures, RayTaskError's cause)."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # RayTaskError.cause; Ray Train's UserExceptionWithTraceback keeps the worker's exception in _base_exc.
        wrapped = getattr(current, "cause", None) or getattr(current, "_base_exc", None)
        if isinstance(current, RaytrainError) and wrapped is None:
            return current
        pending += [wrapped, getattr(current, "controller_failure", None), *getattr(current, "worker_failures", {}).values()]
        pending += [current.__cause__, current.__context__]
    return None
