"""storage/leftovers: a shard run killed mid-write leaves a temporary folder that the next run
removes, and only that; a running writer's folder is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain.data.formats import encode_kitti_gt
from raytrain.data.manifest import read_manifest
from raytrain.data.shards import write_shards
from raytrain.errors import DataError
from tests.helpers import kitti_folder, run_cli


def many_samples(root: Path, count: int = 700) -> Path:
    """A KITTI folder of `count` samples (hard links of one): long enough to be killed mid-write."""
    (root / "training/image_2").mkdir(parents=True)
    (root / "training/gt_image_2").mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 256, (96, 256, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "training/image_2/um_000000.png", compress_level=1)
    Image.fromarray(encode_kitti_gt(image[..., 0] > 128)).save(root / "training/gt_image_2/um_road_000000.png")
    for i in range(1, count):
        os.link(root / "training/image_2/um_000000.png", root / f"training/image_2/um_{i:06d}.png")
        os.link(root / "training/gt_image_2/um_road_000000.png", root / f"training/gt_image_2/um_road_{i:06d}.png")
    return root


def shard_cli(*args) -> list[str]:
    return [sys.executable, "-m", "raytrain.cli", "data", "shard", *map(str, args)]


def kill_mid_write(root: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """`data shard` killed with `sig` once its first shard file is on disk."""
    process = subprocess.Popen(shard_cli(root, "--format", "kitti", "--out", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.tmp-*/*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
        time.sleep(0.005)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_sigterm_mid_write_cleans_up_like_ctrl_c(tmp_path):
    out = tmp_path / "shards"
    run = kill_mid_write(many_samples(tmp_path / "many"), out, signal.SIGTERM)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stderr == "raytrain: terminated\n"
    assert not out.exists() and not list(tmp_path.glob(".shards.tmp-*"))


def test_sigkill_leftover_is_removed_by_the_next_run_and_nothing_else(tmp_path):
    root, out = many_samples(tmp_path / "many"), tmp_path / "shards"
    run = kill_mid_write(root, out, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    assert not out.exists() and not list(tmp_path.rglob("manifest.json"))  # no dataset, whole or half
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(out)
    [leftover] = tmp_path.glob(".shards.tmp-*")
    # Not ours to remove: a user's file and a folder that only looks like a temp folder (no marker).
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".shards.tmp-mine").mkdir()
    (tmp_path / ".shards.tmp-mine/keep.txt").write_text("mine too")

    # The next run, forked, of a few samples: what it finds in --out's folder is what is tested.
    rerun = run_cli(["data", "shard", many_samples(tmp_path / "few", count=20), "--format", "kitti", "--out", out], tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"raytrain: note: removed {leftover}, left by an interrupted run" in rerun.stderr
    assert f"raytrain: note: {tmp_path}/.shards.tmp-mine: left alone" in rerun.stderr
    assert not leftover.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / ".shards.tmp-mine/keep.txt").read_text() == "mine too"
    assert sum(read_manifest(out).num_samples.values()) == 20
    assert {p.name for p in out.iterdir()} == {"manifest.json", *(p.name for p in out.glob("*.parquet"))}  # no marker published


def test_a_running_writers_temp_folder_is_left_and_a_reused_pids_is_removed(tmp_path):
    """The pid in a leftover's name may be alive: a run still writing (left alone), or a newer
    process that got the same pid (its start time differs: removed)."""
    from raytrain.storage import leftovers
    import pyarrow.fs as pafs

    src = kitti_folder(tmp_path)
    live = leftovers.make_temp_dir(pafs.LocalFileSystem(), str(tmp_path / "out"), "out")
    reused = leftovers.make_temp_dir(pafs.LocalFileSystem(), str(tmp_path / "out2"), "out2")
    marker = Path(reused) / leftovers.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "start": "0"}))  # started before boot: not this process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_shards(src, "kitti", tmp_path / "out", val_fraction=0.5)
        write_shards(src, "kitti", tmp_path / "out2", val_fraction=0.5)
    assert Path(live).is_dir() and not Path(reused).exists()
    notes = [str(w.message) for w in caught]
    assert any(n.startswith(f"{live}: left alone, its run (pid {os.getpid()} on this host) may still be writing") for n in notes), notes
    assert any(n.startswith(f"removed {reused}") for n in notes), notes
