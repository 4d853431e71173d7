"""Predict a folder of images on a Ray cluster: Ray Data streams the image paths through a fixed
pool of model actors, each of which reads its images, predicts them with raytrain.predict (through
prediction.masks_and_overlays, as the one-process loop does) and writes each PNG atomically.

Only paths go out to the actors and one short status per image comes back: the dataset is never
held in memory. Images whose mask and overlay are already in the output folder are not predicted
again, so a killed run, rerun, does only the rest; OUT/prediction.json records which model (and
test-time augmentation) made them, and a rerun with another is refused rather than mixing the two.
An input that is not a readable image is skipped and listed in OUT/unreadable_inputs.txt.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import pyarrow.fs as pafs

from raytrain.data.images import read_rgb
from raytrain.errors import DataError, RaytrainError, one_line
from raytrain.inference.files import (
    PredictionSummary, check_prediction, claim_output_folder, mask_name, overlay_name, save_png,
)
from raytrain.inference.loading import load_model_from_files
from raytrain.inference.prediction import masks_and_overlays
from raytrain.launch.session import quiet_progress_warning
from raytrain.storage.atomic import final_of_temporary, write_atomically
from raytrain.storage.paths import as_path, filesystem_of, join

UNREADABLE_LIST = "unreadable_inputs.txt"
ACTORS_START_S = 600  # autoscaled GPU nodes take minutes to join


def predict_on_cluster(
    checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, workers: int,
    batch_size: int = 8, cpus_per_worker: float = 1, progress: Callable[[int, int], None] | None = None,
    tta: str | None = None,
) -> PredictionSummary:
    """`<name>_mask.png` and `<name>_overlay.png` in `out` (a folder or URI) for every input image not
    already done there, predicted by `workers` model actors (one GPU each when the cluster has GPUs).
    Everything that can be checked is checked before the first file is written."""
    started = time.monotonic()
    checked = check_prediction(checkpoint, inputs, out, tta)  # a bad checkpoint fails here, not in every actor
    locations = checked.locations
    filesystem, folder = filesystem_of(out)
    present = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))  # listed once: a bucket may hold millions
    done = _already_done(present, locations)
    todo = [location for location in locations if location not in done]
    filesystem.create_dir(folder, recursive=True)
    claim_output_folder(out, checked.record)
    _remove_leftover_temporaries(filesystem, present, todo)
    unreadable = _run(todo, checked.files, out, workers, batch_size, cpus_per_worker, progress, tta) if todo else []
    listed = _write_unreadable_list(out, unreadable)
    return PredictionSummary(len(todo) - len(unreadable), len(done), tuple(unreadable), listed, time.monotonic() - started)


def _remove_leftover_temporaries(filesystem: pafs.FileSystem, present: list[pafs.FileInfo], todo: list[str]) -> None:
    """Hidden partial files that a killed run left for the images still to do; one run per output
    folder at a time."""
    finals = {name for location in todo for name in (mask_name(as_path(location).stem), overlay_name(as_path(location).stem))}
    for info in present:
        if final_of_temporary(info.base_name) in finals and info.type == pafs.FileType.File:
            filesystem.delete_file(info.path)


def _already_done(present: list[pafs.FileInfo], locations: list[str]) -> set[str]:
    """Inputs whose mask and overlay are both in the output folder's listing (each written whole, so both there means done)."""
    names = {info.base_name for info in present}
    return {loc for loc in locations if {mask_name(as_path(loc).stem), overlay_name(as_path(loc).stem)} <= names}


def _run(todo: list[str], files: dict[str, bytes], out, workers, batch_size, cpus_per_worker, progress, tta) -> list[str]:
    """Stream `todo` through the actor pool; return the one-line errors of unreadable inputs."""
    import ray  # here, not at the top: a refused run answers before Ray's second of imports
    import ray.data

    from raytrain.console import QUIET
    from raytrain.launch.session import ensure_ray, user_error_inside

    ensure_ray(verbosity=QUIET)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet: Ray Data passes it on, with a deprecation warning.
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = ray.data.from_items([{"input": location} for location in todo]).map_batches(
            ModelActor, fn_constructor_kwargs={"files": files, "out": os.fspath(out), "device": "cuda" if gpus else "cpu",
                                               "batch_size": batch_size, "tta": tta},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            num_gpus=gpus,
            # Ray logs an error line for every restartable actor whose arguments are in the object store,
            # as an actor pool's always are (ray#53727); a predict that dies is rerun for only the rest.
            max_restarts=0,
        )
    # All N actors up before the first batch goes out: else the first one ready can take every batch.
    dataset.context.wait_for_min_actors_s = ACTORS_START_S
    unreadable, count = [], 0
    try:
        with quiet_progress_warning():
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                unreadable += [error for error in batch["error"] if error]
                count += len(batch["error"])
                if progress:
                    progress(count, len(todo))
    except ray.exceptions.GetTimeoutError:
        raise RaytrainError(f"predict --workers {workers}: the cluster did not start {workers} model actors of "
                            f"{cpus_per_worker:g} CPUs{' and 1 GPU' if gpus else ''} within {ACTORS_START_S} s: "
                            "lower --workers or add nodes") from None
    except Exception as err:  # a write that failed in an actor reaches here wrapped by Ray
        user_error = user_error_inside(err, writing=os.fspath(out))
        if user_error is None:
            raise
        raise user_error from None
    return unreadable


class ModelActor:
    """One model on one worker: reads a batch of input paths, writes their masks and overlays."""

    def __init__(self, files, out: str, device: str, batch_size: int, tta: str | None = None):
        self.model = load_model_from_files(files, device)
        self.out, self.batch_size, self.tta = out, batch_size, tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        inputs = [str(location) for location in batch["input"]]
        errors, readable = [""] * len(inputs), {}
        for index, location in enumerate(inputs):
            try:
                readable[index] = read_rgb(as_path(location))
            except DataError as err:
                errors[index] = str(err)
        results = masks_and_overlays(self.model, list(readable.values()), self.batch_size, self.tta)
        for index, (labels, painted) in zip(readable, results):
            stem = as_path(inputs[index]).stem
            save_png(labels, as_path(join(self.out, mask_name(stem))))
            save_png(painted, as_path(join(self.out, overlay_name(stem))))
        return {"input": inputs, "error": errors}


def _write_unreadable_list(out: str | os.PathLike, unreadable: list[str]) -> str | None:
    """The unreadable inputs' errors, one a line, in OUT/unreadable_inputs.txt; a list left from an
    earlier run is removed when none is left (its inputs were tried again)."""
    location = join(out, UNREADABLE_LIST)
    filesystem, path = filesystem_of(location)
    if not unreadable:
        if filesystem.get_file_info(path).type == pafs.FileType.File:
            filesystem.delete_file(path)
        return None
    write_atomically(location, "".join(f"{one_line(error)}\n" for error in unreadable).encode())
    return location
