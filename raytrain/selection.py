"""Which checkpoint is best: every checkpoint below an experiment, trial or run, scored by one
metric from its metrics.json, ranked, and the best read (nothing fetched until then). A damaged or
incomplete checkpoint is passed over with a note; it never hides the others, nor wins.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import pyarrow.fs as pafs

from raytrain.checkpoints import METRICS_FILE, MODEL_FILE, CheckpointInfo, check_complete, read_checkpoint, read_metrics
from raytrain.errors import CheckpointError
from raytrain.storage.paths import filesystem_of, is_uri

MODES = ("min", "max")  # how a metric ranks checkpoints: lower or higher is better


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
    prefix = os.fspath(directory).rstrip("/")  # keep the URI's scheme and options
    return [prefix + path[len(root.rstrip("/")) :] for path in directories]


def _local_checkpoints(directory: str | os.PathLike, root: str) -> list[str]:
    found = []
    for folder, _, files in os.walk(root, followlinks=False):  # symlinked folders are listed, never entered
        if METRICS_FILE in files and MODEL_FILE in files and not any(
            os.path.islink(os.path.join(folder, name)) for name in (METRICS_FILE, MODEL_FILE)
        ):
            found.append(folder)
    if not is_uri(directory):
        return sorted(found)
    prefix = os.fspath(directory).rstrip("/")  # file:// stays file://
    return sorted(prefix + folder[len(root.rstrip("/")) :] for folder in found)


def _real_number(value) -> bool:
    """JSON's Infinity, NaN and true are not scores: none of them may win a comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scored_checkpoints(directory: str | os.PathLike, metric: str, skipped: list[str] | None = None) -> list[tuple[float, str]]:
    """(value of `metric`, location) of every complete checkpoint below `directory` that reports it
    as a real number. A checkpoint that is incomplete (checkpoints.check_complete), whose metrics.json
    is unreadable or whose value is not a real number is left out; why is appended to `skipped` when
    given, so one damaged file never hides the others."""
    scored = []
    for path in list_checkpoints(directory):
        try:
            check_complete(path)
            metrics = read_metrics(path)
        except CheckpointError as err:
            if skipped is not None:
                skipped.append(str(err))
            continue
        value = metrics.get(metric)
        if _real_number(value):
            scored.append((value, path))
        elif value is not None and skipped is not None:
            skipped.append(f"{path}/{METRICS_FILE}: {metric} is {json.dumps(value)}, not a real number")
    return scored


def ranked_locations(directory: str | os.PathLike, metric: str = "val_iou", mode: str = "max",
                     skipped: list[str] | None = None) -> list[str]:
    """The checkpoints below `directory` that report `metric`, best first (nothing fetched)."""
    if mode not in MODES:
        raise CheckpointError(f"mode must be {' or '.join(map(repr, MODES))}, not {mode!r}")
    scored = scored_checkpoints(directory, metric, skipped)
    # On a tie, the Train run's own checkpoint (Tune's copies for PBT, checkpoint_000001, are deleted
    # after a few more), then the first in path order (sorted is stable).
    sign = 1 if mode == "max" else -1
    return [path for _, path in sorted(scored, key=lambda item: (-sign * item[0], _is_tune_copy(item[1])))]


def best_location(directory: str | os.PathLike, metric: str = "val_iou", mode: str = "max") -> str | None:
    """Where the checkpoint with the best `metric` below `directory` is (nothing fetched), or None."""
    ranked = ranked_locations(directory, metric, mode)
    return ranked[0] if ranked else None


def best_checkpoint_in(directory: str | os.PathLike, metric: str = "val_iou", mode: str = "max") -> CheckpointInfo:
    """The checkpoint with the best `metric` among all trials and epochs kept below `directory`.

    A checkpoint with a damaged metrics.json or config.yaml is passed over with a warning naming
    the file; only when none is left is it an error (which then names the first damage)."""
    skipped: list[str] = []
    for location in ranked_locations(directory, metric, mode, skipped):
        try:
            best = read_checkpoint(location)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        for reason in skipped:
            warnings.warn(f"skipped {reason}", stacklevel=2)
        return best
    because = f" (skipped {len(skipped)}; first: {skipped[0]})" if skipped else ""
    raise CheckpointError(f"{directory}: no checkpoint reports {metric!r}{because}")


def _is_tune_copy(path: str) -> bool:
    return re.fullmatch(r"checkpoint_\d{6}", os.path.basename(os.fspath(path).rstrip("/"))) is not None
