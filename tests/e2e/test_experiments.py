"""Experiments you can find again: a new directory per run, best checkpoints from one experiment
only, explicit resume, `raytrain runs`, and a Python API with a twin for every command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import raytrain
from raytrain import experiments
from tests.helpers import tiny_config


def _cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytrain.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def _checkpoint_epochs(directory: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["epoch"] for p in directory.rglob("checkpoint_*/metrics.json"))


@pytest.mark.ray
def test_train_twice_gives_two_fresh_runs_and_resume_continues_the_latest(ray_cluster, tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path / "results", **{"name": "twice", "train.epochs": 1, "train.num_workers": 1})
    first, second = raytrain.train(config), raytrain.train(config.with_overrides({"optim.lr": 1e-2}))
    assert first.path != second.path
    for result in (first, second):  # each trained its own epoch 1, from scratch
        assert list(result.metrics_dataframe["epoch"]) == [1] and _checkpoint_epochs(Path(result.path)) == [1]
    epoch_one = {p: p.stat().st_mtime_ns for p in Path(second.path).rglob("checkpoint_*/*")}

    resumed = raytrain.train(config, {"train.epochs": 2}, resume=True)
    assert resumed.path == second.path and resumed.metrics["epoch"] == 2
    assert _checkpoint_epochs(Path(second.path)) == [1, 2] and _checkpoint_epochs(Path(first.path)) == [1]
    assert resumed.checkpoint and raytrain.load_model(resumed.checkpoint.path)  # loads with the run's own config
    assert {p: p.stat().st_mtime_ns for p in epoch_one} == epoch_one  # epoch 1 was not trained again
    assert json.loads((Path(second.path) / experiments.MARKER).read_text())["status"] == "finished"
    assert experiments.experiment_config(second.path).optim.lr == 1e-2
    with pytest.raises(raytrain.RaytrainError, match="nothing to resume"):
        raytrain.train(config, resume=second.path)


@pytest.mark.ray
@pytest.mark.slow
def test_quickstart_command_runs_a_quiet_search_and_prints_the_next_steps(tmp_path):
    """The README's first command, small: it makes the data, runs a quiet search that keeps its best
    checkpoint, and ends with the next steps; run again, it makes no data. (The second run is refused
    before Ray starts: a second search was 80 s of CI, near its limit.)"""
    args = ["quickstart", "--data-dir", str(tmp_path / "data"),
            "--set", f"train.storage_path={tmp_path / 'results'}", "--set", "train.epochs=1",
            "--set", "search.num_samples=1", "--set", "search.scheduler.grace_period=1",  # its grid's 2 trials, together
            "--set", "data.size=64x32", "--set", "model.base_channels=4"]
    # A progress line at every update rank 0 sends, as in a log (stderr is not a terminal here).
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAYTRAIN_PROGRESS_EVERY_S": "0"}
    done = _cli(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "making 400 synthetic road scenes" in out
    experiment, *_, last = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("experiment: ")]
    assert experiment == last  # printed at the start and at the end
    best = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("best checkpoint: ")]
    assert best and Path(best[0]).is_relative_to(experiment)
    assert raytrain.best_checkpoint(experiment).path == Path(best[0])
    # It ends with what to run next, on what it made, and Ray warned of nothing along the way.
    lines = out.splitlines()
    assert lines[lines.index("next:") - 1].startswith("quickstart took ")
    assert lines[lines.index("next:"):] == [
        "next:", f"  raytrain serve {best[0]}", f"  raytrain predict {best[0]} IMAGES... --out predictions",
        f"  raytrain evaluate {best[0]} {tmp_path / 'data' / 'synthetic_shards'}",
        f"  raytrain report {experiment} --out report", f"  tensorboard --logdir {experiment}",
    ]
    assert not [line for line in lines if "WARNING" in line or "(raylet)" in line]
    assert not [line for line in done.stderr.splitlines() if "WARNING" in line or "(raylet)" in line]
    # Progress within each epoch, as lines (no terminal): which trial, how far, how fast, time left.
    progress = [line for line in done.stderr.splitlines() if " epoch 1/1: " in line]
    assert progress and all(line.startswith("trial ") and " images/s" in line for line in progress), done.stderr[-3000:]
    assert "\r" not in done.stderr

    [run] = raytrain.runs(tmp_path / "results")
    assert (run.path, run.kind, run.trials, run.status) == (experiment, "tune", 2, "finished")

    # Run again, it reuses the data: here on one CPU, which its search cannot fit (refused before Ray starts).
    made = {path: path.stat().st_mtime_ns for path in (tmp_path / "data").rglob("*")}
    again = _cli(*args, "--num-cpus", "1", env=env)
    assert again.returncode == 2 and "needs 2 CPUs" in again.stderr, again.stderr[-3000:]
    assert "making" not in again.stdout
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "data").rglob("*")} == made
