"""Experiment directories: one per `train` or `tune` invocation, never reused.

    STORAGE/<config name>/<YYYYmmdd_HHMMSS>/        an experiment (MMSegmentation's work-dir stamp)
        experiment.json                            kind, status, when, where: what `runs` lists
        config.yaml                                the resolved config it started with
        ... Ray's own layout below: checkpoint_* (train) or trial_*/train/checkpoint_* (tune)

A second run in the same second gets `_1`, `_2`, ... appended. Continuing a run is explicit
(`resume`): the latest experiment of a name, or a given path. Local paths and pyarrow URIs alike.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import warnings
from pathlib import Path

import pyarrow.fs as pafs

from raytrain.config import Config, SearchConfig, TrainConfig, load_config
from raytrain.errors import CheckpointError, ConfigError, RaytrainError
from raytrain.selection import SelectionRule, experiment_trials, ranked_trials, select_best
from raytrain.storage.atomic import write_atomically
from raytrain.storage.paths import filesystem_of, is_uri, join, location_of
from raytrain.storage.reading import CONFIG_BYTES, RECORD_BYTES, read_bounded
from raytrain.storage.safe_yaml import load_yaml

MARKER = "experiment.json"
CONFIG_FILE = "config.yaml"
STAMP = "%Y%m%d_%H%M%S"
KINDS = ("train", "tune")
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"


def storage_root(storage_path: str) -> str:
    """train.storage_path as an absolute local path, or the URI as given."""
    return storage_path.rstrip("/") if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())


def name_folder(config: Config) -> str:
    """Where the experiments of this config's name live."""
    return join(storage_root(config.train.storage_path), config.name)


def _read_json(location: str) -> dict | None:
    try:
        data = json.loads(read_bounded(location, RECORD_BYTES, "record", CheckpointError))
    except (RaytrainError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _subfolders(location: str) -> list[str]:
    filesystem, path = filesystem_of(location)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError, OSError):
        return []
    return sorted(join(location, info.base_name) for info in infos if info.type == pafs.FileType.Directory)


def is_experiment(location: str | os.PathLike) -> bool:
    filesystem, path = filesystem_of(location)
    return filesystem.get_file_info(f"{path}/{MARKER}").type == pafs.FileType.File


def experiments_in(folder: str | os.PathLike) -> list[str]:
    """The experiments directly inside `folder` (a name's folder), newest first."""
    found = [path for path in _subfolders(os.fspath(folder)) if is_experiment(path)]
    return sorted(found, key=lambda path: ((_read_json(join(path, MARKER)) or {}).get("created", ""), path), reverse=True)


def create_experiment(config: Config, kind: str) -> str:
    """A new, empty experiment directory for this config, with its experiment.json and config.yaml."""
    folder = name_folder(config)
    filesystem, root = filesystem_of(folder)
    stamp = time.strftime(STAMP)
    for attempt in range(1000):
        name = stamp if attempt == 0 else f"{stamp}_{attempt}"
        path = f"{root}/{name}"
        if isinstance(filesystem, pafs.LocalFileSystem):
            Path(root).mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path)  # atomic: two runs started in the same second never share a directory
            except FileExistsError:
                continue
        elif filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            filesystem.create_dir(path)
        else:
            continue
        location = join(folder, name)
        write_atomically(join(location, CONFIG_FILE), config.to_yaml().encode())
        write_atomically(join(location, MARKER), json.dumps(_new_record(config, kind), indent=2).encode())
        return location
    raise ConfigError(f"{folder}: cannot find a free experiment name for {stamp}")


def _new_record(config: Config, kind: str) -> dict:
    from raytrain import __version__

    return {
        "name": config.name, "kind": kind, "status": RUNNING,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "updated": None,
        "host": socket.gethostname(), "pid": os.getpid(),
        "metric": config.search.metric, "mode": config.search.mode,
        "select": config.search.select, "last_k": config.search.last_k,
        "trials": config.search.num_trials if kind == "tune" else 1,
        "raytrain": __version__,
    }


