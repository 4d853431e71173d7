"""experiments: a new directory per run, a name folder resolves to its latest experiment,
`raytrain runs` lists newest first (written without Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import raytrain
from raytrain import experiments
from tests.helpers import run_cli
from tests.helpers import tiny_config
from tests.helpers import _hand_made_run


def test_two_experiments_started_in_the_same_second_never_share_a_directory(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "results")
    first, second = (experiments.create_experiment(config, "tune") for _ in range(2))
    assert first != second and Path(first).parent == Path(second).parent == tmp_path / "results" / "tiny"
    record = json.loads((Path(second) / experiments.MARKER).read_text())
    assert (record["kind"], record["status"], record["pid"]) == ("tune", "running", os.getpid())
    assert experiments.experiment_config(second) == config


def test_a_name_folder_resolves_to_its_latest_experiment_and_says_so(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "results", **{"data.size": "32x16"})
    older = _hand_made_run(config, ious=(0.9, 0.95))  # the better one: never taken for the newer experiment
    newer = _hand_made_run(config)
    assert experiments.experiments_in(tmp_path / "results" / "tiny") == [newer, older]
    with pytest.warns(UserWarning, match=f"holds 2 experiments; using the latest, {newer}"):
        best = raytrain.best_checkpoint(tmp_path / "results" / "tiny")
    assert best.experiment == newer and best.metrics["val_iou"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert raytrain.best_checkpoint(older).metrics["val_iou"] == 0.95

    done = run_cli(["best", tmp_path / "results" / "tiny", "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["experiment"] == newer
    assert done.stderr.strip() == f"raytrain: note: {tmp_path / 'results' / 'tiny'} holds 2 experiments; using the latest, {newer}"


def test_best_checkpoint_takes_the_result_that_train_returned_as_it_is(tmp_path):
    """As from `result = raytrain.train(...)`: Ray's Result names its experiment on its filesystem
    (a bucket/key on S3, where only the result's filesystem says it is S3: test_paths)."""
    import pyarrow.fs as pafs
    from ray.train import Result

    experiment = _hand_made_run(tiny_config(tmp_path, tmp_path / "results", **{"data.size": "32x16"}))
    result = Result(metrics={}, checkpoint=None, error=None, path=experiment, _storage_filesystem=pafs.LocalFileSystem())
    best = raytrain.best_checkpoint(result)
    assert best.experiment == experiment and best.path == raytrain.best_checkpoint(experiment).path
    assert best.metrics["val_iou"] == 0.5


def test_runs_lists_newest_first_and_a_killed_run_as_interrupted(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "results", **{"data.size": "32x16"})
    finished = _hand_made_run(config)
    killed = experiments.create_experiment(config.with_overrides({"name": "other"}), "tune")
    record = json.loads((Path(killed) / experiments.MARKER).read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.update(pid=int(dead.stdout), created="9999-01-01T00:00:00+0000")  # the newest, its process gone
    (Path(killed) / experiments.MARKER).write_text(json.dumps(record))

    rows = [run.to_dict() for run in raytrain.runs(tmp_path / "results")]
    assert [(r["path"], r["status"], r["kind"], r["best"]) for r in rows] == [
        (killed, "interrupted", "tune", None), (finished, "finished", "train", 0.5)]
    listed = run_cli(["runs", tmp_path / "results", "--json"])
    assert listed.returncode == 0 and json.loads(listed.stdout) == rows
    table = run_cli(["runs", tmp_path / "results"])
    assert table.stdout.splitlines()[0].split() == ["name", "created", "kind", "trials", "status", "best", "path"]
    assert "val_iou 0.5000" in table.stdout and "interrupted" in table.stdout
