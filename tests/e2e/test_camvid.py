"""Real CamVid (when present beside the repository): shard a subset, train one epoch with 2 DDP
workers; the camvid_road recipe plans on a CamVid-style drive split and runs as one command."""
import math
import os

import pytest

from raytrain.data.formats import CAMVID_CLASSES
from raytrain.data.shards import write_shards
from raytrain.experiments import best_checkpoint
from tests.helpers import tiny_config
from tests.helpers import run_cli_fresh
from tests.helpers import shard_by_drive
from tests.helpers import REAL_CAMVID


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


def test_camvid_trains_one_epoch_on_two_workers_on_all_11_classes(ray_cluster, camvid_subset, tmp_path):
    """Binary road on real CamVid is the search below (one command, camvid_road's config)."""
    from raytrain.api import train

    classes, loss = list(CAMVID_CLASSES), "ce"

    manifest = write_shards(camvid_subset, "camvid", tmp_path / "shards", classes=None)
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