def mark(experiment: str, status: str, **fields) -> None:
    """Record the experiment's status (running again when resumed, then finished, failed, interrupted)."""
    record = _read_json(join(experiment, MARKER)) or {}
    record.update(fields, status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if status == RUNNING:
        record.update(host=socket.gethostname(), pid=os.getpid())
    write_atomically(join(experiment, MARKER), json.dumps(record, indent=2).encode())


def experiment_config(experiment: str) -> Config:
    data = read_bounded(join(experiment, CONFIG_FILE), CONFIG_BYTES, "experiment config", CheckpointError)
    try:  # bytes that are not UTF-8 are damage like any other
        return load_config(load_yaml(data.decode(), CONFIG_FILE))
    except Exception as err:  # noqa: BLE001 - any damage to the file is the same one-line error
        raise CheckpointError(f"{join(experiment, CONFIG_FILE)}: unreadable ({' '.join(str(err).split())})") from None


def to_resume(config: Config, kind: str, resume: bool | str | os.PathLike) -> str:
    """The experiment to continue: `resume` itself when it is a path, else the newest of the name."""
    if resume is True:
        found = [path for path in experiments_in(name_folder(config)) if _kind(path) == kind]
        if not found:
            raise CheckpointError(f"--resume: no {kind} experiment named {config.name!r} in {storage_root(config.train.storage_path)} to resume")
        experiment = found[0]
    else:
        experiment = os.fspath(resume) if is_uri(resume) else str(Path(resume).expanduser().resolve())
        if not is_experiment(experiment):
            raise CheckpointError(f"--resume {resume}: not a raytrain experiment directory (no {MARKER})")
        found_kind = _kind(experiment)
        if found_kind != kind:
            raise CheckpointError(f"--resume {resume}: a {found_kind} experiment; resume it with raytrain {found_kind}")
    return experiment


def check_resumable(experiment: str, extended: bool) -> None:
    """A finished experiment has nothing left to run, unless the resumed config asks for more epochs."""
    record = _read_json(join(experiment, MARKER)) or {}
    if record.get("status") == FINISHED and not extended:
        raise CheckpointError(
            f"--resume: {experiment} finished at {record.get('updated')}; nothing to resume "
            "(a train run continues with more epochs: --set train.epochs=N)"
        )


def _kind(experiment: str) -> str | None:
    return (_read_json(join(experiment, MARKER)) or {}).get("kind")


def resolve_experiment(location) -> str:
    """An experiment directory from what a user names: the experiment itself (or what
    raytrain.train or raytrain.tune returned: storage.paths.location_of), or the folder of a name,
    whose latest experiment is taken (with a warning naming it). A folder of checkpoints from
    before experiment.json existed is taken as it is."""
    text = location_of(location)
    text = text.rstrip("/") if is_uri(text) else str(Path(text).expanduser())
    filesystem, path = filesystem_of(text)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise CheckpointError(f"{text}: experiment directory not found")
    if is_experiment(text):
        return text
    found = experiments_in(text)
    if not found:
        return text
    if len(found) > 1:
        warnings.warn(f"{text} holds {len(found)} experiments; using the latest, {found[0]}", stacklevel=3)
    return found[0]


def selection_rule(experiment: str | os.PathLike, metric: str | None = None, mode: str | None = None,
                   select: str | None = None, last_k: int | None = None) -> SelectionRule:
    """The rule that picks an experiment's best: each argument given, the others as its record
    (experiment.json) has them from the config it started with; for what has no record (a folder
    of checkpoints, an experiment from before search.select), the config's defaults."""
    record = _read_json(join(os.fspath(experiment), MARKER)) or {}
    defaults = SearchConfig()
    given = {"metric": metric, "mode": mode, "select": select, "last_k": last_k}
    return SelectionRule(**{key: value if value is not None else record.get(key, getattr(defaults, key))
                            for key, value in given.items()})


def best_checkpoint(experiment: str | os.PathLike, metric: str | None = None, mode: str | None = None,
                    select: str | None = None, last_k: int | None = None):
    """The checkpoint that stands for the best trial of one experiment, never of another's.

    `experiment`: an experiment directory (or the Result or ResultGrid that raytrain.train or
    raytrain.tune returned), or the folder of a name: its latest experiment is used.
    metric, mode, select, last_k: the rule (search.*, docs: Search); each one not given is the
    experiment's own (selection_rule)."""
    resolved = resolve_experiment(experiment)
    chosen = select_best(resolved, selection_rule(resolved, metric, mode, select, last_k))
    return dataclasses.replace(chosen.checkpoint, experiment=resolved)


@dataclasses.dataclass(frozen=True)
class Run:
    """One line of `raytrain runs`."""

    name: str
    path: str
    created: str
    kind: str
    trials: int
    status: str
    metric: str
    select: str
    last_k: int
    best: float | None  # the best trial's score by its rule (metric, select, last_k)

    @property
    def score_name(self) -> str:
        """What `best` is: `val_iou`, `val_iou (last epoch)`, ..."""
        return SelectionRule(self.metric, select=self.select, last_k=self.last_k).score_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def runs(storage: str | os.PathLike | None = None) -> list[Run]:
    """Every experiment under `storage` (default: the config's default storage_path), newest first."""
    root = storage_root(os.fspath(storage) if storage is not None else TrainConfig().storage_path)
    filesystem, path = filesystem_of(root)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise CheckpointError(f"{root}: storage folder not found")
    found = []
    for folder in _subfolders(root):
        for experiment in experiments_in(folder):
            record = _read_json(join(experiment, MARKER)) or {}
            found.append(_run_of(experiment, record))
    return sorted(found, key=lambda run: (run.created, run.path), reverse=True)


def _run_of(experiment: str, record: dict) -> Run:
    rule = selection_rule(experiment)
    kind = record.get("kind", "?")
    trials = len([p for p in _subfolders(experiment) if p.rsplit("/", 1)[-1].startswith("trial_")]) if kind == "tune" else 1
    ranked = ranked_trials(experiment_trials(experiment), rule)
    return Run(
        name=record.get("name", "?"), path=experiment, created=record.get("created", ""), kind=kind,
        trials=trials, status=_status(record), metric=rule.metric, select=rule.select, last_k=rule.last_k,
        best=float(ranked[0].score) if ranked else None,
    )


def _status(record: dict) -> str:
    """A run still marked running whose process on this machine is gone was interrupted (killed)."""
    status = record.get("status", "?")
    if status == RUNNING and record.get("host") == socket.gethostname() and not _alive(record.get("pid")):
        return INTERRUPTED
    return status


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
