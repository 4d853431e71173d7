"""Shared fixtures: one local Ray cluster for the session, tiny real datasets on disk, and an
S3-protocol server on 127.0.0.1 (moto's)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO, VAL_CATEGORIES, H, W, S3Server, camvid_annot, kitti_categories, small_disk_at, start_s3_server, tiny_config


def pytest_sessionstart(session):
    """tests/helpers.py's fork server imports torch and raytrain while pytest collects, on the other core.
    Under pytest-xdist (`-n`), only the workers run tests: the controller starts no server, and each
    worker's torch, server and CLI children use one thread, so that N workers on N cores do not spin
    N x N threads against each other."""
    import multiprocessing.forkserver

    from tests.helpers import forkserver

    xdist_worker = hasattr(session.config, "workerinput")
    if getattr(session.config.option, "numprocesses", None) and not xdist_worker:
        return
    if xdist_worker:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # the fork server and fresh interpreters inherit it
        torch.set_num_threads(1)
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


@pytest.fixture
def small_disk():
    """mount(folder, size): a real filesystem of `size` ("64k") at `folder` that fills up as a full
    disk does (helpers.small_disk_at); every one is unmounted when the test ends. Skips the test
    where this process may not mount."""
    with contextlib.ExitStack() as mounts:
        yield lambda folder, size: mounts.enter_context(small_disk_at(folder, size))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket and one user whose key it checks
    (helpers.start_s3_server); stopped when the session ends. Commands reach it only through the
    standard AWS variables of `s3_server.env`. Skips without moto (it comes with the dev extra)."""
    pytest.importorskip("moto.server")
    server, s3 = start_s3_server()
    yield s3
    server.stop()


@pytest.fixture
def s3_prefix(s3_server: S3Server, request) -> str:
    """s3://BUCKET/<a fresh prefix> for one test: tests share the server, never each other's keys."""
    import re
    import uuid

    return f"s3://{s3_server.bucket}/{re.sub('[^A-Za-z0-9_-]', '-', request.node.name)[:40]}-{uuid.uuid4().hex[:8]}"


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


def _tracking() -> str:
    """MLflow tracking where it is installed (the dev extra), so the shared runs also test it."""
    import importlib.util

    return "mlflow" if importlib.util.find_spec("mlflow") else "none"


@pytest.fixture(scope="session")
def trained_run(ray_cluster, grouped_shards, tmp_path_factory):
    """(config, Ray Result) of a finished 2-epoch, 2-worker run on the grouped shards (so it also
    reports val metrics per group; the search below runs on shards without groups). With train.ema:
    what it reports must be what its checkpoint loads (test_ray_train.py, test_predict.py)."""
    from raytrain.api import train

    storage = tmp_path_factory.mktemp("train")
    config = tiny_config(grouped_shards, storage, **{"train.epochs": 2, "train.tracking": _tracking(), "train.ema": 0.9})
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


@pytest.fixture
def run_scenario():
    """run(name) runs tests/e2e/multinode_scenarios.py's scenario `name` on a multi-node cluster of its
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
            [sys.executable, "-m", "tests.e2e.multinode_scenarios", name, str(workdir)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        result_file = workdir / "result.json"
        assert process.returncode == 0 and result_file.is_file(), process.stderr[-3000:]
        return {**json.loads(result_file.read_text()), "workdir": str(workdir)}

    yield run
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def camvid_tree(tmp_path):
    """A CamVid-layout folder of W x H images: train (2), val (1) and a test split raytrain never reads."""
    from PIL import Image
    import numpy as np

    root = tmp_path / "camvid"
    annots = {}
    for split, stems in {"train": ["0001TP_000010", "0001TP_000020"], "val": ["0016E5_000030"], "test": ["Seq05_0001"]}.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for k, stem in enumerate(stems):
            Image.fromarray(np.full((H, W, 3), 40 * k, np.uint8)).save(root / split / f"{stem}.jpg")
            annots[stem] = camvid_annot(len(annots))
            Image.fromarray(annots[stem], mode="L").save(root / f"{split}annot" / f"{stem}.png")
    return root, annots
