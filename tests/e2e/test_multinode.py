"""A real multi-node Ray cluster on one machine: DDP across nodes, and the loss of a node.

Each scenario runs in its own process (tests/e2e/multinode_scenarios.py: ray.cluster_utils.Cluster with a
head and worker nodes node_a, node_b, node_c of their own), with a private RAY_TMPDIR so that no
other Ray driver on the machine can attach to it, and reports what happened in result.json
(conftest.run_scenario).
"""
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]


def test_training_resumes_from_its_last_checkpoint_after_losing_a_node(run_scenario):
    result = run_scenario("node_loss")
    epochs, killed = result["epochs"], result["killed"]
    assert result["kill_error"] is None and killed, "the node was never killed"
    assert result["error"] is None and result["final_epoch"] == epochs
    first, restart = result["workers"][:2], result["workers"][2:]
    # DDP across nodes: one worker of each rank on each of two nodes, checkpoints in one shared storage path.
    assert sorted(w["rank"] for w in first) == [0, 1] and len({w["node"] for w in first}) == 2
    assert killed["node"] in {w["node"] for w in first}
    # The restarted worker group: on the surviving nodes, every worker resumed from a registered checkpoint.
    assert len(restart) == 2 and killed["node"] not in {w["node"] for w in restart}
    resumed_from = {w["resumed_from"] for w in restart}
    assert len(resumed_from) == 1 and resumed_from.pop() >= killed["registered_epoch_before"] >= 1
    # Every epoch checkpointed; only epochs after the one it resumed from may have been trained twice:
    # those whose checkpoints were written but not yet registered when the node died. Workers report
    # without waiting for the controller, so with short epochs that can be more than one.
    epochs_seen = result["checkpoint_epochs"]
    assert sorted(set(epochs_seen)) == list(range(1, epochs + 1))
    repeated = [e for e in set(epochs_seen) if epochs_seen.count(e) > 1]
    assert all(e > restart[0]["resumed_from"] for e in repeated)


def test_search_keeps_finished_trials_and_completes_after_losing_a_node(run_scenario):
    result = run_scenario("search_node_loss")
    killed = result["killed"]
    assert result["kill_error"] is None and killed["finished_trials"] and killed["running_trials"]
    assert result["finished_files_before"] > 0 and result["finished_files_unchanged"]
    trials = {t["trial"]: t for t in result["trials"]}
    assert len(trials) == 2
    for trial in trials.values():
        assert trial["error"] is None and trial["final_epoch"] == result["epochs"], trial
    for name in killed["running_trials"]:  # the trial that lost a node resumed, not restarted from scratch
        assert trials[name]["checkpoint_epochs"].count(1) == 1, trials[name]
