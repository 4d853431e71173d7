"""Checks made before Ray starts, on what would otherwise fail in every worker or wait forever.
Plain functions of the config and the dataset: no Ray cluster needed to run or test them."""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil
import sys

from raytrain.config import WORST_GROUP, Config
from raytrain.data.images import MAX_PIXELS_ENV, max_pixels
from raytrain.data.manifest import MAX_GROUP_METRICS, Manifest, read_manifest
from raytrain.errors import ConfigError, DataError, RaytrainError
from raytrain.storage.paths import filesystem_of, is_uri


# A Tune trial's own process only drives a Train run; Tune cannot schedule a trial that asks for
# nothing, so it takes a token share of a CPU, which a local cluster must have room for too.
TRIAL_DRIVER_CPUS = 0.01


def trains_in_trial_actor(train) -> bool:
    """A trial of one worker trains in Tune's own trial actor (launch.trial), holding that worker's
    resources; a trial of DDP workers drives a Ray Train run from a TRIAL_DRIVER_CPUS share."""
    return train.num_workers == 1


def trial_driver_cpus(train) -> float:
    return 0 if trains_in_trial_actor(train) else TRIAL_DRIVER_CPUS
# data.cache auto keeps the decoded splits when they take at most this share of the object store:
# the rest is for Ray Data's streaming, Train's checkpoints and Tune's objects.
CACHE_SHARE = 0.5


def _check_storage(storage_path: str) -> None:
    """A URI's bucket now (filesystem_of checks it), not in the first write after Ray has started."""
    if is_uri(storage_path):
        try:
            filesystem_of(storage_path)
        except RaytrainError as err:
            raise type(err)(f"train.storage_path: {err}") from None


def check_ready(config: Config, local_cpus: int | None, *, search: bool = False) -> tuple[Config, Manifest]:
    """Fail before Ray starts on what would otherwise fail in every worker, or wait forever: a local
    cluster too small for one run; every trial's data.size, dataset and classes, model and loss; a
    data.cache of memory that a local cluster's object store cannot hold.
    Returns the config to run and config.data.path's manifest, read here once for the whole run. The
    config pins an unsearched encoder_weights file's SHA-256 as read here, so every worker loads
    those bytes or refuses (a node with another copy, or the file replaced since).

    local_cpus: the CPUs of the local cluster about to start, or None for a cluster that is already
    running or remote (it may grow; its object store is checked once joined).
    """
    if config.train.tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise RaytrainError("train.tracking mlflow needs MLflow: pip install 'raytrain[mlflow]'")
    _check_cluster_fits(config.train, local_cpus, search)
    _check_storage(config.train.storage_path)
    checked = set()  # each dataset and model once, however many trials share it
    digests: dict[str | None, str | None] = {}  # each encoder_weights file's SHA-256, as the model checks read it
    manifests: dict[str, Manifest] = {}  # each data.path's, read once
    for overrides in _trial_variants(config):
        where = "".join(f"search.space {key}={value!r}: " for key, value in overrides.items())
        try:
            variant = config.with_overrides(overrides)
            _check_size(variant)
            if variant.data.path not in manifests:
                manifests[variant.data.path] = _manifest_of(variant)
            manifest = manifests[variant.data.path]
            for key, check in [(("data", variant.data.path, tuple(variant.classes)), lambda: _check_data(variant, manifest)),
                               (("model", variant.num_classes, tuple(sorted(variant.model.model_dump().items()))),
                                lambda: digests.update({variant.model.encoder_weights_file: _check_model(variant)}))]:
                if key not in checked:
                    check()
                    checked.add(key)
            _check_loss(variant, manifest)
            _check_worst_group(variant, manifest)
            if local_cpus is not None:
                cache_decision(variant, manifest, local_object_store_bytes())
        except RaytrainError as err:
            raise type(err)(f"{where}{err}") from None
    manifest = manifests.get(config.data.path) or _manifest_of(config)  # a searched data.path: the base's too
    searched = {"model.encoder_weights", "model.encoder_weights_sha256"} & set(config.search.space if search else ())
    digest = digests.get(config.model.encoder_weights_file)
    if digest and config.model.encoder_weights_sha256 is None and not searched:
        config = config.with_overrides({"model.encoder_weights_sha256": digest})
    return config, manifest


def decoded_bytes(config: Config, manifest: Manifest) -> int:
    """The decoded train and val splits at the training size: uint8 RGB and a uint8 mask per pixel."""
    width, height = config.data.size
    return (manifest.count("train") + manifest.count("val")) * width * height * 4


