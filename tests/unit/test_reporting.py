"""reporting: the report of a multiclass run, written without Ray (the reports of real runs are
e2e/test_report.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain.api import best_checkpoint, load_model, predict
from raytrain.reporting import write_report
from tests.helpers import run_cli, start_cli, tiny_config
from tests.helpers import CURVE_PNGS, _check_report


@pytest.fixture
def two_class_run(tiny_shards, tmp_path) -> Path:
    """A 2-class (softmax) run saved by hand with real checkpoint files: no Ray needed to report it."""
    import torch

    from raytrain.checkpoints import save_checkpoint
    from raytrain.models import create_model

    config = tiny_config(tiny_shards, tmp_path, name="two_classes", classes=["background", "road"])
    run = tmp_path / "two_classes"
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=2, **config.model.kwargs())
    optimizer = torch.optim.Adam(model.parameters())
    for epoch, iou in ((1, 0.3), (2, 0.4)):
        metrics = {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "val_accuracy": 0.5,
                   "val_f1": iou + 0.1, "val_iou": iou}
        save_checkpoint(run / f"checkpoint_{epoch}", model, optimizer, None, epoch, config, metrics)
    return run


def test_report_of_a_multiclass_run_shows_the_palette_and_no_pr_curve(two_class_run, tmp_path):
    from raytrain.reporting import val_samples
    from raytrain.viz import overlay

    run, out = two_class_run, tmp_path / "report"
    _check_report(out, write_report(run, out), CURVE_PNGS | {"overlays.png"})
    grid = np.asarray(Image.open(out / "overlays.png").convert("RGB"))
    best = best_checkpoint(run)
    assert best.path == run / "checkpoint_2"
    image = val_samples(best)[0][0]
    height, width = image.shape[:2]
    expected = overlay(image, predict(load_model(best), [image])[0], ["background", "road"])
    np.testing.assert_array_equal(grid[:height, :width], expected)


def test_a_report_killed_while_writing_leaves_the_last_report_and_the_next_one_clears_its_folder(two_class_run, tmp_path):
    out = tmp_path / "report"
    assert run_cli(["report", two_class_run, "--out", out]).returncode == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    process = start_cli(["report", two_class_run, "--out", out], tmp_path / "stdout", tmp_path / "stderr")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".report.tmp-*/*.png")):  # killed once its first plot is written
        assert process.is_alive() and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
        time.sleep(0.005)
    process.kill()
    process.join()
    [leftover] = tmp_path.glob(".report.tmp-*")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # the last report, whole

    again = run_cli(["report", two_class_run, "--out", out])
    assert again.returncode == 0, again.stderr
    assert again.stderr == f"raytrain: note: removed {leftover}, left by an interrupted run (pid {process.pid})\n"
    assert not list(tmp_path.glob(".report.tmp-*"))
    assert {path.name for path in out.iterdir()} == set(before)  # no marker file published


def test_the_trial_table_shows_each_intervals_and_marks_the_trials_tied_with_the_best():
    from raytrain.reporting import Trial, results_rows
    from raytrain.selection import SelectionRule

    def trial(name, iou, low, high):
        return Trial(name, {"optim.lr": 0.001}, [{"epoch": 1, "val_iou": iou, "val_f1": iou, "val_iou_low": low, "val_iou_high": high}])

    trials = [trial("apart", 0.70, 0.65, 0.74), trial("best", 0.90, 0.86, 0.93), trial("close", 0.85, 0.80, 0.87),
              Trial("unscored", {"optim.lr": 0.01}, [])]
    header, rows = results_rows(trials, SelectionRule("val_iou", "max"))
    assert header[-4:] == ["95% interval", "vs best", "best epoch", "epochs"]
    table = {trial.name: dict(zip(header, cells)) for trial, cells in rows}
    assert [trial.name for trial, _ in rows] == ["best", "close", "apart", "unscored"]
    assert table["best"]["95% interval"] == "0.8600-0.9300" and table["best"]["vs best"] == "best"
    assert table["close"]["vs best"] == "tied" and table["apart"]["vs best"] == ""  # 0.87 >= 0.86; 0.74 < 0.86
    assert table["unscored"]["95% interval"] == table["unscored"]["vs best"] == ""
    # without intervals (runs from before them), the table is as it was
    header, _ = results_rows([Trial("old", {}, [{"epoch": 1, "val_iou": 0.5}])], SelectionRule())
    assert "95% interval" not in header
