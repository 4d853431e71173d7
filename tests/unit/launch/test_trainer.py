"""launch/trainer: what a run keeps of its checkpoints, by the selection rule (no Ray started)."""

import pytest

from tests.helpers import tiny_config


@pytest.mark.parametrize("select, kept_by", [("best", "val_f1"), ("last", None), ("mean_last", None)])
def test_a_run_keeps_the_checkpoints_that_can_stand_for_it(tiny_shards, tmp_path, select, kept_by):
    """best: the best K by search.metric; last and mean_last, whose checkpoint is the last epoch's:
    the latest K (Ray Train keeps the most recent when no score attribute is given)."""
    from raytrain.launch.trainer import checkpoint_retention

    config = tiny_config(tiny_shards, tmp_path, **{"search.metric": "val_f1", "search.mode": "min",
                                                   "search.select": select, "train.checkpoints_to_keep": 3})
    retention = checkpoint_retention(config)
    assert (retention.num_to_keep, retention.checkpoint_score_attribute) == (3, kept_by)
    if kept_by:
        assert retention.checkpoint_score_order == "min"
