"""`train` on a disk that fills up while the first checkpoint is saved: one line naming where, exit
code 2, no checkpoint left or listed, and the run recorded as failed (the other commands' full-disk
rows are unit/cli/test_full_disk.py). The full disk is a real small tmpfs (the `small_disk` fixture)."""
from __future__ import annotations

import json

import pytest

from raytrain.storage.atomic import final_of_temporary
from tests.helpers import assert_one_line_error, config, run_cli, run_cli_fresh, shards


@pytest.mark.ray
@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_leaves_no_checkpoint(tmp_path, small_disk):
    data = shards(tmp_path)  # on the ordinary disk
    disk = small_disk(tmp_path / "disk", "1m")
    # A U-Net of 16 base channels: its checkpoint (1.4 MB) cannot fit where the run's other files (about 20 kB) do.
    run_config = config(tmp_path, data, **{"model.base_channels": 16, "train.num_workers": 1,
                                           "train.storage_path": str(disk / "results")})
    run = run_cli_fresh(["train", run_config, "--num-cpus", "2"], tmp_path, timeout=480)
    [experiment] = (disk / "results" / "bad").iterdir()
    assert_one_line_error(run, [f"{experiment}/checkpoint_", "No space left on device"], tmp_path)

    left = [path.relative_to(experiment) for path in experiment.rglob("*")]
    assert not [path for path in left if "checkpoint" in str(path)], left  # the cut-short upload is gone
    assert not [path for path in left if final_of_temporary(path.name) or path.name.endswith(".partial")], left

    runs = run_cli(["runs", disk / "results", "--json"], tmp_path, timeout=120)
    assert runs.returncode == 0, runs.stderr
    assert [(run["path"], run["status"], run["best"]) for run in json.loads(runs.stdout)] == [(str(experiment), "failed", None)]
    best = run_cli(["best", experiment], tmp_path, timeout=120)
    assert_one_line_error(best, [f"{experiment}: no checkpoint reports 'val_iou'"], tmp_path)
