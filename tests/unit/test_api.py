"""The package's Python API: every submodule imports, and every public function runs without Ray
(the wheel: tests/e2e/test_packaging.py)."""

from __future__ import annotations

import importlib
import pkgutil
import types
from pathlib import Path

import numpy as np

import raytrain
from tests.helpers import tiny_config
from tests.helpers import _hand_made_run


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
