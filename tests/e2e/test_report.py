"""Real runs on the session Ray cluster -> TensorBoard event files and `raytrain report` output."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from raytrain.api import best_checkpoint, load_model, predict
from raytrain.reporting import write_report
from raytrain.viz import GRID_GAP
from tests.helpers import run_cli
from tests.helpers import VAL_CATEGORIES, read_events
from tests.helpers import CURVE_PNGS, _check_report


EPOCHS = 2


@pytest.fixture(scope="module")
def train_run(trained_run):
    """The experiment directory of conftest's finished 2-epoch, 2-worker `raytrain train` run."""
    assert trained_run[0].train.epochs == EPOCHS
    return Path(trained_run[1].path)


@pytest.fixture(scope="module")
def experiment(searched_run):
    """The experiment directory of conftest's finished 2-trial, 2-epoch search."""
    config, grid = searched_run
    assert config.train.epochs == EPOCHS
    # Tune's result files stay (its TensorBoard logger is off): ResultGrid reads every epoch from them
    assert [len(result.metrics_dataframe) for result in grid] == [EPOCHS, EPOCHS]
    return Path(grid.experiment_path)


def test_train_run_writes_tensorboard_scalars_and_overlays_from_rank_0(train_run):
    log_dir = train_run / "tensorboard"
    train, val = read_events(log_dir / "train"), read_events(log_dir / "val")
    steps = list(range(1, EPOCHS + 1))
    for tag in ("loss", "lr", "images_per_s"):
        assert [event.step for event in train.Scalars(tag)] == steps
    for tag in ("loss", "accuracy", "precision", "recall", "f1", "iou", "maxf", "ap"):
        assert [event.step for event in val.Scalars(tag)] == steps
    overlays = val.Images("val/overlay")
    assert [event.step for event in overlays] == steps
    assert overlays[0].width == 2 * 64 + GRID_GAP  # prediction | ground truth at the 64x32 training size
    # 2 DDP workers, one writer: one event file per run
    assert len(list((log_dir / "train").glob("events.out.tfevents.*"))) == 1
    assert len(list((log_dir / "val").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_logdir_of_a_search_shows_every_trial(experiment):
    multiplexer = EventMultiplexer(size_guidance={SCALARS: 0, IMAGES: 0})
    multiplexer.AddRunsFromDirectory(str(experiment))  # what `tensorboard --logdir EXPERIMENT` discovers
    multiplexer.Reload()
    runs = multiplexer.Runs()
    trials = sorted(p.name for p in experiment.glob("trial_*"))
    assert len(trials) == 2
    for trial in trials:
        train, val = f"{trial}/train/tensorboard/train", f"{trial}/train/tensorboard/val"
        assert "loss" in runs[train]["scalars"] and "loss" in runs[val]["scalars"]
        assert runs[val]["images"] == ["val/overlay"]
        assert len(multiplexer.Scalars(val, "iou")) == EPOCHS
        assert (experiment / trial / "result.json").is_file() and (experiment / trial / "progress.csv").is_file()
    # one copy of the curves: rank 0's, not Tune's too (it would add a run per trial of ray/tune/* tags)
    assert set(runs) == {f"{trial}/train/tensorboard/{run}" for trial in trials for run in ("train", "val")}


def test_report_of_a_search(experiment, tmp_path):
    out = tmp_path / "report"
    page = _check_report(out, write_report(experiment, out), CURVE_PNGS | {"params.png", "pr_curve.png", "overlays.png"})

    best = best_checkpoint(experiment)
    best_trial = best.path.relative_to(experiment).parts[0]
    rows = re.findall(r"<tr( class=\"best\")?><td>(\d+)</td><td>(trial_\w+)</td>", page)
    assert [(rank, trial) for _, rank, trial in rows][0] == ("1", best_trial)
    assert rows[0][0] and not rows[1][0]  # only the best row is marked
    assert sorted(trial for _, _, trial in rows) == sorted(p.name for p in experiment.glob("trial_*"))

    # the PR curve is the best model's on the val split: its MaxF is the one reported in training
    maxf = float(re.search(r"MaxF (\d\.\d{4})", page).group(1))
    assert maxf == pytest.approx(best.metrics["val_maxf"], abs=2e-4)


def test_report_overlay_shows_the_best_models_predictions(experiment, tmp_path):
    from raytrain.reporting import OVERLAY_SAMPLES, val_samples

    write_report(experiment, tmp_path)
    grid = np.asarray(Image.open(tmp_path / "overlays.png").convert("RGB"))
    best = best_checkpoint(experiment)
    images, masks = val_samples(best)
    probabilities = predict(load_model(best), images[:OVERLAY_SAMPLES])
    height, width = images[0].shape[:2]
    for row, (probs, mask) in enumerate(zip(probabilities, masks)):
        tile = grid[row * (height + GRID_GAP) : row * (height + GRID_GAP) + height]
        np.testing.assert_array_equal(np.all(tile[:, :width] == (255, 0, 0), axis=-1), probs > 0.5)
        np.testing.assert_array_equal(np.all(tile[:, width + GRID_GAP :] == (255, 0, 0), axis=-1), mask == 1)


def test_report_of_a_train_run_has_no_search_plot_and_a_table_by_group(train_run, tmp_path):
    page = _check_report(tmp_path, write_report(train_run, tmp_path), CURVE_PNGS | {"pr_curve.png", "overlays.png"})
    # conftest's run is on shards grouped by KITTI category: the best checkpoint's val IoU and F1 per group
    metrics = best_checkpoint(train_run).metrics
    rows = re.findall(r"<tr><td>([\w ]+)</td><td>(\d\.\d{4})</td><td>(\d\.\d{4})</td></tr>", page)
    assert [group for group, _, _ in rows] == sorted(VAL_CATEGORIES, key=lambda g: metrics[f"val_iou@{g}"]) + ["all groups"]
    for group, iou, f1 in rows:
        suffix = "" if group == "all groups" else f"@{group}"
        assert (float(iou), float(f1)) == pytest.approx((metrics[f"val_iou{suffix}"], metrics[f"val_f1{suffix}"]), abs=5e-5)


def _cli(*args):
    return run_cli(args, timeout=300)


def test_report_command(experiment, tmp_path):
    done = _cli("report", str(experiment), "--out", str(tmp_path / "out"), "--metric", "val_f1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "out" / "index.html")
    assert "<th>val_f1</th><th>val_iou</th>" in (tmp_path / "out" / "index.html").read_text()

    missing = _cli("report", str(tmp_path / "nope"), "--out", str(tmp_path / "bad"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"raytrain: error: {tmp_path / 'nope'}: experiment directory not found"
    not_an_experiment = _cli("report", str(tmp_path / "out"), "--out", str(tmp_path / "bad"))
    assert not_an_experiment.returncode == 2 and "no trial has reported any metrics" in not_an_experiment.stderr
    assert not (tmp_path / "bad").exists()  # nothing half-written
