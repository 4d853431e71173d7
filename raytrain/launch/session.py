"""Ray itself: join the cluster in RAY_ADDRESS or start a local one with explicit logical CPUs,
and find the user's error inside what Ray raises (a worker's or trial's error arrives wrapped)."""
from __future__ import annotations

import contextlib
import logging
import os
import socket

import ray

from raytrain.console import EPOCH_LINES, RAY_LOGS
from raytrain.errors import RaytrainError
from raytrain.storage.atomic import DISK_FULL, cannot_write
from raytrain.preflight import local_object_store_bytes


def ensure_ray(num_cpus: int | None = None, verbosity: int = EPOCH_LINES) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one with explicit logical CPUs."""
    if ray.is_initialized():
        return
    log_to_driver = verbosity >= RAY_LOGS
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return
    port = free_port()
    cpus = num_cpus or os.cpu_count()
    with environment(
        # Every process of this cluster is told its own address. Ray Train frees the CPUs of a stopped
        # run (a trial that ASHA stops, that PBT pauses) from a helper that looks "the" cluster up on
        # this machine; with a second cluster running (another search, a test) the lookup fails and
        # those CPUs stay taken for good: later trials wait forever.
        RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}", RAY_GCS_SERVER_PORT=str(port),
        # Ray starts its workers at nice 15, so on a busy machine training yields to every other
        # process; Ray's own job submission runs at 0 too. A RAY_worker_niceness the user set wins.
        RAY_worker_niceness=os.environ.get("RAY_worker_niceness", "0"),
        # Ray Train's controller sees a worker's report, or its end, when it next polls: every 2 s by
        # default, up to 4 s a trial; a poll every 0.5 s is one small remote call.
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
        # Ray Train's preemption watcher (one more actor process per run) logs node drains, which a
        # cluster on one machine never has.
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
        # Ray expects at most 4 worker processes per core it may start at once, and warns past that.
        # A Train run brings 5-6 helper actors (controller, placement-group cleaner, barrier, dataset
        # manager, queues) besides its workers, and raytrain gives a small machine more logical CPUs
        # than cores: 2 process starts per logical CPU, or the warning is about Ray's own design.
        RAY_worker_maximum_startup_concurrency=os.environ.get("RAY_worker_maximum_startup_concurrency", str(2 * cpus)),
    ):
        # The dashboard stays on: its State API is how Ray Train frees the workers of stopped trials.
        # The object store's size stated, so that preflight's data.cache budget is the one Ray uses.
        ray.init(address="local", num_cpus=cpus, object_store_memory=local_object_store_bytes(),
                 log_to_driver=log_to_driver)


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def user_error_inside(err: BaseException, writing: str) -> RaytrainError | None:
    """The RaytrainError behind `err`: itself, or the one a Ray Train worker or Tune trial raised,
    which reaches the driver wrapped (TrainingFailedError's worker_failures, RayTaskError's cause).
    A full disk or quota met inside Ray (its own files, TensorBoard's) is one too, naming the file
    where the error does, else `writing`, what the run writes to (its experiment, predict's --out)."""
    pending, seen, disk_full = [err], set(), None
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # RayTaskError.cause; Ray Train's UserExceptionWithTraceback keeps the worker's exception in _base_exc.
        wrapped = getattr(current, "cause", None) or getattr(current, "_base_exc", None)
        if isinstance(current, RaytrainError) and wrapped is None:
            return current
        if disk_full is None and isinstance(current, OSError) and current.errno in DISK_FULL:
            disk_full = cannot_write(current.filename or writing, current)
        pending += [wrapped, getattr(current, "controller_failure", None), *getattr(current, "worker_failures", {}).values()]
        pending += [current.__cause__, current.__context__]
    return disk_full


# Loggers of Ray Data that a run in the driver (a cache filled, a batch prediction) only makes noise
# on: the progress-bar warning (raytrain prints its own progress), and the log of a failed task,
# whose exception reaches the caller anyway (a RaytrainError as its one line).
_QUIETED = {"ray.data._internal.progress": logging.ERROR, "ray.data._internal.execution.streaming_executor_state": logging.CRITICAL,
            "ray.data.exceptions": logging.CRITICAL}


@contextlib.contextmanager
def quiet_progress_warning():
    """Ray Data's noise in the driver off while it runs here (_QUIETED)."""
    loggers = {logging.getLogger(name): level for name, level in _QUIETED.items()}
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)
