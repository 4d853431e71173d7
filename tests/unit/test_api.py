"""The package's Python API: every submodule imports, every public function runs without Ray,
and the wheel ships its configs and runs away from the source tree."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

import raytrain
from tests.helpers import tiny_config
from tests.helpers import _hand_made_run
from tests.helpers import REPO


def test_every_submodule_imports_and_no_public_name_is_shadowed_by_one():
    for module in pkgutil.walk_packages(raytrain.__path__, "raytrain."):
        importlib.import_module(module.name)
    for name in raytrain.__all__:
        value = getattr(raytrain, name)
        assert not isinstance(value, types.ModuleType), name
        assert callable(value), name
    importlib.import_module("raytrain.inference")  # what once turned raytrain.predict into a module
    assert callable(raytrain.predict) and callable(raytrain.report)


def test_every_public_function_runs_from_python_without_ray(tmp_path):
    raw = raytrain.synth(tmp_path / "raw", 8, size=(32, 16))
    counts = raytrain.shard(raw, "kitti", tmp_path / "shards", val_fraction=0.25)["num_samples"]
    assert counts["train"] + counts["val"] == 8 and counts["val"] >= 1
    assert {"quickstart", "seed_lab", "kitti_search", "camvid_multiclass"} <= set(raytrain.list_configs())
    assert "epochs: 3" in raytrain.show_config("quickstart", {"train.epochs": 3})

    overrides = {"data.path": str(tmp_path / "shards"), "train.storage_path": str(tmp_path / "results")}
    plan = raytrain.train("quickstart", overrides, dry_run=True)
    assert plan["trials"] == 1 and plan["workers_per_trial"] == 1 and plan["data"]["train"] == counts["train"]
    plan = raytrain.tune("quickstart", overrides, dry_run=True)
    assert plan["trials"] == 4 and plan["max_concurrent_trials"] == 2 and plan["cpus_per_trial"] == 1
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


def test_the_wheel_ships_its_configs_and_runs_away_from_the_source_tree(tmp_path, tiny_shards):
    """Built and installed as a user's pip would, then run from another folder."""
    repo = REPO
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
    assert "dry run: nothing started" in plan and "workers_per_trial:     1" in plan
    assert not (tmp_path / "results").exists()
