"""train.tracking: mlflow, read back with MLflow's own client from the store a real run wrote."""
import json
from pathlib import Path

import pytest


def mlflow_runs(experiment: str, name: str = "tiny"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{experiment}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return client, runs


def check_run(client, run, metric: str = "val_iou") -> list[float]:
    """Two epochs of history, and the best_checkpoint tag on an existing checkpoint with the best value."""
    history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2]
    assert {"train_loss", "val_loss", "val_f1", "lr"} <= set(run.data.metrics)
    assert not {"training_iteration", "time_total_s", "epoch"} & set(run.data.metrics)  # Tune's bookkeeping
    best = Path(run.data.tags["best_checkpoint"])
    assert (best / "model.pt").is_file()
    assert json.loads((best / "metrics.json").read_text())[metric] == pytest.approx(max(m.value for m in history))
    assert run.info.status == "FINISHED"
    return [m.value for m in history]


def test_a_train_run_logs_params_metrics_and_its_best_checkpoint(trained_run):
    import raytrain

    config, result = trained_run
    assert config.train.tracking == "mlflow"

    client, runs = mlflow_runs(result.path)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["train.epochs"] == "2"
    assert run.data.params["model.name"] == "unet" and run.data.tags["raytrain.run"] == result.path
    check_run(client, run)
    assert Path(run.data.tags["best_checkpoint"]) == raytrain.best_checkpoint(result.path).path
    # per-group metrics of the grouped shards, named as MLflow allows (no `@`)
    assert run.data.metrics["val_iou/umm"] == pytest.approx(result.metrics["val_iou@umm"])


def test_a_search_logs_one_run_per_trial(searched_run):
    config, grid = searched_run
    assert config.train.tracking == "mlflow"
    client, runs = mlflow_runs(grid.experiment_path, config.name)
    assert len(runs) == 2
    assert sorted(float(run.data.params["optim.lr"]) for run in runs) == [1e-3, 1e-2]
    for run in runs:
        assert run.data.params["train.num_workers"] == "1"  # the base config too, not only the searched key
        trial = Path(grid.experiment_path) / run.info.run_name
        assert run.data.tags["raytrain.run"] == str(trial)
        assert Path(run.data.tags["best_checkpoint"]).is_relative_to(trial)
        check_run(client, run)
