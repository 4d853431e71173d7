"""Real Ray: 2-worker DDP runs and a small search on a local cluster, on tiny real shards."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from raytrain.data.manifest import read_manifest
from raytrain.data.pipeline import FIRST_EPOCH
from raytrain.launch.trainer import make_trainer
from tests.helpers import VAL_CATEGORIES, tiny_config


def ids_of(shards, split):
    return [i for path in read_manifest(shards).shard_paths(split) for i in pq.read_table(path, columns=["id"])["id"].to_pylist()]


def test_two_ddp_workers_see_disjoint_data(ray_cluster, tiny_shards, tmp_path):
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()

    def record_ids(config_dict):
        import ray.train
        import torch.distributed as dist

        assert dist.is_initialized() and dist.get_world_size() == 2  # a real DDP process group
        seen = {}
        # train: its first epoch's dataset (the cached split's streamed order; later epochs are
        # data.pipeline.cached_epoch's, tested with the cache)
        first_epoch = FIRST_EPOCH if config_dict["cached_train"] is not None else "train"
        for split, dataset in (("train", first_epoch), ("val", "val")):
            batches = ray.train.get_dataset_shard(dataset).iter_batches(batch_size=4)
            seen[split] = [str(i) for batch in batches for i in batch["id"]]
        (seen_dir / f"{ray.train.get_context().get_world_rank()}.json").write_text(json.dumps(seen))

    config = tiny_config(tiny_shards, tmp_path / "results")
    make_trainer(config, read_manifest(config.data.path), storage_path=str(tmp_path / "results"), name="ids", train_fn=record_ids).fit()
    rank0, rank1 = (json.loads((seen_dir / f"{rank}.json").read_text()) for rank in (0, 1))

    train_ids = set(ids_of(tiny_shards, "train"))
    assert rank0["train"] and rank1["train"]
    assert set(rank0["train"]).isdisjoint(rank1["train"])
    assert len(rank0["train"]) == len(rank1["train"])  # equal steps, or DDP would hang
    assert set(rank0["train"]) | set(rank1["train"]) <= train_ids
    assert len(set(rank0["train"]) | set(rank1["train"])) >= len(train_ids) - 1  # equal split drops < 2
    # Validation: every sample exactly once across the two workers.
    assert sorted(rank0["val"] + rank1["val"]) == sorted(ids_of(tiny_shards, "val"))


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


def test_training_reports_every_metric_and_checkpoints(trained):
    config, result = trained
    assert result.error is None
    for key in ("train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_iou",
                "val_maxf", "val_ap", "val_iou_road", "epoch", "lr", "images_per_s"):
        assert key in result.metrics, key
    # the dataset is sharded by KITTI category: val metrics per val category too, and only those
    # and the worst category's, which search.metric val_iou@worst ranks by
    assert {key for key in result.metrics if "@" in key} == {f"val_{m}@{g}" for m in ("iou", "f1") for g in [*VAL_CATEGORIES, "worst"]}
    for score in ("iou", "f1"):
        assert result.metrics[f"val_{score}@worst"] == min(result.metrics[f"val_{score}@{g}"] for g in VAL_CATEGORIES)
    assert result.metrics["epoch"] == 2
    assert 0.0 <= result.metrics["val_iou"] <= 1.0
    files = {p.name for p in Path(result.checkpoint.path).iterdir()}
    assert {"model.pt", "train_state.pt", "config.yaml", "metrics.json", "classes.json"} <= files
    # train.ema: model.pt is the average, train_state.pt the trained weights and the average's updates
    average = torch.load(Path(result.checkpoint.path) / "model.pt", weights_only=True)
    state = torch.load(Path(result.checkpoint.path) / "train_state.pt", weights_only=True)
    assert average.keys() == state["trained_weights"].keys()
    assert any(not torch.equal(average[name], state["trained_weights"][name]) for name in average)
    assert state["average_updates"].item() > 1


def test_checkpoint_reproduces_val_iou_without_ray(trained):
    """A fresh process with Ray not started: load_model + predict give the reported val IoU, per group too."""
    config, result = trained
    script = f"""
import io, json, sys
import numpy as np, pyarrow.parquet as pq, torch
from PIL import Image
import raytrain
from raytrain.data.manifest import read_manifest
from raytrain.metrics import SegmentationMetrics
model = raytrain.load_model({result.checkpoint.path!r})
assert not model.module.training
images, masks, groups = [], [], []
for path in read_manifest({config.data.path!r}).shard_paths("val"):
    table = pq.read_table(path).to_pydict()
    images += [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table["image"]]
    masks += [np.asarray(Image.open(io.BytesIO(b))) for b in table["mask"]]
    groups += table["group"]
names = sorted(set(groups))
metrics = SegmentationMetrics(1, class_names=["road"], groups=names)
for probs, mask, group in zip(raytrain.predict(model, images), masks, groups):
    metrics.update(torch.from_numpy(probs)[None, None], torch.from_numpy(mask.astype(np.int64))[None],
                   torch.tensor([names.index(group)]))
