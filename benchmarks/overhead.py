"""Ray Train overhead: one Ray Train worker against a plain PyTorch loop, same model, data, batch size.

    python benchmarks/overhead.py [--repeats 3] [--epochs 3] [--threads 1]

Both sides get the same CPUs: the trainer computes with `--threads` torch threads and one more
CPU decodes (plain: one DataLoader worker process; Ray: one logical CPU left to Ray Data's tasks
beside a worker with cpus_per_worker=threads); both augment in the training process, on its device. Both run raytrain's own
`train_one_epoch`/`evaluate` on the quickstart data (400 synthetic scenes 192x64, its U-Net, batch 4,
the same transforms and augmentation). The runs alternate plain, Ray, plain, Ray, ...

Steady-state images/s is training images over training time (from asking for the first batch to the
last optimiser step, as the loop's `images_per_s` metric) in epochs 2..E; the first epoch and the
fixed start-up (process and worker-group start, dataset set-up) are reported apart. Epoch wall
time (train + validation + checkpoint + report) is reported too, from the driver's clock.
Prints one JSON object; the goal is a Ray/plain ratio of steady-state images/s >= 0.95.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import NOISE_NOTE, emit, header, log, median, scratch_dir, spread, steady_summary, synthetic_shards, timed_fit

import numpy as np
import pyarrow.parquet as pq
import torch

from raytrain.config import load_config
from raytrain.data.manifest import read_manifest
from raytrain.data.transforms import decode_sample
from raytrain.losses import create_loss
from raytrain.training.augment import augment_of
from raytrain.training.loop import ToTensors, create_optimizer, evaluate, train_one_epoch
from raytrain.metrics import SegmentationMetrics
from raytrain.models import create_model

GOAL_RATIO = 0.95
REPO = Path(__file__).resolve().parents[1]


def quickstart_config(shards: Path, storage: Path, epochs: int, threads: int):
    return load_config(REPO / "tune_configs/quickstart.yaml", {
        "data.path": str(shards), "train.epochs": epochs, "train.num_workers": 1,
        "train.cpus_per_worker": threads, "train.storage_path": str(storage), "train.max_failures": 0,
    })


# --- the plain PyTorch side -----------------------------------------------------------------------


class ShardRows(torch.utils.data.Dataset):
    """The Parquet rows of one split, decoded per sample exactly as the Ray Data pipeline does."""

    def __init__(self, dataset: Path, split: str, size):
        table = pq.read_table(read_manifest(dataset).shard_paths(split), columns=["id", "image", "mask"])
        self.ids, self.images, self.masks = table["id"].to_pylist(), table["image"].to_pylist(), table["mask"].to_pylist()
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        image, mask = decode_sample(self.images[index], self.masks[index], self.size)
        return self.ids[index], image, mask


class Collate:
    """The loop's ToTensors over DataLoader samples: the same tensors and augmentation parameters."""

    def __init__(self, to_tensors: ToTensors):
        self.to_tensors = to_tensors

    def __call__(self, samples):
        ids, images, masks = zip(*samples)
        return self.to_tensors({"id": np.array(ids), "image": np.stack(images), "mask": np.stack(masks)})


def plain_run(config, threads: int) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    data = config.data
    augment = augment_of(data)  # the same augmentation as the worker loop's
    loader_options = dict(batch_size=config.train.batch_size, num_workers=1, persistent_workers=True, prefetch_factor=2)
    train_loader = torch.utils.data.DataLoader(
        ShardRows(data.path, "train", data.size), shuffle=True, drop_last=False,
        collate_fn=Collate(ToTensors(augment, data.size)), **loader_options
    )
    val_loader = torch.utils.data.DataLoader(ShardRows(data.path, "val", data.size), collate_fn=Collate(ToTensors()),
                                             **loader_options)
    model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs())
    loss_fn = create_loss(config.loss.name, num_classes=config.num_classes)
    optimizer = create_optimizer(config, model.parameters())
    metrics = SegmentationMetrics(config.num_classes, class_names=config.classes, from_logits=True)
    device = torch.device("cpu")

    rates, epoch_seconds = [], []
    for epoch in range(config.train.epochs):
        epoch_started = time.perf_counter()
        _, seen = train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch)
        rates.append(seen / (time.perf_counter() - epoch_started))
        metrics.reset()
        evaluate(model, val_loader, loss_fn, metrics, device)
        metrics.compute()
        epoch_seconds.append(time.perf_counter() - epoch_started)
    return {"images_per_s": rates, "epoch_s": epoch_seconds,
            "total_s": time.perf_counter() - started}


