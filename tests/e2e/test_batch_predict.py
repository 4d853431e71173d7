"""Predict on a Ray cluster (raytrain predict --workers N): the same masks as raytrain.predict, from
model actors on two nodes; a killed run, rerun, does only the rest; writes are whole or absent.

Real clusters in subprocesses (conftest.run_scenario, a real `raytrain` CLI process), real files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import raytrain
from raytrain.storage.atomic import temporary_beside
from tests.helpers import wait_for, write_images
from tests.helpers import checkpoint


def assert_predicted_like_raytrain_predict(ckpt: Path, images: list[Path], out: Path) -> None:
    model = raytrain.load_model(ckpt)
    for image in images:
        mask = np.asarray(Image.open(out / f"{image.stem}_mask.png"))
        np.testing.assert_array_equal(mask, raytrain.predict(model, [image], masks=True)[0], err_msg=image.name)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.multinode
def test_two_nodes_write_one_mask_per_input_as_raytrain_predict(run_scenario):
    result = run_scenario("batch_predict")
    workdir = Path(result["workdir"])
    images = sorted((workdir / "images").glob("img*.png"))
    assert result["error"] is None
    assert result["actor_nodes"] == ["node_a", "node_b"]  # one 2-CPU model actor on each worker node
    assert result["written"] == len(images) == 20 and result["already_done"] == 0
    assert sorted(p.name for p in (workdir / "masks").iterdir()) == sorted(
        [f"{p.stem}_{kind}.png" for p in images for kind in ("mask", "overlay")] + ["prediction.json", "unreadable_inputs.txt"])
    assert_predicted_like_raytrain_predict(workdir / "exp" / "ckpt", images, workdir / "masks")
    masks = np.concatenate([np.asarray(Image.open(workdir / "masks" / f"{p.stem}_mask.png")).ravel() for p in images])
    assert set(np.unique(masks)) == {0, 1}  # not a blank model: equal masks say something
    broken = f"{workdir / 'images' / 'broken.png'}: not a readable image (UnidentifiedImageError)"
    assert result["unreadable"] == [broken]
    assert (workdir / "masks" / "unreadable_inputs.txt").read_text() == broken + "\n"


def complete_outputs(out: Path) -> set[str]:
    return {p.name[: -len("_mask.png")] for p in out.glob("*_mask.png") if (out / p.name.replace("_mask", "_overlay")).exists()}


def alive_model_actors(ray) -> list:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    return list_actors(address=address, filters=[("class_name", "=", "MapWorker(MapBatches(ModelActor))"), ("state", "=", "ALIVE")])


@pytest.mark.slow
def test_a_killed_run_rerun_does_only_the_rest(ray_cluster, tmp_path):
    ckpt = checkpoint(tmp_path)
    # Large enough that the run still has seconds of work when its first image is done.
    images = sorted(write_images(tmp_path / "images", 24, (480, 640)).iterdir())
    out = tmp_path / "masks"
    command = [sys.executable, "-m", "raytrain.cli", "predict", str(ckpt), str(tmp_path / "images"), "--out", str(out),
               "--workers", "1", "--batch-size", "1"]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)  # a job on the session's cluster
    killed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: complete_outputs(out) or killed.poll() is not None, "the first image's mask and overlay", 300)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    wait_for(lambda: not alive_model_actors(ray_cluster), "the killed job's model actor to end", 60)
    done = complete_outputs(out)
    assert killed.returncode == -signal.SIGKILL and 0 < len(done) < len(images), (killed.returncode, len(done))
    finals = sorted(p for p in out.glob("*.png") if not p.name.startswith("."))
    for path in finals:  # whatever has a final name is a whole PNG (temporary files start with a dot)
        with Image.open(path) as written:
            written.load()
            assert written.size == (640, 480), path
    stamps = {p: p.stat().st_mtime_ns for p in finals if p.name.split("_")[0] in done}
    todo = sorted({p.stem for p in images} - done)
    leftover = Path(temporary_beside(str(out / f"{todo[0]}_mask.png")))  # as a write cut off mid-way leaves it
    leftover.write_bytes(b"\x89PNG partial")
    (out / ".not-ours").write_text("kept")

    rerun = subprocess.run(command, env=dict(env, RAYTRAIN_PROGRESS_EVERY_S="0"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"wrote {len(images) - len(done)} masks and overlays" in rerun.stdout
    assert f"skipped {len(done)} already done" in rerun.stdout
    progress = [line.split(" images,")[0] for line in rerun.stderr.splitlines() if line.startswith("predict: ")]
    assert progress and all(line.endswith(f"/{len(todo)}") for line in progress), rerun.stderr  # counts only the rest
    assert len(progress) == len(rerun.stderr.splitlines()), rerun.stderr  # and nothing else: no Ray log lines
    assert complete_outputs(out) == {p.stem for p in images}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the done ones were not written again
    assert not leftover.exists() and (out / ".not-ours").read_text() == "kept"
    assert json.loads((out / "prediction.json").read_text())["checkpoint"] == str(ckpt)
    assert_predicted_like_raytrain_predict(ckpt, images[::8], out)
