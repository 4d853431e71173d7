"""Real CamVid (when present beside the repository): shard a subset, train one epoch with 2 DDP
workers; the camvid_road recipe plans on a CamVid-style drive split and runs as one command."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain.config import load_config
from raytrain.data.formats import CAMVID_CLASSES
from raytrain.data.shards import write_shards
from raytrain.experiments import best_checkpoint
from tests.helpers import tiny_config
from tests.helpers import run_cli, run_cli_fresh

REAL_CAMVID = Path(os.environ.get("RAYTRAIN_CAMVID", Path(__file__).resolve().parents[2] / "shared/datasets/camvid"))
SUBSET = {"train": 24, "val": 8}


@pytest.fixture(scope="module")
def camvid_subset(tmp_path_factory):
    """A few dozen real CamVid pairs, linked (not copied) into the CamVid layout."""
    if not all((REAL_CAMVID / folder).is_dir() for folder in ("train", "trainannot", "val", "valannot")):
        pytest.skip(f"CamVid not found at {REAL_CAMVID} (set RAYTRAIN_CAMVID)")
    root = tmp_path_factory.mktemp("camvid") / "subset"
    for split, count in SUBSET.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        images = sorted((REAL_CAMVID / split).glob("*.[jp][pn]g"))
        for image in images[:: max(1, len(images) // count)][:count]:  # spread over the sequences
            os.symlink(image, root / split / image.name)
            os.symlink(REAL_CAMVID / f"{split}annot" / f"{image.stem}.png", root / f"{split}annot" / f"{image.stem}.png")
    return root


@pytest.mark.parametrize(
    "classes, loss",
    [(["road"], "bce"), (list(CAMVID_CLASSES), "ce")],
    ids=["binary-road", "11-classes"],
)
def test_camvid_trains_one_epoch_on_two_workers(ray_cluster, camvid_subset, tmp_path, classes, loss):
    from raytrain.api import train

    manifest = write_shards(camvid_subset, "camvid", tmp_path / "shards", classes=None if len(classes) > 1 else classes)
    assert manifest.num_samples == SUBSET and manifest.skipped == []
    assert manifest.class_names == classes
    config = tiny_config(
        tmp_path / "shards", tmp_path / "results",
        **{"classes": classes, "loss.name": loss, "data.size": "96x72", "train.epochs": 1, "train.batch_size": 4},
    )
    result = train(config)
    assert result.error is None
    metrics = result.metrics
    assert metrics["epoch"] == 1
    for key in ["train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_iou", "val_iou_road"]:
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (key, metrics.get(key))
    for name in classes:  # a class absent from these few val images has no IoU (None), never NaN
        value = metrics[f"val_iou_{name}"]
        assert value is None or math.isfinite(value), (name, value)
    assert 0 <= metrics["val_accuracy"] <= 1 and 0 <= metrics["val_iou"] <= 1
    assert result.checkpoint is not None


def camvid_drives(root: Path, drives: dict[str, int], size=(48, 36)) -> Path:
    """A CamVid-style folder (class-index PNG annotations, road = 3, 11 = void) whose frames come
    from the given drives, all in train/ as CamVid's own drives are."""
    rng = np.random.default_rng(0)
    for folder in ("train", "trainannot", "val", "valannot"):
        (root / folder).mkdir(parents=True)
    for drive, count in drives.items():
        for frame in range(count):
            annot = rng.integers(0, 12, (size[1], size[0])).astype(np.uint8)
            annot[size[1] // 2 :] = 3  # the road: the lower half
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "train" / f"{drive}_{frame:06d}.png")
            Image.fromarray(annot, mode="L").save(root / "trainannot" / f"{drive}_{frame:06d}.png")
    return root


def shard_by_drive(src: Path, out: Path, val_drive: str) -> Path:
    """Shards as data/README.md recommends: binary road, one whole drive held out for val."""
    done = run_cli(["data", "shard", src, "--format", "camvid", "--classes", "road", "--group-by", "^[^_]+",
                    "--val-groups", val_drive, "--out", out], timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def test_camvid_road_config_validates_and_plans_on_a_drive_split(tmp_path):
    config = load_config("camvid_road")
    assert config.classes == ["road"] and Path(config.data.path) == Path("data/camvid_road_by_drive").resolve()
    assert config.search.time_budget_s is not None and config.search.time_budget_s <= 30 * 60
    shards = shard_by_drive(camvid_drives(tmp_path / "camvid", {"0001TP": 6, "0006R0": 3}), tmp_path / "shards", "0006R0")
    done = run_cli(["tune", "camvid_road", "--dry-run", "--set", f"data.path={shards}",
                    "--set", f"train.storage_path={tmp_path / 'results'}"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dry run: nothing started" in done.stdout
    plan = dict(line.split(":", 1) for line in done.stdout.splitlines()[1:])
    assert plan["name"].strip() == "camvid_road" and plan["kind"].strip() == "tune"
    assert f"path={shards}, train=6, val=3" in plan["data"]  # drive 0006R0 held out whole
    assert float(plan["time_budget_s"]) == config.search.time_budget_s
    assert not (tmp_path / "results").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_camvid_road_search_runs_as_one_command_on_real_camvid(camvid_subset, tmp_path):
    shards = shard_by_drive(camvid_subset, tmp_path / "shards", "0006R0")
    done = run_cli_fresh([
        "tune", "camvid_road", "--set", f"data.path={shards}", "--set", f"train.storage_path={tmp_path / 'results'}",
        "--set", "train.epochs=1", "--set", "data.size=64x48", "--set", "search.num_samples=1",
        "--set", "search.scheduler.grace_period=1",
    ], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    best = best_checkpoint(tmp_path / "results" / "camvid_road")
    assert best.metrics["epoch"] == 1 and 0 <= best.metrics["val_iou@0006R0"] <= 1
    assert best.metrics["val_iou@0006R0"] == pytest.approx(best.metrics["val_iou"])  # the one val drive is all of val
