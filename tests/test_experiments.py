"""Experiments you can find again: a new directory per run, best checkpoints from one experiment
only, explicit resume, `raytrain runs`, and a Python API with a twin for every command."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import raytrain
from raytrain import experiments
from tests.helpers import run_cli
from tests.helpers import tiny_config


def _cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytrain.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def _checkpoint_epochs(directory: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["epoch"] for p in directory.rglob("checkpoint_*/metrics.json"))


# ------------------------------------------------------------------ the API's shape, no Ray


def test_every_submodule_imports_and_no_public_name_is_shadowed_by_one():
    for module in pkgutil.walk_packages(raytrain.__path__, "raytrain."):
        importlib.import_module(module.name)
    for name in raytrain.__all__:
        value = getattr(raytrain, name)
        assert not isinstance(value, types.ModuleType), name
        assert callable(value), name
    importlib.import_module("raytrain.inference")  # what once turned raytrain.predict into a module
    assert callable(raytrain.predict) and callable(raytrain.report)


def _hand_made_run(config, epochs=(1, 2), ious=(0.3, 0.5)) -> str:
    """An experiment of `config` with real checkpoint files, written without Ray."""
    import torch

    from raytrain.checkpoints import save_checkpoint
    from raytrain.models import create_model

    experiment = experiments.create_experiment(config, "train")
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=1, **config.model.kwargs())
    optimizer = torch.optim.Adam(model.parameters())
    for epoch, iou in zip(epochs, ious):
        metrics = {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_f1": iou + 0.1, "val_iou": iou}
        save_checkpoint(Path(experiment) / f"checkpoint_{epoch:06d}", model, optimizer, None, epoch, config, metrics)
    experiments.mark(experiment, experiments.FINISHED)
    return experiment


def test_every_public_function_runs_from_python_without_ray(tmp_path):
    raw = raytrain.synth(tmp_path / "raw", 8, size=(32, 16))
    counts = raytrain.shard(raw, "kitti", tmp_path / "shards", val_fraction=0.25)["num_samples"]
    assert counts["train"] + counts["val"] == 8 and counts["val"] >= 1
    assert {"quickstart", "seed_lab", "kitti_search", "camvid_multiclass"} <= set(raytrain.list_configs())
    assert "epochs: 3" in raytrain.show_config("quickstart", {"train.epochs": 3})

    overrides = {"data.path": str(tmp_path / "shards"), "train.storage_path": str(tmp_path / "results")}
    plan = raytrain.train("quickstart", overrides, dry_run=True)
    assert plan["trials"] == 1 and plan["workers_per_trial"] == 2 and plan["data"]["train"] == counts["train"]
    plan = raytrain.tune("quickstart", overrides, dry_run=True)
    assert plan["trials"] == 4 and plan["max_concurrent_trials"] == 2 and plan["cpus_per_trial"] == 2
    assert plan["experiment"].startswith(str(tmp_path / "results" / "quickstart") + "/")
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

    config = tiny_config(tmp_path / "shards", tmp_path / "results", **{"data.size": "32x16"})
    experiment = _hand_made_run(config)
    [run] = raytrain.runs(tmp_path / "results")
    assert (run.path, run.kind, run.status, run.trials, run.best) == (experiment, "train", "finished", 1, 0.5)
    best = raytrain.best_checkpoint(experiment)
    assert best.path == Path(experiment) / "checkpoint_000002" and best.experiment == experiment
    model = raytrain.load_model(best)
    image = np.zeros((20, 40, 3), np.uint8)
    [probability] = raytrain.predict(model, [image])
    assert probability.shape == (20, 40)
    assert raytrain.evaluate(best, tmp_path / "shards")["samples"] == counts["val"]
    assert raytrain.export(best.path, tmp_path / "model.pt").is_file()
    assert raytrain.report(experiment, tmp_path / "report").name == "index.html"


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


# ------------------------------------------------------------------ real runs on the session's Ray cluster


@pytest.mark.ray
def test_train_twice_gives_two_fresh_runs_and_resume_continues_the_latest(ray_cluster, tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path / "results", **{"name": "twice", "train.epochs": 1, "train.num_workers": 1})
    first, second = raytrain.train(config), raytrain.train(config.with_overrides({"optim.lr": 1e-2}))
    assert first.path != second.path
    for result in (first, second):  # each trained its own epoch 1, from scratch
        assert list(result.metrics_dataframe["epoch"]) == [1] and _checkpoint_epochs(Path(result.path)) == [1]
    epoch_one = {p: p.stat().st_mtime_ns for p in Path(second.path).rglob("checkpoint_*/*")}

    resumed = raytrain.train(config, {"train.epochs": 2}, resume=True)
    assert resumed.path == second.path and resumed.metrics["epoch"] == 2
    assert _checkpoint_epochs(Path(second.path)) == [1, 2] and _checkpoint_epochs(Path(first.path)) == [1]
    assert resumed.checkpoint and raytrain.load_model(resumed.checkpoint.path)  # loads with the run's own config
    assert {p: p.stat().st_mtime_ns for p in epoch_one} == epoch_one  # epoch 1 was not trained again
    assert json.loads((Path(second.path) / experiments.MARKER).read_text())["status"] == "finished"
    assert experiments.experiment_config(second.path).optim.lr == 1e-2
    with pytest.raises(raytrain.RaytrainError, match="nothing to resume"):
        raytrain.train(config, resume=second.path)


@pytest.mark.ray
@pytest.mark.slow
def test_quickstart_command_twice_gives_two_searches(tmp_path):
    """The README's first command, small, run twice: the data is made once, each search is new and
    keeps its own best checkpoint."""
    args = ["quickstart", "--data-dir", str(tmp_path / "data"),
            "--set", f"train.storage_path={tmp_path / 'results'}", "--set", "train.epochs=1",
            "--set", "search.num_samples=1", "--set", "search.scheduler.grace_period=1", "--set", "search.space={optim.lr: {choice: [0.003]}}",
            "--set", "data.size=64x32", "--set", "model.base_channels=4"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    outputs = []
    for _ in range(2):
        done = _cli(*args, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    assert "making 400 synthetic road scenes" in outputs[0] and "making" not in outputs[1]
    found = [[line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("experiment: ")] for out in outputs]
    assert found[0][0] == found[0][-1] and found[1][0] == found[1][-1]  # printed at the start and at the end
    assert found[0][0] != found[1][0]
    for out, (experiment, *_) in zip(outputs, found):  # each search's best is its own
        best = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("best checkpoint: ")]
        assert best and Path(best[0]).is_relative_to(experiment)
        assert raytrain.best_checkpoint(experiment).path == Path(best[0])
    runs = raytrain.runs(tmp_path / "results")
    assert [run.path for run in runs] == [found[1][0], found[0][0]]  # newest first
    assert all((run.kind, run.trials, run.status) == ("tune", 1, "finished") for run in runs)


def test_the_wheel_ships_its_configs_and_runs_away_from_the_source_tree(tmp_path, tiny_shards):
    """Built and installed as a user's pip would, then run from another folder."""
    repo = Path(__file__).resolve().parent.parent
    import setuptools  # noqa: F401  (what builds the wheel without network)

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(repo)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("raytrain-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The dependencies come from this environment (a plain path entry: its .pth files, among them
    # raytrain's own editable install, are not read); raytrain itself only from the wheel.
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "deps.pth").write_text("\n".join(map(str, deps)) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install",
                                "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}

    def run(*args):
        done = subprocess.run([str(venv / "bin/raytrain"), *args], capture_output=True, text=True, timeout=300,
                              cwd=away, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([str(venv / "bin/python"), "-c", "import raytrain; print(raytrain.__file__)"],
                           capture_output=True, text=True, cwd=away, env=env).stdout
    assert where.startswith(str(site)), where  # the wheel's copy, not the source tree
    assert run("--version").strip() == f"raytrain {raytrain.__version__}"
    assert run("configs").split() == ["camvid_multiclass", "camvid_road", "kitti_search", "quickstart", "seed_lab"]
    assert "name: quickstart" in run("config", "show", "quickstart")
    plan = run("train", "quickstart", "--dry-run", "--set", f"data.path={tiny_shards}",
               "--set", f"train.storage_path={tmp_path / 'results'}")
    assert "dry run: nothing started" in plan and "workers_per_trial:     2" in plan
    assert not (tmp_path / "results").exists()
