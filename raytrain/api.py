"""The Python API: one function for each `raytrain` command, with the same arguments.

A thin facade over the floors below (experiments, launch, inference, reporting, data). The CLI is
built from it: its choices are the constants here, its defaults these functions' defaults, and
every rule it enforces on an argument (errors.Rule), the function here enforces too.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from raytrain import experiments
from raytrain.checkpoints import MODEL_FILE, CheckpointInfo, cache_dir, read_checkpoint
from raytrain.config import SELECTS, Config, load_config, parse_size, shipped_configs  # noqa: F401 - SELECTS for the CLI
from raytrain.console import EPOCH_LINES, QUIET
from raytrain.data.formats import FORMATS
from raytrain.data.manifest import MANIFEST, SPLITS  # noqa: F401 - for the CLI
from raytrain.data.shards import ROWS_PER_SHARD, write_shards
from raytrain.data.synthetic import write_synthetic_kitti
from raytrain.errors import NON_NEGATIVE, PORT, POSITIVE, POSITIVE_NUMBER, RaytrainError
from raytrain.inference import EXPORT_FORMATS, TTA_CHOICES  # noqa: F401 - for the CLI
from raytrain.selection import MODES  # noqa: F401 - for the CLI
from raytrain.storage.paths import filesystem_of, location_of

# The quickstart's synthetic set: small enough to make, shard and learn on 2 CPU cores in minutes.
QUICKSTART_COUNT, QUICKSTART_SIZE, QUICKSTART_SEED = 400, (192, 64), 0
SHARD_FORMATS = tuple(FORMATS)  # data shard --format
# The CLI's other choices, named here for it: SPLITS (evaluate --split), MODES (--mode),
# SELECTS (--select), TTA_CHOICES (--tta), EXPORT_FORMATS (export --format).

ConfigSource = str | os.PathLike | dict | Config
Overrides = dict[str, Any] | list[str] | None


def train(config: ConfigSource, overrides: Overrides = None, *, resume: bool | str | os.PathLike = False,
          dry_run: bool = False, num_cpus: int | None = None, verbosity: int = QUIET):
    """One DDP training run in a new experiment directory; returns Ray's Result (`.path` is the
    experiment on `.filesystem`, `.metrics`, `.checkpoint`), which best_checkpoint, report and serve
    take as it is (on S3, Ray's paths lack the s3:// of the experiment's URI). resume=True continues the latest run of the config's name,
    resume=PATH that experiment. dry_run=True checks everything, starts nothing and returns the plan."""
    return _launch("train", config, overrides, resume, dry_run, num_cpus, verbosity)


def tune(config: ConfigSource, overrides: Overrides = None, *, resume: bool | str | os.PathLike = False,
         dry_run: bool = False, num_cpus: int | None = None, verbosity: int = QUIET):
    """A Ray Tune search over config.search.space in a new experiment directory; returns Ray's
    ResultGrid (`.experiment_path` on `.filesystem`), which best_checkpoint, report and serve take
    as it is. resume and dry_run as for train."""
    return _launch("tune", config, overrides, resume, dry_run, num_cpus, verbosity)


def resolved_config(config: ConfigSource, overrides: Overrides = None, *, kind: str = "train",
                    resume: bool | str | os.PathLike = False) -> Config:
    """The config that train or tune (`kind`) runs with these arguments: `config` with the overrides,
    or when resuming, the experiment's own config with the overrides on top."""
    return _run_config(kind, load_config(config, overrides), overrides, resume)[0]


def _run_config(kind: str, config: Config, overrides: Overrides, resume) -> tuple[Config, str | None]:
    """(the config to run, the experiment to resume or None)."""
    if not resume:
        return config, None
    experiment = experiments.to_resume(config, kind, resume)
    # The run goes on as it started: its own config, with this call's overrides on top.
    started = experiments.experiment_config(experiment)
    config = load_config(started, overrides)
    experiments.check_resumable(experiment, extended=kind == "train" and config.train.epochs > started.train.epochs)
    return config, experiment


def _launch(kind, source, overrides, resume, dry_run, num_cpus, verbosity):
    _optional(POSITIVE, "num_cpus", num_cpus)
    config, experiment = _run_config(kind, load_config(source, overrides), overrides, resume)
    from raytrain.preflight import check_ready, local_cluster_cpus, plan

    cpus = local_cluster_cpus(config, kind, num_cpus)  # once: what is checked is what starts
    if dry_run:
        where = experiment or f"{experiments.name_folder(config)}/{time.strftime(experiments.STAMP)}"
        return {**plan(config, kind, cpus), "experiment": where, "resume": bool(resume)}
    config, manifest = check_ready(config, cpus, search=kind == "tune")  # before anything is written
    if kind == "train":
        from raytrain.launch.trainer import run_training as run
    else:
        from raytrain.launch.tuner import run_search as run

    if experiment:
        experiments.mark(experiment, experiments.RUNNING)
    else:
        experiment = experiments.create_experiment(config, kind)
    if verbosity >= EPOCH_LINES:
        print(f"experiment: {experiment}", flush=True)
    extra = {"resume": bool(resume)} if kind == "tune" else {}
    try:
        result = run(config, manifest, experiment, num_cpus=cpus, verbosity=verbosity, **extra)
    except BaseException as err:
        # Ctrl-C, or SIGTERM (Ray's handler exits); else a failure. Should the record not be
        # written either (a disk still full), the run's own error is the one to tell.
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        with contextlib.suppress(RaytrainError):
            experiments.mark(experiment, experiments.INTERRUPTED if interrupted else experiments.FAILED)
        raise
    errors = len(result.errors) if kind == "tune" else 0
    experiments.mark(experiment, experiments.FINISHED, failed_trials=errors)
    return result