print(json.dumps(metrics.compute()))
assert "ray" not in sys.modules or not __import__("ray").is_initialized()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    reproduced = json.loads(run.stdout.strip().splitlines()[-1])
    assert reproduced["iou"] == pytest.approx(result.metrics["val_iou"], abs=1e-6)
    assert reproduced["f1"] == pytest.approx(result.metrics["val_f1"], abs=1e-6)
    for group in VAL_CATEGORIES:
        assert reproduced[f"iou@{group}"] == pytest.approx(result.metrics[f"val_iou@{group}"], abs=1e-6)


def test_search_of_two_trials_names_the_best(searched_run):
    import raytrain

    _, grid = searched_run
    assert len(grid) == 2 and not grid.errors
    frame = grid.get_dataframe(filter_metric="val_iou", filter_mode="max")
    best = raytrain.best_checkpoint(grid.experiment_path)
    assert best.metrics["val_iou"] == pytest.approx(frame["val_iou"].max())
    best_trial = frame.loc[frame["val_iou"].idxmax(), "trial_id"]
    assert f"trial_{best_trial}" in str(best.path)
    assert best.config.optim.lr == frame.loc[frame["val_iou"].idxmax(), "config/search/optim.lr"]
    # search.select as Ray Tune's own get_best_result scopes pick (val_loss: the tiny model's IoU often
    # ties): the trial, and its last epoch's checkpoint (2 epochs: the last 5 are both)
    for select, scope in (("last", "last"), ("mean_last", "last-5-avg"), ("best", "all")):
        picked = raytrain.best_checkpoint(grid.experiment_path, metric="val_loss", mode="min", select=select, last_k=5)
        tune_pick = grid.get_best_result(metric="val_loss", mode="min", scope=scope)
        assert picked.path.relative_to(grid.experiment_path).parts[0] == Path(tune_pick.path).name, select
        if select != "best":
            assert picked.metrics["epoch"] == 2


def test_pbt_trials_continue_from_the_better_trials_checkpoint_with_their_own_lr(ray_cluster, tiny_shards, tmp_path):
    import raytrain

    epochs = 2
    config = tiny_config(
        tiny_shards, tmp_path / "results",
        **{"name": "pbt", "train.epochs": epochs, "train.num_workers": 1,
           # val_loss orders the two trials strictly (the tiny model's IoU often ties)
           "search.metric": "val_loss", "search.mode": "min",
           "search.space": {"optim.lr": {"grid": [1e-6, 3e-3]}},
           # synch: both trials meet at every epoch, so the worse one always copies the better one
           "search.scheduler": {"name": "pbt", "perturbation_interval": 1, "synch": True}},
    )
    grid = raytrain.tune(config)
    assert len(grid) == 2 and not grid.errors
    assert all(result.metrics["epoch"] == epochs for result in grid)

    experiment = Path(grid.experiment_path)
    copies = []  # (trial that continued, the checkpoint it continued from)
    for trial in experiment.glob("trial_*"):
        for run in trial.glob("train_from_*"):
            source_trial, source_checkpoint = run.name.removeprefix("train_from_").rsplit("_checkpoint_", 1)
            source = experiment / source_trial / f"checkpoint_{source_checkpoint}"
            source_epoch = json.loads((source / "metrics.json").read_text())["epoch"]
            epochs_run = sorted(json.loads((c / "metrics.json").read_text())["epoch"] for c in run.glob("checkpoint_2*"))
            # the run went on from the copied epoch: nothing trained again from scratch
            assert epochs_run == list(range(source_epoch + 1, source_epoch + 1 + len(epochs_run)))
            copies.append((trial.name, source_trial))
        # every epoch Tune saw trained at the lr of the config Tune gave the trial at that time
        for line in (trial / "result.json").read_text().splitlines():
            result = json.loads(line)
            assert result["lr"] == pytest.approx(result["config"]["search"]["optim.lr"])
    assert any(trial != source for trial, source in copies), copies  # the worse trial copied the better one
    best = raytrain.best_checkpoint(experiment, metric="val_loss", mode="min")
    assert best.path.parent.name.startswith("train")  # the Train run's own, not Tune's short-lived copy


@pytest.mark.ray
def test_a_local_cluster_finds_itself_beside_another_one(tmp_path):
    """Ray Train frees a stopped run's CPUs from a helper that looks the cluster up with the State API;
    with a second cluster on the machine that lookup fails unless each process knows its own address."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=0); print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert other.stdout.readline().strip() == "up"
        script = (
            "import ray\n"
            "from raytrain.console import QUIET\n"
            "from raytrain.launch.session import ensure_ray\n"
            "ensure_ray(1, verbosity=QUIET)\n"
            "@ray.remote(num_cpus=0)\n"
            "def actors_seen_from_a_worker():\n"
            "    from ray.util.state import list_actors\n"
            "    return len(list_actors())\n"
            "print(ray.get(actors_seen_from_a_worker.remote()))\n"
        )
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().splitlines()[-1].isdigit()
    finally:
        other.stdin.close()
        other.wait(timeout=120)