def phases(runs: list[dict], train_images: int) -> dict:
    """Where a steady epoch's wall time goes: training, validation, and (Ray) what follows the
    worker's own epoch clock: TensorBoard, checkpoint, report. Medians over epochs 2..E of all runs."""
    train, val, after = [], [], []
    for run in runs:
        for epoch in range(1, len(run["epoch_s"])):
            train_s = train_images / run["images_per_s"][epoch]
            worker_s = run["worker_epoch_s"][epoch] if "worker_epoch_s" in run else run["epoch_s"][epoch]
            train.append(train_s)
            val.append(worker_s - train_s)
            after.append(run["epoch_s"][epoch] - worker_s)
    return {"train": round(median(train), 2), "validate": round(median(val), 2),
            "tensorboard_checkpoint_report": round(median(after), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is left out of steady state")
    parser.add_argument("--threads", type=int, default=1, help="torch threads = Ray cpus_per_worker")
    args = parser.parse_args()

    from raytrain.launch import session

    scratch = scratch_dir("overhead")
    log("making the quickstart data ...")
    shards = synthetic_shards(scratch)
    config = quickstart_config(shards, scratch / "ray_results", args.epochs, args.threads)
    session.ensure_ray(args.threads + 1)  # the worker's CPUs, plus one for Ray Data (as the DataLoader worker)
    plain_runs, ray_runs = [], []
    for repeat in range(args.repeats):
        log(f"repeat {repeat + 1}/{args.repeats}: plain ...")
        plain_runs.append(plain_run(config, args.threads))
        log(f"  plain {[round(r, 1) for r in plain_runs[-1]['images_per_s']]} images/s")
        log(f"repeat {repeat + 1}/{args.repeats}: ray ...")
        run = timed_fit(config, scratch / "reports.jsonl", name=f"overhead-{repeat}")
        run["worker_epoch_s"] = [report["epoch_s"] for report in run.pop("reports")]  # the loop's train + validate clock
        ray_runs.append(run)
        log(f"  ray   {[round(r, 1) for r in ray_runs[-1]['images_per_s']]} images/s")

    plain, ray_side = steady_summary(plain_runs), steady_summary(ray_runs)
    train_images = read_manifest(shards).num_samples["train"]
    plain["steady_phases_s_median"] = phases(plain_runs, train_images)
    ray_side["steady_phases_s_median"] = phases(ray_runs, train_images)
    ratio = ray_side["steady_images_per_s_median"] / plain["steady_images_per_s_median"]
    emit({
        **header("overhead"),
        "setup": {
            "data": "quickstart: 400 synthetic scenes 192x64, seed 0", "model": "quickstart unet (batch norm)",
            "batch_size": config.train.batch_size, "epochs_per_run": args.epochs, "repeats": args.repeats,
            "torch_threads": args.threads, "data_cpus": 1,
        },
        "plain": plain,
        "ray": ray_side,
        "ray_over_plain_steady_images_per_s": round(ratio, 3),
        "ray_over_plain_per_repeat": spread([r / p for r, p in zip(
            ray_side["steady_images_per_s_per_repeat"], plain["steady_images_per_s_per_repeat"])]),
        "goal_ratio": GOAL_RATIO,
        "raw": {"plain": plain_runs, "ray": ray_runs},
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
