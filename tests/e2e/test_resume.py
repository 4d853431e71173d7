"""Runs that survive: a killed training worker, and a killed train or search driver continued with --resume
(a search on S3 too)."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from raytrain.checkpoints import COMPLETE_FILE
from tests.helpers import cli_environment, tiny_config, wait_for


def checkpoint_epochs(run_dir: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["epoch"] for p in run_dir.glob("checkpoint_*/metrics.json"))


def registered_epochs(run_dir: Path) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (its own record in the run directory)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [entry["metrics"]["epoch"] for entry in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, tiny_shards, tmp_path):
    from ray.util.state import list_actors

    from raytrain.api import train

    epochs = 4
    config = tiny_config(
        tiny_shards, tmp_path,
        **{"name": "killed", "train.epochs": epochs, "train.max_failures": 1, "train.checkpoints_to_keep": epochs,
           "train.ema": 0.9},
    )
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(config)))
    runner.start()

    def alive_workers():
        actors = list_actors(
            address=ray_cluster.get_runtime_context().gcs_address,  # this session's cluster, not another's
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True,
        )
        return {actor.pid for actor in actors}

    run_dir = wait_for(lambda: next((tmp_path / "killed").glob("2*"), None), "the experiment directory", 120)
    # Kill once Ray Train has registered a checkpoint (rank 0 writes it a moment before): that is
    # the one a restarted worker group resumes from.
    killed_after = wait_for(lambda: registered_epochs(run_dir), "the first registered checkpoint", 300)
    victims = wait_for(alive_workers, "live workers", 60)
    os.kill(sorted(victims)[-1], signal.SIGKILL)
    # A new worker group starts: workers with new process ids.
    wait_for(lambda: alive_workers() - victims, "the restarted worker group", 300)
    runner.join(timeout=600)

    result = outcome["result"]
    assert result.error is None and result.metrics["epoch"] == epochs
    # The run's record has every epoch exactly once: none lost to the failure, none counted twice.
    assert sorted(metrics["epoch"] for _, metrics in result.best_checkpoints) == list(range(1, epochs + 1))
    assert sorted(registered_epochs(run_dir)) == list(range(1, epochs + 1))
    # On disk there may be more: a checkpoint that the kill cut off mid-copy, whose epoch was trained
    # again after the restart (a whole one that Ray Train had not registered yet is restored from
    # and registered); nothing at or before the first registered epoch was.
    on_disk = checkpoint_epochs(run_dir)
    extra = list(on_disk)
    for epoch in range(1, epochs + 1):
        extra.remove(epoch)
    assert all(epoch > min(killed_after) for epoch in extra), on_disk
    # train.ema: the restarted workers carried the average on, its count of updates too (in every
    # whole checkpoint: one cut off mid-copy has no complete.json, which is written last)
    updates = {json.loads(metrics.read_text())["epoch"]: int(torch.load(metrics.parent / "train_state.pt", weights_only=True)["average_updates"])
               for metrics in run_dir.glob("checkpoint_*/metrics.json") if (metrics.parent / COMPLETE_FILE).is_file()}
    assert updates == {epoch: epoch * updates[1] for epoch in updates}, updates


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_search_driver_resumes_from_s3_without_rerunning_finished_trials(tiny_shards, tmp_path, s3_server, s3_prefix):
    """As on a cluster whose head node died: the search's state and its trials are only in the
    bucket, and the resumed search reads them from there. (A local search resumes the same way:
    Tune's restore is the same call; only where the files are differs.)"""
    s3, storage = s3_server, s3_prefix
    config = tiny_config(
        tiny_shards, storage,
        **{"name": "interrupted", "train.epochs": 2, "train.num_workers": 1, "search.scheduler.name": "fifo",
           "search.max_concurrent_trials": 1, "search.space": {"optim.lr": {"grid": [1e-3, 3e-3, 1e-2]}}},
    )
    config_file = tmp_path / "search.yaml"
    config_file.write_text(config.to_yaml())
    name_folder = f"{storage}/interrupted"
    command = [sys.executable, "-m", "raytrain.cli", "tune", str(config_file), "--num-cpus", "3", "--quiet"]
    env = {**s3.env, "TUNE_GLOBAL_CHECKPOINT_S": "0"}  # save the search state at every step

    # The driver and the Ray cluster it started are killed together, as when a laptop or head node dies.
    driver = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def finished_trials():
            states = s3.texts(name_folder, "*/experiment_state-*.json")
            return any(text.count("TERMINATED") >= 1 for text in states.values())

        wait_for(finished_trials, "a finished trial in the saved search state", 600)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    [experiment] = {name.partition("/")[0] for name in s3.texts(name_folder, "*/experiment.json")}
    assert not (tmp_path / "results").exists()  # everything went to S3
    results_before = s3.texts(name_folder, f"{experiment}/trial_*/result.json")
    done_before = [name for name, text in results_before.items() if '"epoch": 2' in text]
    assert done_before, results_before.keys()

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results_after = s3.texts(name_folder, f"{experiment}/trial_*/result.json")
    assert len(results_after) == 3
    for name in done_before:  # the finished trial was not run again: its results are untouched
        assert results_after[name] == results_before[name]
    for text in results_after.values():
        assert json.loads(text.strip().splitlines()[-1])["epoch"] == 2
    assert "best val_iou" in resumed.stdout
    # continued in place, no new experiment
    assert {name.partition("/")[0] for name in s3.texts(name_folder, "*/experiment.json")} == {experiment}
    assert f"experiment: {name_folder}/{experiment}" in resumed.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_resume_after_kill_9_trains_no_epoch_whose_checkpoint_is_on_disk(tiny_shards, tmp_path):
    """kill -9 after the last epoch's checkpoint is written and before Ray Train registers it: the
    resumed run starts from that checkpoint, not from the one before, and registers it."""
    config = tiny_config(tiny_shards, tmp_path / "results", **{"name": "killed9", "train.epochs": 2, "train.num_workers": 1})
    config_file = tmp_path / "train.yaml"
    config_file.write_text(config.to_yaml())
    command = [sys.executable, "-m", "raytrain.cli", "train", str(config_file), "--num-cpus", "2", "--quiet"]
    # Ray Train's controller registers a reported checkpoint when it next polls the workers; polling
    # every 300 s holds the last epoch's checkpoint on disk, unregistered, until the kill.
    slow_polls = {**cli_environment(), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "300"}
    driver = subprocess.Popen(command, env=slow_polls, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run_dir = wait_for(lambda: next((tmp_path / "results/killed9").glob("2*"), None), "the experiment directory", 300)

        def last_checkpoint_whole():
            return [p for p in run_dir.glob("checkpoint_*") if (p / COMPLETE_FILE).is_file() and '"epoch": 2' in (p / "metrics.json").read_text()]

        wait_for(last_checkpoint_whole, "the last epoch's checkpoint on disk", 300)  # complete.json: its copy's last file
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert 2 not in registered_epochs(run_dir)  # else this run shows nothing
    [last] = last_checkpoint_whole()

    resumed = subprocess.run([*command, "--resume"], env=cli_environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_epochs(run_dir) == [1, 2]  # no epoch trained twice
    assert 2 in registered_epochs(run_dir)
    assert f"checkpoint: {last}" in resumed.stdout