best_checkpoint = experiments.best_checkpoint
runs = experiments.runs


def __getattr__(name):
    """load_model (a LoadedModel: the eval-mode module, its config and classes; no Ray needed) and
    predict (probabilities at each image's own size), straight from inference. Imported on first use:
    they import torch, which takes seconds, and a bad config at the CLI is answered without it."""
    if name == "load_model":
        from raytrain.inference.loading import load_model

        return load_model
    if name == "predict":
        from raytrain.inference.prediction import predict

        return predict
    raise AttributeError(f"module 'raytrain.api' has no attribute {name!r}")


def evaluate(checkpoint: str | os.PathLike | CheckpointInfo, data: str | os.PathLike, *, split: str = "val",
             device: str = "cpu", tta: str | None = None, progress=None) -> dict:
    """Every metric of a checkpoint on one split of a sharded dataset, at each image's own size;
    tta="flip" scores the mean of each image's and its mirror image's probabilities.
    progress: called with (images done, total) after each batch (console.progress draws it)."""
    from raytrain.inference.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, data, split=split, device=device, tta=tta, progress=progress)


def predict_folder(checkpoint: str | os.PathLike | CheckpointInfo, inputs: str | os.PathLike | list, out: str | os.PathLike, *,
                   workers: int | None = None, device: str | None = None, batch_size: int = 8, cpus_per_worker: float = 1,
                   progress=None, tta: str | None = None):
    """`<name>_mask.png` and `<name>_overlay.png` in `out` for every image in `inputs` (files or
    folders); returns a PredictionSummary. Without `workers`: in this process on `device` (default
    cpu), every input checked before anything is written. With `workers=N`: on the Ray cluster
    (RAY_ADDRESS, or a local one), N model actors, one GPU each where the cluster has GPUs, so no
    `device`; inputs and `out` may be URIs, images already done in `out` are skipped, unreadable
    ones skipped and listed. tta: as for predict."""
    _optional(POSITIVE, "workers", workers)
    POSITIVE.check("batch_size", batch_size)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if workers is None:
        from raytrain.inference.files import predict_files

        return predict_files(checkpoint, inputs, out, device=device or "cpu", batch_size=batch_size, progress=progress,
                             tta=tta)
    if device is not None:
        raise RaytrainError("device is for a run in this process; with workers, each worker takes a GPU when the "
                            "cluster has them")
    from raytrain.inference.cluster import predict_on_cluster

    checkpoint = checkpoint.path if isinstance(checkpoint, CheckpointInfo) else checkpoint
    return predict_on_cluster(checkpoint, inputs, out, workers=workers, batch_size=batch_size,
                              cpus_per_worker=cpus_per_worker, progress=progress, tta=tta)


def export(checkpoint: str | os.PathLike | CheckpointInfo, out: str | os.PathLike | None = None, *,
           format: str = "torchscript", tta: str | None = None) -> Path:
    """The checkpoint as a file that loads with torch (or onnxruntime) alone: uint8 images in,
    probabilities at their size out (docs: Export); returns its path. Without `out`, the file
    goes beside the checkpoint's own (a remote checkpoint needs `out`)."""
    from raytrain.inference.exporting import default_export_path, export_model

    return export_model(checkpoint, out or default_export_path(checkpoint, format), format, tta)


