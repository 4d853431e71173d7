"""The north star: the three commands a user runs -- `data shard`, `tune`, `serve` -- as subprocesses
on tiny data, then an image POSTed to the server, whose mask must be the search's best model's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import raytrain
from tests.e2e.test_serve import decoded, png, post
from tests.helpers import free_port


def _cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_shard_tune_serve_and_a_posted_image_gets_the_best_models_mask(ray_cluster, synthetic_kitti, tmp_path):
    # The session's cluster stands in for the user's (RAY_ADDRESS): a cluster of its own costs its start-up.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    shards, results = tmp_path / "shards", tmp_path / "results"

    shard = _cli("data", "shard", synthetic_kitti, "--format", "kitti", "--out", shards, env=env)
    assert shard.returncode == 0, shard.stderr[-3000:]

    tune = _cli("tune", "quickstart", "--set", f"data.path={shards}", "--set", f"train.storage_path={results}",
                "--set", "train.epochs=2", "--set", "data.size=64x32", "--set", "model.base_channels=4",
                "--set", "search.num_samples=1", "--set", "search.max_concurrent_trials=1",
                "--set", "search.scheduler.grace_period=1", env=env)
    assert tune.returncode == 0, tune.stderr[-3000:]
    experiment = next(line.split(": ", 1)[1] for line in tune.stdout.splitlines() if line.startswith("experiment: "))
    best = raytrain.best_checkpoint(experiment)
    assert f"  raytrain serve {best.path}" in tune.stdout.splitlines()  # what it says to run next

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "raytrain.cli", "serve", experiment, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()  # printed once the endpoint answers
        assert line.startswith(f"serving {best.path} at "), line + server.stderr.read(3000) if server.poll() is not None else line
        image = np.asarray(Image.open(sorted(Path(synthetic_kitti, "training", "image_2").glob("*.png"))[0]).convert("RGB"))
        status, content_type, body = post(f"http://127.0.0.1:{port}/", png(image))
        assert (status, content_type) == (200, "image/png")
        mask = decoded(body)
        assert mask.shape == image.shape[:2]
        np.testing.assert_array_equal(mask, raytrain.predict(raytrain.load_model(best.path), [image], masks=True)[0])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        from ray import serve

        serve.shutdown()  # the session's CPUs, for the tests after this one
