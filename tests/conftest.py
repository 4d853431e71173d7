"""Shared fixtures: one local Ray cluster for the session, and tiny real datasets on disk."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_dotted(tree: dict, **dotted) -> dict:
    """tree with each dotted key (`train.epochs`) set to its value, sections made as needed."""
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def read_events(log_dir: Path | str):
    """Every scalar and image in a TensorBoard log folder, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    accumulator.Reload()
    return accumulator


def pytest_sessionstart(session):
    """tests/processes.py's fork server imports torch and raytrain while pytest collects, on the other core."""
    import multiprocessing.forkserver

    from tests.processes import forkserver

    forkserver()
    multiprocessing.forkserver.ensure_running()


def pytest_collection_modifyitems(items):
    """Every test on the session's Ray cluster is marked `ray`: `pytest -m "not ray"` is the quick tier.
    (Tests that start Ray in a subprocess carry the mark themselves.)"""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raytrain.console import QUIET
    from raytrain.launch.session import ensure_ray

    # Explicit logical CPUs: 2 DDP workers of 1 CPU each, plus room for Ray Data's tasks.
    ensure_ray(4, verbosity=QUIET)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_kitti(tmp_path_factory):
    """24 synthetic scenes at 64x32 in the KITTI road layout."""
    from raytrain.data.synthetic import write_synthetic_kitti

    return write_synthetic_kitti(tmp_path_factory.mktemp("synth") / "kitti", 24, seed=1, size=(64, 32))


@pytest.fixture(scope="session")
def tiny_shards(synthetic_kitti, tmp_path_factory):
    from raytrain.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(synthetic_kitti, "kitti", out, val_fraction=0.25, rows_per_shard=4)
    return out


# KITTI road's three categories, as in its file names (um_000000.png): the groups of `grouped_shards`.
CATEGORIES = {"um": 14, "umm": 5, "uu": 5}
VAL_CATEGORIES = ["umm", "uu"]


def kitti_categories(root: Path, categories: dict[str, int] = CATEGORIES) -> Path:
    """Rename a synthetic KITTI folder's samples (all `um_*`) into consecutive runs of `categories`."""
    names = [name for name, count in categories.items() for _ in range(count)]
    for index, name in enumerate(names):
        for folder, kind in (("image_2", ""), ("gt_image_2", "road_")):
            old = root / "training" / folder / f"um_{kind}{index:06d}.png"
            old.rename(old.with_name(f"{name}_{kind}{index:06d}.png"))
    return root


@pytest.fixture(scope="session")
def grouped_kitti(tmp_path_factory):
    """24 synthetic scenes at 64x32 named as KITTI's categories: 14 um, 5 umm, 5 uu."""
    from raytrain.data.synthetic import write_synthetic_kitti

    return kitti_categories(write_synthetic_kitti(tmp_path_factory.mktemp("grouped") / "kitti", 24, seed=1, size=(64, 32)))


@pytest.fixture(scope="session")
def grouped_shards(grouped_kitti, tmp_path_factory):
    """grouped_kitti sharded by category (`--group-by '^[^_]+'`), umm and uu making up val."""
    from raytrain.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "grouped"
    write_shards(grouped_kitti, "kitti", out, rows_per_shard=4, group_by="^[^_]+", val_groups=VAL_CATEGORIES)
    return out


def tiny_config(shards, storage, **overrides):
    """A valid Config for tiny, fast runs on `shards`, storing results under `storage`."""
    from raytrain.config import load_config

    base = {
        "name": "tiny",
        "data": {"path": str(shards), "size": "64x32", "shuffle_buffer": 0},
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 2, "batch_size": 4, "num_workers": 2, "storage_path": str(storage), "max_failures": 0},
    }
    return load_config(base, overrides)


def _tracking() -> str:
    """MLflow tracking where it is installed (the dev extra), so the shared runs also test it."""
    import importlib.util

    return "mlflow" if importlib.util.find_spec("mlflow") else "none"


@pytest.fixture(scope="session")
def trained_run(ray_cluster, grouped_shards, tmp_path_factory):
    """(config, Ray Result) of a finished 2-epoch, 2-worker run on the grouped shards (so it also
    reports val metrics per group; the search below runs on shards without groups)."""
    from raytrain.api import train

    storage = tmp_path_factory.mktemp("train")
    config = tiny_config(grouped_shards, storage, **{"train.epochs": 2, "train.tracking": _tracking()})
    return config, train(config)


@pytest.fixture(scope="session")
def searched_run(ray_cluster, tiny_shards, tmp_path_factory):
    """(config, Ray ResultGrid) of a finished 2-trial, 2-epoch FIFO search on the tiny shards (one
    worker per trial, so both trials run at once beside Ray Data's tasks)."""
    from raytrain.api import tune

    storage = tmp_path_factory.mktemp("tune")
    config = tiny_config(tiny_shards, storage, name="search", **{
        "train.epochs": 2, "train.num_workers": 1, "train.tracking": _tracking(),
        "search.space": {"optim.lr": {"grid": [1e-3, 1e-2]}}, "search.scheduler.name": "fifo",
    })
    grid = tune(config)
    assert not grid.errors
    return config, grid


def wait_for(condition, what: str, timeout: float = 480):
    """Poll `condition` until it returns something true, and return that; a guard against hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture
def run_scenario():
    """run(name) runs tests/multinode_scenarios.py's scenario `name` on a multi-node cluster of its
    own, in a subprocess, and returns its result.json; its WORKDIR (result["workdir"]) lasts until
    the test ends."""
    workdirs = []

    def run(name: str) -> dict:
        # Short: Ray's Unix socket paths under this directory must stay below 108 characters.
        workdir = Path(tempfile.mkdtemp(prefix="rt-mn-"))
        workdirs.append(workdir)
        env = dict(os.environ, RAY_TMPDIR=str(workdir / "ray"))
        env.pop("RAY_ADDRESS", None)
        (workdir / "ray").mkdir()
        process = subprocess.run(
            [sys.executable, "-m", "tests.multinode_scenarios", name, str(workdir)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        result_file = workdir / "result.json"
        assert process.returncode == 0 and result_file.is_file(), process.stderr[-3000:]
        return {**json.loads(result_file.read_text()), "workdir": str(workdir)}

    yield run
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
