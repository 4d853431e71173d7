"""selection: trial_score on small lists, and each rule's pick (trial and checkpoint) of a search
written without Ray (helpers.search_for_selection: Tune's files and real sealed checkpoints)."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest

import raytrain
from raytrain.checkpoints import seal
from raytrain.errors import CheckpointError
from raytrain.reporting import trials_table
from raytrain.selection import SelectionRule, select_best, trial_score
from tests.helpers import run_cli, search_for_selection, selection_checkpoint

VALUES = [0.5, 0.9, 0.7, 0.6]


@pytest.mark.parametrize("select, last_k, mode, expected", [
    ("best", 3, "max", (0.9, 1)),
    ("best", 3, "min", (0.5, 0)),
    ("last", 3, "max", (0.6, 3)),
    ("last", 3, "min", (0.6, 3)),
    ("mean_last", 3, "max", ((0.9 + 0.7 + 0.6) / 3, 3)),
    ("mean_last", 2, "min", ((0.7 + 0.6) / 2, 3)),
    ("mean_last", 1, "max", (0.6, 3)),
    ("mean_last", 9, "max", ((0.5 + 0.9 + 0.7 + 0.6) / 4, 3)),  # fewer epochs than last_k: all of them
])
def test_trial_score(select, last_k, mode, expected):
    score, index = trial_score(VALUES, select, last_k, mode)
    assert (score, index) == (pytest.approx(expected[0]), expected[1])


def test_trial_score_takes_the_first_of_equal_best_epochs_and_refuses_what_is_no_rule():
    assert trial_score([0.3, 0.2, 0.2, 0.4], "best", 3, "min") == (0.2, 1)
    assert trial_score([0.4, 0.8, 0.8], "best", 3, "max") == (0.8, 1)
    assert trial_score([0.7], "mean_last", 3, "max") == (0.7, 0)
    for values, select, last_k, mode in [([], "best", 3, "max"), ([0.5, float("nan")], "last", 3, "max"),
                                         ([0.5], "median", 3, "max"), ([0.5], "mean_last", 0, "max"),
                                         ([0.5], "best", 3, "up")]:
        with pytest.raises(ValueError):
            trial_score(values, select, last_k, mode)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """The crafted search, recording search.select mean_last with last_k 2 as its own rule."""
    return search_for_selection(tmp_path_factory.mktemp("selection"), select="mean_last", last_k=2)


# The rule, the trial and epoch it picks, and that trial's score (SELECTION_TRIALS).
PICKS = [
    pytest.param({"select": "best"}, "trial_a", 2, 0.95, id="best"),
    # trial_b's epoch 3 was first reported as 0.99: only its last report counts
    pytest.param({"select": "best", "mode": "min"}, "trial_d", 1, 0.0, id="best-min"),
    pytest.param({"select": "last"}, "trial_b", 4, 0.90, id="last"),
    pytest.param({"select": "mean_last", "last_k": 3}, "trial_c", 4, 0.84, id="mean-last-3"),
    pytest.param({"select": "mean_last", "last_k": 2}, "trial_d", 4, 0.86, id="mean-last-2"),
    pytest.param({"select": "best", "metric": "val_iou@worst"}, "trial_c", 3, 0.80, id="worst-group"),
]


@pytest.mark.parametrize("rule, trial, epoch, score", PICKS)
def test_each_rule_picks_its_trial_and_that_trials_checkpoint(search, rule, trial, epoch, score):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pick is kept: nothing to note
        best = raytrain.best_checkpoint(search, **rule)
    assert best.path == selection_checkpoint(search / trial, epoch)
    assert best.metrics["epoch"] == epoch and best.experiment == str(search)
    full = SelectionRule(**{"metric": "val_iou", "mode": "max", "last_k": 3, **rule})
    chosen = select_best(search, full)
    assert chosen.trial.name == trial and chosen.score == pytest.approx(score)
    # what tune prints as best is what is handed back: the table's first row, by the same rule
    table = trials_table(search, full).splitlines()
    assert table[1].split()[:2] == ["1", trial] and f"{score:.4f}" in table[1]
    assert full.score_name in table[0] and ("best epoch" if full.select == "best" else "last epoch") in table[0]


def test_the_experiments_own_rule_is_the_default_and_runs_shows_its_best(search):
    assert json.loads((search / "experiment.json").read_text())["select"] == "mean_last"
    assert raytrain.best_checkpoint(search).path == selection_checkpoint(search / "trial_d", 4)  # mean of the last 2
    [run] = raytrain.runs(search.parent.parent)
    assert (run.select, run.last_k, run.trials, run.best) == ("mean_last", 2, 4, pytest.approx(0.86))
    assert run.score_name == "val_iou (mean of last 2 epochs)"


def test_best_on_the_command_line_takes_select_over_the_experiments_own(search, tmp_path):
    done = run_cli(["best", search, "--select", "last", "--json"], tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(selection_checkpoint(search / "trial_b", 4))
    assert done.stderr == ""


def test_what_tune_prints_as_best_is_the_checkpoint_it_hands_back(search, capsys):
    from raytrain.cli import _print_search
    from raytrain.config import SearchConfig

    best = _print_search(str(search), SearchConfig(select="mean_last", last_k=3))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["#", "trial", "optim.lr"] and "val_iou (mean of last 3 epochs)" in lines[0]
    assert [line.split()[1] for line in lines[1:5]] == ["trial_c", "trial_d", "trial_a", "trial_b"]  # 0.84, 0.57, 0.55, 0.47
    assert lines[5] == "best val_iou (mean of last 3 epochs): 0.8400 (trial_c, epoch 4: val_f1 0.8300)"
    assert lines[6] == f"best checkpoint: {best.path}" and best.path == selection_checkpoint(search / "trial_c", 4)


def test_an_epoch_whose_checkpoint_was_not_kept_cannot_stand_and_says_so(search, tmp_path):
    """trial_b's last epoch (0.90, the best by last) without its checkpoint, as best retention leaves it:
    trial_b's last kept epoch scores 0.30 now, and trial_d's last (0.86) stands."""
    experiment = tmp_path / "search"
    shutil.copytree(search, experiment)
    shutil.rmtree(selection_checkpoint(experiment / "trial_b", 4))
    with pytest.warns(UserWarning) as caught:
        best = raytrain.best_checkpoint(experiment, select="last")
    assert best.path == selection_checkpoint(experiment / "trial_d", 4)
    [note] = [str(warning.message) for warning in caught]
    assert note == (f"{experiment / 'trial_b'}: epoch 4 stands for the trial by val_iou (last epoch) (0.9000), but no "
                    "complete checkpoint of it was kept; it is passed over")


def test_a_trial_whose_checkpoints_are_all_damaged_is_passed_over_with_a_note(search, tmp_path):
    experiment = tmp_path / "search"
    shutil.copytree(search, experiment)
    damaged = selection_checkpoint(experiment / "trial_a", 2) / "metrics.json"
    damaged.write_text("{val_iou: ")
    seal(damaged.parent)  # as a hand could: the file's own check, not complete.json's
    with pytest.warns(UserWarning) as caught:
        best = raytrain.best_checkpoint(experiment, select="best")
    # trial_a's next best epoch (0.50) has its checkpoint, but trial_b's 0.90 beats it
    assert best.path == selection_checkpoint(experiment / "trial_b", 4)
    notes = [str(warning.message) for warning in caught]
    assert notes[0].startswith(f"skipped {damaged}: not valid JSON") and "trial_a: epoch 2" in notes[1] and len(notes) == 2


def test_an_unknown_rule_is_one_clear_error(search):
    with pytest.raises(CheckpointError, match="select must be one of best, last, mean_last, not 'median'"):
        raytrain.best_checkpoint(search, select="median")
    with pytest.raises(CheckpointError, match="last_k: expected a positive whole number, got 0"):
        raytrain.best_checkpoint(search, last_k=0)


def test_the_crafted_trials_pick_apart():
    """A guard on the data of helpers.SELECTION_TRIALS: no two rules above agree on trial and epoch."""
    assert len({(trial, epoch) for _, trial, epoch, _ in (case.values for case in PICKS)}) == len(PICKS)
