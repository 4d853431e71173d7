"""Experiment tracking in MLflow (train.tracking: mlflow), as Ray callbacks.

    train: one MLflow run per experiment, written by Ray Train's controller (on the driver's node)
    tune:  one MLflow run per trial, written by Tune's driver (Ray's MLflowLoggerCallback)

Each run has the resolved config as flat dotted params, every numeric epoch metric with step=epoch
(a group's `val_iou@<group>` as `val_iou/<group>`),
and the tag `best_checkpoint` set when the run or trial ends. A run is found again by its tag
`raytrain.run` (the run's directory), so a resumed experiment goes on in the run it started.
MLflow is imported only here, and only when tracking is on.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import ray.train
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

from raytrain.selection import SelectionRule, best_location
from raytrain.config import Config
from raytrain.storage.paths import filesystem_of, join
from raytrain.errors import CheckpointError, RaytrainError

DATABASE = "mlflow.db"  # the default store, inside the experiment directory
RUN_TAG = "raytrain.run"  # the run's directory: how a resumed run finds its MLflow run
BEST_TAG = "best_checkpoint"
MAX_PARAM_LENGTH = 500  # the smallest limit of any MLflow version or server
BATCH = 100  # params per log_batch call, MLflow's limit
# What Tune adds to every result: bookkeeping, not something the loop measured.
_TUNE_KEYS = frozenset(AUTO_RESULT_KEYS + DEBUG_METRICS) | {
    "done", "trial_id", "experiment_tag", "should_checkpoint", "epoch",
}


def train_callbacks(config: Config, experiment: str) -> list:
    """Ray Train callbacks that log this run to MLflow; [] when tracking is off. Opens the MLflow run
    here, in the driver, so that an unusable tracking URI fails before training starts."""
    if config.train.tracking != "mlflow":
        return []
    uri = tracking_uri(config, experiment)
    client = _client(uri)
    experiment_id = _mlflow_experiment(client, config, experiment)
    run_id = _find_or_start_run(client, experiment_id, experiment, experiment.rstrip("/").rsplit("/", 1)[-1],
                                {"raytrain.experiment": experiment, "raytrain.kind": "train"})
    _log_params(client, run_id, flat_params(config))
    return [_TrainMetrics(uri, run_id), _TrainEnd(uri, run_id, experiment, SelectionRule.of(config.search))]


def tune_callbacks(config: Config, experiment: str) -> list:
    """Ray Tune callbacks that log every trial to MLflow; [] when tracking is off."""
    if config.train.tracking != "mlflow":
        return []
    uri = tracking_uri(config, experiment)
    _mlflow_experiment(_client(uri), config, experiment)  # fails here, before Tune starts, on a bad URI
    return [_tune_mlflow_class()(uri, config, experiment)]


def tracking_uri(config: Config, experiment: str) -> str:
    """train.tracking_uri, or a SQLite database in the experiment directory. (MLflow 3 refuses its
    plain-folder store unless MLFLOW_ALLOW_FILE_STORE is set; SQLite is its local default now.)"""
    if config.train.tracking_uri:
        return config.train.tracking_uri
    _, path = filesystem_of(experiment)  # TrainConfig rejects remote storage without a tracking_uri
    return f"sqlite:///{path.rstrip('/')}/{DATABASE}"


def flat_params(config: Config) -> dict[str, str]:
    """The resolved config as {dotted key: text}; search.space stays one JSON value."""
    params = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and prefix != "search.space":
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            text = node if isinstance(node, str) else json.dumps(node)
            params[prefix] = text[:MAX_PARAM_LENGTH]

    walk("", config.model_dump(mode="json"))
    return params


def epoch_metrics(result: dict) -> dict[str, float]:
    """The numbers the training loop reported (not Tune's bookkeeping, not None for NaN). A group's
    metric `val_iou@um` is `val_iou/um` here: MLflow names take no `@`, and its UI groups names by `/`."""
    return {
        key.replace("@", "/"): float(value) for key, value in result.items()
        if key not in _TUNE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    }


def _client(uri: str):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # A new SQLite store announces its tables at INFO; raytrain prints only what the user asked for.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as err:
        raise RaytrainError(f"train.tracking_uri {uri}: {_one_line(err)}") from None


def _mlflow_experiment(client, config: Config, experiment: str) -> str:
    """The id of the MLflow experiment named after the config, created when missing."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(config.name)
        if found is not None:
            return found.experiment_id
        # The default store keeps artifacts beside it, not in the current directory (MLflow's default).
        artifacts = None if config.train.tracking_uri else join(experiment, "mlartifacts")
        return client.create_experiment(config.name, artifact_location=artifacts)
    except MlflowException as err:
        raise RaytrainError(f"train.tracking_uri {client.tracking_uri}: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(getattr(err, "message", err)).split())


def _find_or_start_run(client, experiment_id: str, run_path: str, name: str, tags: dict) -> str:
    from mlflow.entities import RunStatus

    quoted = run_path.replace("'", "\\'")
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{quoted}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=name, tags={**tags, RUN_TAG: run_path}).info.run_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Params not logged yet: MLflow refuses to change one, and a resumed run may differ (--set)."""
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    new = [Param(key, value) for key, value in params.items() if key not in logged]
    for start in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[start : start + BATCH])


def _log_metrics(client, run_id: str, result: dict) -> None:
    from mlflow.entities import Metric

    step, now = int(result.get("epoch", 0)), int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, value in epoch_metrics(result).items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def _tag_best(client, run_id: str, directory: str, rule: SelectionRule) -> None:
    try:
        best = best_location(directory, rule)
    except CheckpointError:  # a trial that failed before its directory was made
        return
    if best is not None:
        client.set_tag(run_id, BEST_TAG, best)


class _TrainMetrics(ray.train.UserCallback):
    """Runs in Ray Train's controller: each epoch's metrics (all workers report the same all-reduced
    values; rank 0's are logged)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = None  # made in the controller: a client does not travel between processes

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def after_report(self, run_context, metrics, checkpoint):
        if self._client is None:
            self._client = _client(self.uri)
        _log_metrics(self._client, self.run_id, metrics[0])


class _TrainEnd(ControllerCallback):
    """Runs in Ray Train's controller when the run ends, which a UserCallback is not told: tags the
    best checkpoint and closes the MLflow run as finished, failed or killed."""

    def __init__(self, uri: str, run_id: str, run_path: str, rule: SelectionRule):
        self.uri, self.run_id, self.run_path, self.rule = uri, run_id, run_path, rule

    def after_controller_finish(self, result):
        self._end("FAILED" if result.error else "FINISHED")

    def before_controller_abort(self):
        self._end("KILLED")

    def _end(self, status: str) -> None:
        client = _client(self.uri)
        try:
            _tag_best(client, self.run_id, self.run_path, self.rule)
        finally:
            client.set_terminated(self.run_id, status=status)


def __getattr__(name: str):
    # Ray's MLflow module imports MLflow itself, so the class that extends it is made on first use;
    # found by name here, it pickles by reference (Tune keeps its callbacks in tuner.pkl for --resume).
    if name == "_TuneMLflow":
        return _tune_mlflow_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tune_mlflow_class() -> type:
    if "_TuneMLflow" in globals():
        return globals()["_TuneMLflow"]
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class _TuneMLflow(MLflowLoggerCallback):
        """Ray's MLflow logger, with raytrain's params (the trial's whole config, dotted), metrics (the
        loop's, at step=epoch rather than Tune's iteration count) and the best checkpoint at trial end.

        PBT changes a trial's searched values as it goes; MLflow params cannot change, so the params are
        the trial's first values and tags `search.<key>` hold the current ones."""

        def __init__(self, uri: str, config: Config, experiment: str):
            super().__init__(uri, experiment_name=config.name)
            self.base = config.model_dump(mode="json")
            self.experiment = experiment
            self.rule = SelectionRule.of(config.search)

        def log_trial_start(self, trial):
            client = self.mlflow_util._get_client()
            searched = trial.config.get("search", {})
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial), "raytrain.experiment": self.experiment,
                        "raytrain.kind": "tune"}
                run_id = _find_or_start_run(client, self.mlflow_util.experiment_id, self._trial_path(trial),
                                            f"trial_{trial.trial_id}", tags)
                self._trial_runs[trial] = run_id
                _log_params(client, run_id, flat_params(Config.model_validate(self.base).with_overrides(searched)))
            for key, value in searched.items():
                client.set_tag(self._trial_runs[trial], f"search.{key}", value)

        def log_trial_result(self, iteration, trial, result):
            _log_metrics(self.mlflow_util._get_client(), self._trial_runs[trial], result)

        def log_trial_end(self, trial, failed=False):
            run_id = self._trial_runs.get(trial)
            if run_id is None:  # ended before it started (a resumed search's errored trial)
                return
            try:
                _tag_best(self.mlflow_util._get_client(), run_id, self._trial_path(trial), self.rule)
            finally:
                self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")

        def _trial_path(self, trial) -> str:
            return join(self.experiment, trial.storage.trial_dir_name)

    _TuneMLflow.__module__, _TuneMLflow.__qualname__ = __name__, "_TuneMLflow"
    globals()["_TuneMLflow"] = _TuneMLflow
    return _TuneMLflow