def serve(checkpoint: str | os.PathLike | CheckpointInfo, *, replicas: int = 1, gpus_per_replica: float = 0,
          host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
          body_timeout_s: float = 10, max_ongoing_requests: int | None = None, metric: str | None = None,
          mode: str | None = None, select: str | None = None, last_k: int | None = None, num_cpus: int | None = None,
          tta: str | None = None):
    """A checkpoint (or an experiment's best, by the rule of metric, mode, select and last_k, as for
    best_checkpoint) behind an HTTP endpoint on Ray Serve, on the cluster in RAY_ADDRESS or a new
    local one; returns a serving.Server (`.url`, `.handle`,
    `.shutdown()`). POST a PNG or JPEG to the URL for its mask (see raytrain.serving). tta: as for predict.
    A request whose body has not all arrived `body_timeout_s` after its replica took it gets a 408;
    max_ongoing_requests: a replica's requests in progress (None: two batches and 32 for bodies
    still arriving)."""
    POSITIVE.check("replicas", replicas)
    NON_NEGATIVE.check("gpus_per_replica", gpus_per_replica)
    PORT.check("port", port)
    POSITIVE.check("max_batch_size", max_batch_size)
    NON_NEGATIVE.check("batch_wait_timeout_s", batch_wait_timeout_s)
    POSITIVE_NUMBER.check("body_timeout_s", body_timeout_s)
    _optional(POSITIVE, "max_ongoing_requests", max_ongoing_requests)
    _optional(POSITIVE, "num_cpus", num_cpus)
    import pyarrow.fs as pafs

    if not isinstance(checkpoint, CheckpointInfo):
        location = location_of(checkpoint)
        filesystem, path = filesystem_of(location)
        is_checkpoint = filesystem.get_file_info(f"{path}/{MODEL_FILE}").type == pafs.FileType.File
        checkpoint = read_checkpoint(location) if is_checkpoint else best_checkpoint(location, metric, mode, select, last_k)
    from raytrain.inference.image_model import check_tta
    from raytrain.inference.loading import load_model

    check_tta(tta)
    load_model(checkpoint)  # a bad checkpoint is a one-line error here, not a failed replica
    try:
        from raytrain import serving
    except ImportError as err:
        raise RaytrainError(f"serving needs Ray Serve ({err}): pip install 'raytrain[serve]'") from None
    return serving.start(checkpoint.path, replicas=replicas, gpus_per_replica=gpus_per_replica, host=host, port=port,
                         max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                         body_timeout_s=body_timeout_s, max_ongoing_requests=max_ongoing_requests, num_cpus=num_cpus,
                         tta=tta)


def report(experiment: str | os.PathLike, out: str | os.PathLike, *, metric: str | None = None, mode: str | None = None,
           select: str | None = None, last_k: int | None = None, progress=None) -> Path:
    """Plots, the best model's overlays and index.html of an experiment; returns index.html's path.
    Trials are ranked by the rule of metric, mode, select and last_k, as for best_checkpoint.
    progress: called with (val images scored, total) after each batch."""
    from raytrain.reporting import write_report

    return write_report(experiment, out, metric, mode, select, last_k, progress=progress)


def shard(src: str | os.PathLike, format: str, out: str | os.PathLike, *, classes: list[str] | None = None,
          val_fraction: float = 0.2, seed: int = 0, skip_bad: bool = False, on_skip=None,
          group_by: str | None = None, val_groups: list[str] | None = None, rows_per_shard: int = ROWS_PER_SHARD,
          progress=None) -> dict:
    """Validate a dataset and write Parquet shards with manifest.json; returns the manifest.
    `group_by` (a regex on sample ids) splits by whole groups: `val_groups`, or about `val_fraction`.
    rows_per_shard: samples per file; each file is one read task of the pipeline.
    progress: called with (samples written, total) as they are."""
    POSITIVE.check("rows_per_shard", rows_per_shard)
    manifest = write_shards(src, format, out, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
                            classes=classes, on_skip=on_skip, group_by=group_by, val_groups=val_groups,
                            rows_per_shard=rows_per_shard, progress=progress)
    return manifest.model_dump(mode="json", exclude_none=True)


def synth(out: str | os.PathLike, count: int = 200, *, seed: int = 0, size: tuple[int, int] = (384, 128)) -> Path:
    """Synthetic road scenes in the KITTI road layout; returns the folder."""
    POSITIVE.check("count", count)
    try:
        size = parse_size(size)
    except ValueError as err:
        raise RaytrainError(f"size: {err}") from None
    try:
        return write_synthetic_kitti(out, count, seed=seed, size=size)
    except FileExistsError:
        raise RaytrainError(f"{out}: already exists and is not empty") from None


def quickstart(data_dir: str | os.PathLike | None = None, overrides: Overrides = None, *,
               num_cpus: int | None = None, verbosity: int = QUIET) -> CheckpointInfo:
    """Synthetic scenes -> shards -> the quickstart search; returns its best checkpoint
    (`.experiment` is the search's directory). Data already made in data_dir is reused."""
    _optional(POSITIVE, "num_cpus", num_cpus)
    data_dir = Path(data_dir or cache_dir()).expanduser()
    raw, shards = data_dir / "synthetic", data_dir / "synthetic_shards"
    # The config first: a bad --set is refused before the data is made.
    config = load_config(load_config("quickstart", {"data.path": str(shards)}), overrides)
    if not (shards / MANIFEST).is_file():
        if not (raw.is_dir() and any(raw.iterdir())):
            if verbosity >= EPOCH_LINES:
                print(f"making {QUICKSTART_COUNT} synthetic road scenes in {raw}", flush=True)
            synth(raw, QUICKSTART_COUNT, seed=QUICKSTART_SEED, size=QUICKSTART_SIZE)
        shard(raw, "kitti", shards)
    return best_checkpoint(tune(config, num_cpus=num_cpus, verbosity=verbosity))


def list_configs() -> list[str]:
    """The names of the configs shipped with raytrain (usable wherever a config path is)."""
    return list(shipped_configs())


def show_config(config: ConfigSource, overrides: Overrides = None) -> str:
    """The fully resolved config as YAML, overrides applied."""
    return load_config(config, overrides).to_yaml()


def _optional(rule, name: str, value) -> None:
    if value is not None:
        rule.check(name, value)