def cache_decision(config: Config, manifest: Manifest, store_bytes: float | None) -> tuple[bool, str | None]:
    """(whether the decoded splits are kept in the object store, a note for the user or None).
    store_bytes: the object store's size, or None where it is not known yet (a remote cluster, not
    joined): then only data.cache decides. data.cache memory that does not fit is a ConfigError."""
    mode = config.data.cache
    if mode == "off":
        return False, None
    size = decoded_bytes(config, manifest)
    if store_bytes is None or size <= CACHE_SHARE * store_bytes:
        return True, None
    budget = f"{human_size(size)} decoded, over the budget of {human_size(CACHE_SHARE * store_bytes)} ({CACHE_SHARE:.0%} of the {human_size(store_bytes)} object store)"
    if mode == "memory":
        raise ConfigError(f"data.cache memory: the splits of {config.data.path} are {budget}: set data.cache=auto or off, or a smaller data.size")
    return False, f"data.cache auto: streaming the splits, decoded every epoch: they are {budget}"


def human_size(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def local_object_store_bytes() -> int:
    """The object store a local Ray cluster gets here: Ray's default rule (30% of the memory available,
    at most what /dev/shm holds), which launch.session passes to ray.init so that this is the truth."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    shm = shutil.disk_usage("/dev/shm").total * 0.95 if os.path.isdir("/dev/shm") else math.inf
    return int(min(0.3 * available, shm, 200 * 2**30))


def _check_cluster_fits(train, local_cpus: int | None, search: bool) -> None:
    if local_cpus is not None and train.use_gpu:
        _check_local_gpus(train)
    # Ray Data's read and decode tasks need a whole CPU beside the workers (and a trial's driver).
    needed = train.num_workers * train.cpus_per_worker + 1 + (trial_driver_cpus(train) if search else 0)
    if local_cpus is not None and needed > local_cpus:
        raise ConfigError(
            f"train.num_workers={train.num_workers} x train.cpus_per_worker={train.cpus_per_worker:g} needs {math.ceil(needed)} CPUs "
            f"(one more for Ray Data{', and a share for the trial' if search and trial_driver_cpus(train) else ''}), but the local cluster has "
            f"{local_cpus}: lower train.num_workers or raise --num-cpus"
        )


def _check_local_gpus(train) -> None:
    # Without this, a run that asks for more GPUs than the local cluster has waits for them forever.
    import torch

    needed, present = train.num_workers * train.gpus_per_worker, torch.cuda.device_count()
    if needed > present:
        raise ConfigError(
            f"train.use_gpu: train.num_workers={train.num_workers} x train.gpus_per_worker={train.gpus_per_worker:g} "
            f"needs {math.ceil(needed)} GPU{'s' * (math.ceil(needed) != 1)}, but this machine has {present}: "
            "set train.use_gpu=false, or join a GPU cluster (RAY_ADDRESS)"
        )


def _manifest_of(variant: Config) -> Manifest:
    try:
        return read_manifest(variant.data.path)
    except DataError as err:
        raise DataError(f"data.path: {err}") from None


def _check_size(variant: Config) -> None:
    """data.size within the pixel limit that loading a checkpoint of it will apply."""
    width, height = variant.data.size
    if width * height > max_pixels():
        raise ConfigError(f"data.size {width}x{height} is over the limit of {max_pixels()} pixels ({MAX_PIXELS_ENV})")


def _check_data(variant: Config, manifest: Manifest) -> None:
    train, val = manifest.count("train"), manifest.count("val")
    if train < variant.train.num_workers or not val:
        raise DataError(
            f"data.path {variant.data.path}: {train} train and {val} val "
            f"samples; {variant.train.num_workers} workers need at least one train sample each, and "
            "validation at least one sample (shard with --val-fraction above 0)"
        )
    names = manifest.class_names
    if names != variant.classes:
        raise ConfigError(
            f"classes {variant.classes} do not match the classes {names} of the dataset in data.path "
            f"{variant.data.path}"
        )


def _check_model(variant: Config) -> str | None:
    """The model builds as a worker builds it: its options, and an encoder_weights file read and
    loaded. Returns that file's SHA-256, or None without one."""
    # Here, not at the top: launch.session imports this module in Ray's processes, which need no torch.
    from raytrain.checkpoints import initial_model

    try:
        return initial_model(variant)[1].model.encoder_weights_sha256
    except (ValueError, KeyError) as err:
        raise ConfigError(f"model: {err.args[0] if err.args else err}") from None  # KeyError's str() adds quotes


def _check_loss(variant: Config, manifest: Manifest) -> None:
    from raytrain.losses import create_loss

    try:
        class_weights = manifest.class_weights(variant.loss.class_weights)
        create_loss(variant.loss.name, num_classes=variant.num_classes, class_weights=class_weights)
    except ValueError as err:
        raise ConfigError(f"loss: {err}") from None


# The per-group scores the training loop reports, of which `@worst` takes the lowest group's.
GROUP_SCORES = ("val_iou", "val_f1")


def _check_worst_group(variant: Config, manifest: Manifest) -> None:
    """A metric of the worst val group names a score that has one per group, on data with val groups
    that get their own metrics: else no epoch would ever report it."""
    for field, metric in (("search.metric", variant.search.metric), ("train.early_stopping.metric", variant.train.early_stopping.metric)):
        score, at, group = (metric or "").partition("@")
        if not at or group != WORST_GROUP:
            continue
        if score not in GROUP_SCORES:
            raise ConfigError(f"{field} {metric}: the worst group's score is {' or '.join(f'{name}@{WORST_GROUP}' for name in GROUP_SCORES)}")
        groups = (manifest.groups or {}).get("val", {})
        if not manifest.metric_groups("val"):
            why = (f"has {len(groups)} val groups, over the {MAX_GROUP_METRICS} that get their own metrics" if groups
                   else "has no val groups (shard it with --group-by)")
            raise ConfigError(f"{field} {metric}: the worst val group's score needs val groups, but data.path {variant.data.path} {why}")


def _trial_variants(config: Config) -> list[dict]:
    """The overrides of every combination of searched values (both ends of a range): what trials can run."""
    keys = list(config.search.space)
    values = [next(iter(config.search.space[key].values())) for key in keys]
    return [dict(zip(keys, combination)) for combination in itertools.product(*values)]


# A local cluster sized to the config runs at most this many worker processes per core of the machine.
WORKERS_PER_CORE = 2


def _concurrent_runs(config: Config, search: bool) -> int:
    concurrent = config.search.num_trials if config.search.scheduler.name == "pbt" else config.search.max_concurrent_trials
    return (concurrent or 1) if search else 1


def local_cpus(config: Config, *, search: bool) -> int:
    """Logical CPUs for a local cluster: the machine's, or enough for one run (a search: its concurrent
    trials; pbt: the whole population), each with a CPU for Ray Data, whichever is more. Threads then
    share the cores."""
    per_run = config.train.num_workers * config.train.cpus_per_worker
    runs = _concurrent_runs(config, search)
    return max(os.cpu_count() or 1, math.ceil(runs * (per_run + 1 + (trial_driver_cpus(config.train) if search else 0))))


def _check_worker_count(config: Config, search: bool) -> None:
    """Sizing the cluster to the config is for a few workers sharing the cores: not for 64 processes,
    each holding torch and a model, on a laptop's 2 cores."""
    runs, cores = _concurrent_runs(config, search), os.cpu_count() or 1
    workers = runs * config.train.num_workers
    if workers > WORKERS_PER_CORE * cores:
        at_once = f" x {runs} trials at a time" if runs > 1 else ""
        trials = "search.num_trials" if config.search.scheduler.name == "pbt" else "search.max_concurrent_trials"
        raise ConfigError(
            f"train.num_workers={config.train.num_workers}{at_once} starts {workers} worker processes, over "
            f"{WORKERS_PER_CORE} per CPU of this machine ({cores}): lower train.num_workers"
            f"{f' or {trials}' if search else ''}, or pass --num-cpus to size the local cluster yourself"
        )


def local_cluster_cpus(config: Config, kind: str, num_cpus: int | None = None) -> int | None:
    """The CPUs of the local cluster that `raytrain train|tune` would start, or None when it joins a
    running one (RAY_ADDRESS, or Ray already started in this process)."""
    ray = sys.modules.get("ray")
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return None
    if num_cpus:
        return num_cpus
    search = kind == "tune"
    _check_worker_count(config, search)
    return local_cpus(config, search=search)


def plan(config: Config, kind: str, local_cpus: int | None) -> dict:
    """What `raytrain train|tune` would run, after every check it makes before Ray starts; starts nothing.
    local_cpus: as for check_ready (local_cluster_cpus)."""
    search = kind == "tune"
    config, manifest = check_ready(config, local_cpus, search=search)
    train, space = config.train, config.search.space
    return {
        "kind": kind,
        "name": config.name,
        "trials": config.search.num_trials if search else 1,
        "max_concurrent_trials": (config.search.max_concurrent_trials or config.search.num_trials) if search else 1,
        "scheduler": config.search.scheduler.name if search else None,
        "time_budget_s": config.search.time_budget_s if search else None,
        "search_space": {key: spec for key, spec in space.items()} if search else {},
        "epochs": train.epochs,
        "workers_per_trial": train.num_workers,
        "cpus_per_trial": train.num_workers * train.cpus_per_worker,
        "gpus_per_trial": train.num_workers * train.gpus_per_worker if train.use_gpu else 0,
        "cluster": f"local, {local_cpus} logical CPUs" if local_cpus else "the running cluster",
        "data": {"path": config.data.path, "train": manifest.count("train"), "val": manifest.count("val"),
                 "size": "x".join(map(str, config.data.size)), "classes": config.classes},
        "cache": _cache_plan(config, manifest, local_cpus),
        "model": config.model.name,
        "loss": config.loss.name,
    }


def _cache_plan(config: Config, manifest: Manifest, local_cpus: int | None) -> str:
    size = human_size(decoded_bytes(config, manifest))
    if local_cpus is None:
        return f"data.cache {config.data.cache}: {size} decoded; decided against the running cluster's object store"
    on, note = cache_decision(config, manifest, local_object_store_bytes())
    return f"on: {size} decoded, kept in the object store" if on else note or f"off: {size} decoded every epoch"
