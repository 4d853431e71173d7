"""Which checkpoint is best, by one rule (search.select, trial_score): each trial below an experiment
scored from its history of reported epochs, the trials ranked by that score, and the checkpoint of
the epoch that stands for the best trial read (nothing fetched until then).

A Tune trial's history is its result.json (one line per report; the last report of each epoch
counts); a Ray Train run has no Tune files, and its history is what its kept checkpoints recorded in
their metrics.json. Both are read through pyarrow's filesystems, so an experiment may be local or at
a URI (s3://...). A damaged or incomplete checkpoint is passed over with a note; it never hides the
others, nor wins.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raytrain.checkpoints import METRICS_FILE, MODEL_FILE, CheckpointInfo, check_complete, read_checkpoint, read_metrics
from raytrain.config import SELECTS, SearchConfig
from raytrain.errors import CheckpointError
from raytrain.storage.paths import RemotePath, filesystem_of, is_uri
from raytrain.storage.reading import RECORD_BYTES, RESULTS_BYTES, read_bounded

MODES = ("min", "max")  # how a metric ranks checkpoints: lower or higher is better
PARAMS_FILE = "params.json"  # a Tune trial's sampled values
RESULTS_FILE = "result.json"  # a Tune trial's reports, one JSON line each


def trial_score(values: Sequence[float], select: str, last_k: int, mode: str) -> tuple[float, int]:
    """(the trial's score, the index into `values` of the epoch whose checkpoint stands for the trial).

    values: one trial's metric per reported epoch, in epoch order (real numbers, at least one).
    select: best, its best epoch (the first of equal ones) and that epoch's checkpoint; last, its last
    epoch; mean_last, the mean of its last `last_k` epochs (of all it has, when it has fewer), with
    the last epoch's checkpoint. As Ray Tune's ResultGrid.get_best_result(scope="all" | "last" |
    "last-5-avg")."""
    if mode not in MODES:
        raise ValueError(f"mode must be {' or '.join(map(repr, MODES))}, not {mode!r}")
    if select not in SELECTS:
        raise ValueError(f"select must be one of {', '.join(SELECTS)}, not {select!r}")
    if not isinstance(last_k, int) or isinstance(last_k, bool) or last_k < 1:
        raise ValueError(f"last_k must be a whole number of at least 1, not {last_k!r}")
    values = [float(value) for value in values]
    if not values or not all(math.isfinite(value) for value in values):
        raise ValueError(f"values must be one or more finite numbers, not {values}")
    last = len(values) - 1
    if select == "best":
        index = (max if mode == "max" else min)(range(len(values)), key=values.__getitem__)
        return values[index], index
    if select == "last":
        return values[last], last
    window = values[-last_k:]
    return math.fsum(window) / len(window), last


@dataclass(frozen=True)
class SelectionRule:
    """How an experiment's best is chosen: search.metric in search.mode, and search.select's score
    of each trial (with search.last_k for mean_last)."""

    metric: str = "val_iou"
    mode: str = "max"
    select: str = "best"
    last_k: int = 3

    def __post_init__(self):
        if self.mode not in MODES:
            raise CheckpointError(f"mode must be {' or '.join(map(repr, MODES))}, not {self.mode!r}")
        if self.select not in SELECTS:
            raise CheckpointError(f"select must be one of {', '.join(SELECTS)}, not {self.select!r}")
        if not isinstance(self.last_k, int) or isinstance(self.last_k, bool) or self.last_k < 1:
            raise CheckpointError(f"last_k: expected a positive whole number, got {self.last_k!r}")

    @classmethod
    def of(cls, search: SearchConfig) -> "SelectionRule":
        return cls(search.metric, search.mode, search.select, search.last_k)

    @property
    def score_name(self) -> str:
        """What a trial's score is, in words: `val_iou` (its best epoch's), `val_iou (last epoch)`, ..."""
        if self.select == "best":
            return self.metric
        if self.select == "last":
            return f"{self.metric} (last epoch)"
        return f"{self.metric} (mean of last {self.last_k} epochs)"


@dataclass
class Trial:
    """One Tune trial, or the one run of a `raytrain train` experiment."""

    name: str
    params: dict  # the searched values, by dotted config key
    history: list[dict] = field(default_factory=list)  # one report per epoch, in epoch order
    location: str = ""  # its folder
    kept: list[tuple[str, dict]] = field(default_factory=list)  # (location, metrics) of its complete checkpoints

    def score(self, rule: SelectionRule) -> tuple[float, dict] | None:
        """(the trial's score by `rule`, the report of the epoch that stands for it) from its history,
        or None when no epoch reported rule.metric."""
        scored = [row for row in self.history if _real_number(row.get(rule.metric))]
        if not scored:
            return None
        score, index = trial_score([row[rule.metric] for row in scored], rule.select, rule.last_k, rule.mode)
        return score, scored[index]


@dataclass(frozen=True)
class Standing:
    """A trial's score and the checkpoints that can stand for it (all of one epoch, the first preferred)."""

    trial: Trial
    score: float
    report: dict  # the epoch's report
    locations: list[str]


@dataclass(frozen=True)
class Selected:
    """The best trial by a rule, its score, and the checkpoint handed back for it."""

    trial: Trial
    score: float
    checkpoint: CheckpointInfo


def list_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Every checkpoint directory below `directory` (an experiment, a trial or a run), local or at a
    URI (s3://...); returned as locations of the same kind. Local symlinks below `directory` are not
    followed: a checkpoint_* linked to / would walk the whole machine, one linked elsewhere would
    mix in a checkpoint of another experiment."""
    filesystem, root = filesystem_of(directory)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise CheckpointError(f"{directory}: experiment directory not found")
    if isinstance(filesystem, pafs.LocalFileSystem):
        return _local_checkpoints(directory, root)
    files = {info.path for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))}
    directories = sorted(
        path[: -len(METRICS_FILE) - 1] for path in files
        if path.endswith(f"/{METRICS_FILE}") and f"{path[: -len(METRICS_FILE) - 1]}/{MODEL_FILE}" in files
    )
    return [_base(directory, root) + path[len(root.rstrip("/")) :] for path in directories]


def _base(directory: str | os.PathLike, root: str) -> str:
    """How locations below `directory` are written: absolute local paths, or its URI (keeping the
    scheme and options; file:// stays file://)."""
    return os.fspath(directory).rstrip("/") if is_uri(directory) else root.rstrip("/")


def _local_checkpoints(directory: str | os.PathLike, root: str) -> list[str]:
    found = []
    for folder, _, files in os.walk(root, followlinks=False):  # symlinked folders are listed, never entered
        if METRICS_FILE in files and MODEL_FILE in files and not any(
            os.path.islink(os.path.join(folder, name)) for name in (METRICS_FILE, MODEL_FILE)
        ):
            found.append(folder)
    return sorted(_base(directory, root) + folder[len(root.rstrip("/")) :] for folder in found)


def _real_number(value) -> bool:
    """JSON's Infinity, NaN and true are not scores: none of them may win a comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _complete_checkpoints(directory: str | os.PathLike, skipped: list[str] | None = None) -> list[tuple[str, dict]]:
    """(location, metrics) of every complete checkpoint below `directory` whose metrics.json reads. One
    that is incomplete (checkpoints.check_complete) or whose metrics.json is unreadable is left out;
    why is appended to `skipped` when given, so one damaged file never hides the others."""
    found = []
    for path in list_checkpoints(directory):
        try:
            check_complete(path)
            found.append((path, read_metrics(path)))
        except CheckpointError as err:
            if skipped is not None:
                skipped.append(str(err))
    return found


def experiment_trials(directory: str | os.PathLike, skipped: list[str] | None = None) -> list[Trial]:
    """The trials below `directory`: each folder holding Tune's params.json (or `directory` itself,
    when it holds one), with its history and the complete checkpoints below it. Checkpoints in no
    trial folder (all of them, in a `raytrain train` experiment) are the one run named after
    `directory`, whose history is what they recorded. Damage is appended to `skipped` when given."""
    kept = _complete_checkpoints(directory, skipped)
    filesystem, root = filesystem_of(directory)
    base = _base(directory, root)
    scheme = f"{urlsplit(base).scheme}://" if is_uri(base) else ""  # how a remote file is named in a note
    trials = []
    for name in _trial_folders(filesystem, root):
        location = f"{base}/{name}" if name else base
        own = [(path, metrics) for path, metrics in kept if path == location or path.startswith(location + "/")]
        kept = [(path, metrics) for path, metrics in kept if not (path == location or path.startswith(location + "/"))]
        folder = f"{root.rstrip('/')}/{name}" if name else root
        rows = _reports(filesystem, f"{folder}/{RESULTS_FILE}", scheme, skipped)
        trials.append(Trial(name or _name_of(root), _params(filesystem, f"{folder}/{PARAMS_FILE}", scheme, skipped),
                            _merged_history(rows, own), location, own))
    if kept or not trials:
        trials.append(Trial(_name_of(root), {}, _merged_history([], kept), base, kept))
    return trials


def _name_of(root: str) -> str:
    return root.rstrip("/").rsplit("/", 1)[-1]


def _trial_folders(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """The names of the folders in `root` that hold a params.json, sorted; [""] when root holds one."""
    if filesystem.get_file_info(f"{root}/{PARAMS_FILE}").type == pafs.FileType.File:
        return [""]
    children = [info for info in filesystem.get_file_info(pafs.FileSelector(root)) if info.type == pafs.FileType.Directory]
    if isinstance(filesystem, pafs.LocalFileSystem):  # not into another experiment through a link
        children = [info for info in children if not os.path.islink(info.path)]
    names = [info.base_name for info in children]
    found = filesystem.get_file_info([f"{root.rstrip('/')}/{name}/{PARAMS_FILE}" for name in names])
    return sorted(name for name, info in zip(names, found) if info.type == pafs.FileType.File)


def _read(filesystem: pafs.FileSystem, path: str, scheme: str, limit: int, kind: str,
          skipped: list[str] | None) -> bytes | None:
    """The file's bytes, None when there is none; one that does not read is appended to `skipped`."""
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    location = path if isinstance(filesystem, pafs.LocalFileSystem) else RemotePath(filesystem, path, scheme)
    try:
        return read_bounded(location, limit, kind, CheckpointError)
    except CheckpointError as err:
        if skipped is not None:
            skipped.append(str(err))
        return None


def _params(filesystem: pafs.FileSystem, path: str, scheme: str, skipped: list[str] | None) -> dict:
    data = _read(filesystem, path, scheme, RECORD_BYTES, "params", skipped)
    try:
        params = json.loads(data).get("search", {}) if data is not None else {}
    except (ValueError, AttributeError):
        params = None
    if not isinstance(params, dict):
        if skipped is not None:
            skipped.append(f"{scheme}{path}: not Tune's params JSON")
        return {}
    return params


def _reports(filesystem: pafs.FileSystem, path: str, scheme: str, skipped: list[str] | None) -> list[dict]:
    data = _read(filesystem, path, scheme, RESULTS_BYTES, "results", skipped)
    rows = []
    for line in (data or b"").decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _by_epoch(rows: list[dict]) -> list[dict]:
    """The last report of each epoch (a restored trial reports some epochs again), in epoch order."""
    latest = {row["epoch"]: row for row in rows if type(row.get("epoch")) is int}
    return [latest[epoch] for epoch in sorted(latest)]


def _merged_history(rows: list[dict], kept: list[tuple[str, dict]]) -> list[dict]:
    """Tune's reports by epoch, and the kept checkpoints' metrics for the epochs they lack (a trial
    whose result.json was not written, or a run without Tune's files)."""
    history = {row["epoch"]: row for row in _by_epoch(rows)}
    for row in _by_epoch([metrics for _, metrics in sorted(kept)]):
        history.setdefault(row["epoch"], row)
    return [history[epoch] for epoch in sorted(history)]


def _entries(trial: Trial, metric: str) -> list[tuple[float, dict, list[str]]]:
    """(value, report, checkpoints of it) for each epoch of the trial that reported `metric`, in epoch
    order; first, each kept checkpoint that records no epoch (made by hand), in path order. Of one
    epoch's checkpoints, one that recorded the same value first, then the Train run's own (Tune's
    copies for PBT, checkpoint_000001, are deleted after a few more), then the first in path order."""
    entries = [(metrics[metric], metrics, [path]) for path, metrics in sorted(trial.kept)
               if type(metrics.get("epoch")) is not int and _real_number(metrics.get(metric))]
    for row in trial.history:
        if not _real_number(row.get(metric)):
            continue
        own = [(path, metrics) for path, metrics in trial.kept if metrics.get("epoch") == row["epoch"]]
        own.sort(key=lambda entry: (entry[1].get(metric) != row[metric], _is_tune_copy(entry[0]), entry[0]))
        entries.append((row[metric], row, [path for path, _ in own]))
    return entries


def _standing(trial: Trial, rule: SelectionRule, unusable: set[str]) -> Standing | None:
    """The trial's score by `rule` and the checkpoints that stand for it. An epoch whose checkpoint
    was not kept or is damaged cannot stand for the trial: the rule is applied again without it."""
    entries = [(value, row, [path for path in paths if path not in unusable])
               for value, row, paths in _entries(trial, rule.metric)]
    while entries:
        score, index = trial_score([value for value, _, _ in entries], rule.select, rule.last_k, rule.mode)
        _, row, paths = entries[index]
        if paths:
            return Standing(trial, score, row, paths)
        del entries[index]
    return None


def ranked_trials(trials: list[Trial], rule: SelectionRule, unusable: set[str] = frozenset()) -> list[Standing]:
    """Each trial that has a checkpoint to stand for it, best first by `rule` (nothing fetched). On a
    tie, the Train run's own checkpoint before Tune's copy, then the first in path order."""
    standing = [found for trial in trials if (found := _standing(trial, rule, unusable)) is not None]
    sign = 1 if rule.mode == "max" else -1
    return sorted(standing, key=lambda found: (-sign * found.score, _is_tune_copy(found.locations[0]), found.locations[0]))


def best_of_trials(trials: list[Trial], rule: SelectionRule, directory: str | os.PathLike,
                   skipped: list[str] | None = None) -> Selected:
    """The best of `trials` (those of `directory`) by `rule`, its checkpoint read. A checkpoint whose
    config.yaml does not read is passed over, as is damage found before (`skipped`): a warning
    names each once the best is found; only when none is left is it an error, naming the first."""
    skipped = [] if skipped is None else skipped
    skipped += [f"{path}/{METRICS_FILE}: {rule.metric} is {json.dumps(metrics[rule.metric])}, not a real number"
                for trial in trials for path, metrics in trial.kept
                if metrics.get(rule.metric) is not None and not _real_number(metrics[rule.metric])]
    unusable: set[str] = set()
    while ranked := ranked_trials(trials, rule, unusable):
        top = ranked[0]
        for location in top.locations:
            try:
                checkpoint = read_checkpoint(location)
            except CheckpointError as err:
                skipped.append(str(err))
                unusable.add(location)
                continue
            for reason in skipped:
                warnings.warn(f"skipped {reason}", stacklevel=3)
            _note_unkept(trials, top, rule)
            return Selected(top.trial, top.score, checkpoint)
    because = f" (skipped {len(skipped)}; first: {skipped[0]})" if skipped else ""
    raise CheckpointError(f"{directory}: no checkpoint reports {rule.metric!r}{because}")


def _note_unkept(trials: list[Trial], best: Standing, rule: SelectionRule) -> None:
    """A note for each trial whose epoch that stands for it by its whole history has no complete
    checkpoint kept (an experiment kept by another rule, a checkpoint cut short), where it would
    have ranked the best trial's or above: what the trial table shows differs from what is handed back."""
    sign = 1 if rule.mode == "max" else -1
    for trial in trials:
        entries = _entries(trial, rule.metric)
        if not entries:
            continue
        score, index = trial_score([value for value, _, _ in entries], rule.select, rule.last_k, rule.mode)
        _, row, paths = entries[index]
        if paths or (trial is not best.trial and sign * score < sign * best.score):
            continue
        instead = f"epoch {best.report.get('epoch')}'s stands instead" if trial is best.trial else "it is passed over"
        warnings.warn(f"{trial.location}: epoch {row.get('epoch')} stands for the trial by {rule.score_name} "
                      f"({score:.4f}), but no complete checkpoint of it was kept; {instead}", stacklevel=4)


def select_best(directory: str | os.PathLike, rule: SelectionRule = SelectionRule()) -> Selected:
    """The best trial below `directory` by `rule`, and the checkpoint that stands for it."""
    skipped: list[str] = []
    return best_of_trials(experiment_trials(directory, skipped), rule, directory, skipped)


def best_location(directory: str | os.PathLike, rule: SelectionRule = SelectionRule()) -> str | None:
    """Where the checkpoint of the best trial by `rule` below `directory` is (nothing fetched), or None."""
    ranked = ranked_trials(experiment_trials(directory), rule)
    return ranked[0].locations[0] if ranked else None


def _is_tune_copy(path: str) -> bool:
    return re.fullmatch(r"checkpoint_\d{6}", os.path.basename(os.fspath(path).rstrip("/"))) is not None
