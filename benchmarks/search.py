"""Search efficiency: ASHA against FIFO over the same space, seed and number of trials.

    python benchmarks/search.py [--samples 8] [--epochs 6] [--count 200]

Both searches run raytrain.tune on the same tiny synthetic data (96x32 scenes, a U-Net of
4 base channels and depth 3, batch 4, 1-worker trials, 2 trials at a time) and sample the same
trials (search.seed = train.seed). The target is FIFO's best val IoU over every epoch of every
trial, less 0.01. Every trial-epoch (one reported epoch of one trial) is ordered by the time it was
reported; a search's cost to the target is the number of trial-epochs up to and including the
first one at or above the target, and the wall time from the search's start to that report.
Goal: ASHA reaches the target with at most 40% of FIFO's trial-epochs. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import NOISE_NOTE, emit, header, log, scratch_dir, synthetic_shards

import raytrain
from raytrain import launch
from raytrain.config import load_config

GOAL_COMPUTE_FRACTION = 0.40
TOLERANCE = 0.01
MAX_CONCURRENT = 2
SIZE = (96, 32)


def search_config(shards: Path, storage: Path, scheduler: str, samples: int, epochs: int):
    return load_config({
        "name": f"search-{scheduler}",
        "data": {"path": str(shards), "size": list(SIZE)},
        "model": {"name": "unet", "base_channels": 4, "depth": 3, "batch_norm": True},
        "train": {"epochs": epochs, "batch_size": 4, "num_workers": 1, "cpus_per_worker": 1, "seed": 0,
                  "checkpoints_to_keep": 1, "max_failures": 0, "storage_path": str(storage)},
        "search": {
            "metric": "val_iou", "mode": "max", "num_samples": samples, "max_concurrent_trials": MAX_CONCURRENT,
            "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 2},
            "space": {"optim.lr": {"loguniform": [1e-4, 3e-2]}, "loss.name": {"choice": ["bce", "bce_dice"]}},
        },
    })


def trial_epochs(grid) -> list[dict]:
    """Every reported epoch of every trial, in the order they were reported."""
    rows = []
    for result in grid:
        if result.metrics_dataframe is None:
            continue
        for row in result.metrics_dataframe.itertuples():
            rows.append({"time": float(row.timestamp), "trial": result.path.rsplit("/", 1)[-1],
                         "epoch": int(row.epoch), "val_iou": float(row.val_iou)})
    # Tune's timestamp has 1 s resolution: ties keep each trial's own epoch order.
    return sorted(rows, key=lambda row: (row["time"], row["trial"], row["epoch"]))


def cost_to_target(rows: list[dict], target: float, started: float) -> dict:
    for count, row in enumerate(rows, start=1):
        if row["val_iou"] >= target:
            return {"trial_epochs": count, "wall_s": round(row["time"] - started, 1),
                    "val_iou": round(row["val_iou"], 4), "trial": row["trial"], "epoch": row["epoch"]}
    return {"trial_epochs": None, "wall_s": None, "val_iou": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="trials per search")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--count", type=int, default=200, help="synthetic scenes (80% train)")
    args = parser.parse_args()

    scratch = scratch_dir("search")
    log("making the data ...")
    shards = synthetic_shards(scratch, count=args.count, size=SIZE)
    # One per concurrent 1-worker trial, and two for Ray Data: with only one, the trials' token CPU
    # shares (0.01 each) leave 0.98 free and no 1-CPU decode task can start (the search hangs).
    num_cpus = MAX_CONCURRENT + 2
    launch.ensure_ray(num_cpus)
    searches = {}
    for scheduler in ("fifo", "asha"):
        config = search_config(shards, scratch / "ray_results", scheduler, args.samples, args.epochs)
        log(f"{scheduler}: {args.samples} trials x up to {args.epochs} epochs ...")
        started = time.time()
        grid = raytrain.tune(config, num_cpus=num_cpus)
        searches[scheduler] = {"rows": trial_epochs(grid), "started": started, "wall_s": time.time() - started,
                               "errors": len(grid.errors)}
        log(f"  {len(searches[scheduler]['rows'])} trial-epochs in {searches[scheduler]['wall_s']:.0f}s")

    fifo_best = max(row["val_iou"] for row in searches["fifo"]["rows"])
    target = fifo_best - TOLERANCE
    summary = {}
    for scheduler, search in searches.items():
        summary[scheduler] = {
            "trial_epochs_total": len(search["rows"]),
            "wall_s_total": round(search["wall_s"], 1),
            "best_val_iou": round(max(row["val_iou"] for row in search["rows"]), 4),
            "trial_errors": search["errors"],
            "to_target": cost_to_target(search["rows"], target, search["started"]),
        }
    asha, fifo = summary["asha"]["to_target"], summary["fifo"]["to_target"]
    reached = asha["trial_epochs"] is not None
    emit({
        **header("search"),
        "setup": {
            "data": f"{args.count} synthetic scenes {SIZE[0]}x{SIZE[1]}, seed 0", "model": "unet base_channels 4 depth 3",
            "trials": args.samples, "epochs_per_trial": args.epochs, "max_concurrent_trials": MAX_CONCURRENT,
            "workers_per_trial": 1, "space": "optim.lr loguniform [1e-4, 3e-2], loss.name choice [bce, bce_dice]",
            "asha": {"grace_period": 1, "reduction_factor": 2}, "seed": 0,
        },
        "fifo_best_val_iou": round(fifo_best, 4),
        "target_val_iou": round(target, 4),
        "fifo": summary["fifo"],
        "asha": summary["asha"],
        "asha_over_fifo_trial_epochs_to_target": round(asha["trial_epochs"] / fifo["trial_epochs"], 3) if reached else None,
        "asha_over_fifo_wall_to_target": round(asha["wall_s"] / max(fifo["wall_s"], 1), 3) if reached else None,
        "asha_over_fifo_trial_epochs_total": round(summary["asha"]["trial_epochs_total"] / summary["fifo"]["trial_epochs_total"], 3),
        "goal_compute_fraction": GOAL_COMPUTE_FRACTION,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
