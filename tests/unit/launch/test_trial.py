"""launch/trial: a one-worker trial in Tune's actor keeps the checkpoints a Ray Train run would (no Ray started)."""

import pytest

from tests.helpers import tiny_config


def kept(*scores):
    return [({"epoch": epoch, "val_iou": score}, f"run/checkpoint_{epoch}") for epoch, score in enumerate(scores, 1)]


@pytest.mark.parametrize("select, mode, scores, deleted", [
    ("best", "max", (0.5, 0.9, 0.7, 0.6), [1]),  # the 2 best (2, 3), and the latest (4) besides
    ("best", "max", (0.5, 0.9, 0.7), [1]),
    ("best", "min", (0.5, 0.9, 0.7), [2]),
    ("best", "max", (None, 0.9, 0.7), [1]),  # no score ranks last, whatever the mode
    ("best", "min", (None, 0.9, 0.7), [1]),
    ("best", "max", (0.9, 0.8, 0.7, 0.75), [3]),  # the latest stays, though of the worst 2
    ("best", "max", (0.5, 0.5, 0.5), [1]),  # on a tie, the older goes
    ("last", "max", (0.9, 0.8, 0.7, 0.6), [1, 2]),  # the most recent 2
    ("mean_last", "max", (0.9, 0.8, 0.7), [1]),
    ("best", "max", (0.1, 0.2), []),  # no more than it keeps
])
def test_a_trial_run_deletes_what_ray_trains_retention_would(tiny_shards, tmp_path, select, mode, scores, deleted):
    from raytrain.launch.trial import checkpoints_to_delete

    config = tiny_config(tiny_shards, tmp_path, **{"search.metric": "val_iou", "search.mode": mode,
                                                   "search.select": select, "train.checkpoints_to_keep": 2})
    assert sorted(checkpoints_to_delete(kept(*scores), config)) == [f"run/checkpoint_{epoch}" for epoch in deleted]
