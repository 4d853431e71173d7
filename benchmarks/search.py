"""Search efficiency: ASHA against FIFO over the same space, over several search seeds.

    python benchmarks/search.py [--repeats 4] [--samples 8] [--epochs 4] [--count 200] [--first-seed 0]

Both schedulers run raytrain.tune on the same tiny synthetic data (96x32 scenes, a U-Net of 4 base
channels and depth 3, batch 4, 1-worker trials, 2 trials at a time), on one local Ray cluster and one
dataset for every search. Repeat i uses seed first_seed + i as train.seed, which seeds both the random
search's sampler (Tune's BasicVariantGenerator random_state: which configs, in which order) and each
trial's weight init and data order; within a repeat FIFO and ASHA sample the same trials. Every
trial-epoch (one reported epoch of one trial) is ordered by the time it was reported. Per repeat the
target is that repeat's FIFO best val IoU (over every epoch of every trial) less 0.01; a search's cost
to the target is the number of trial-epochs up to and including the first one at or above the target,
and the wall time from the search's start to that report. Which trial is the lucky one, and where it
falls in the order, decides most of that cost: one seed says little, hence the repeats.

Reported per scheduler: median and (min, max) over repeats of trial-epochs and wall time to the target,
total trial-epochs and best val IoU; the per-repeat ASHA/FIFO ratios; and the fraction of repeats in
which ASHA reaches the target with fewer trial-epochs (and with less wall time) than FIFO. A target ASHA
never reaches ranks worse than any reached one (a median or max that falls on it is null). The
per-repeat rows, with each repeat's sampled configs, are in the JSON too; each row also goes to stderr
as soon as its repeat ends. Goal: median ASHA/FIFO trial-epochs to target at most 40%.

Sizing (defaults: about 20 minutes on 2 quiet CPUs). Each trial pays a fixed start-up (Ray Train
worker group, dataset pipeline) worth several of these epochs, and ASHA saves none of it; an epoch of
these scenes is itself mostly fixed cost (validation, checkpoint, report), so fewer scenes save little
time but leave less to learn. A search's wall time is roughly (trials x start-up + trial-epochs x epoch)
over 2 trials at a time, so 16 trials would leave time for only two seeds. The defaults keep the
earlier single run's 8 trials and 200 scenes, cut epochs to 4 (ASHA rungs at 1, 2 and 4 epochs) and
run 4 seeds. Each seed adds two searches: --repeats 5 or more for a tighter median, if the time is
there.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import NOISE_NOTE, emit, header, log, scratch_dir, spread, synthetic_shards

import raytrain
from raytrain.launch import session
from raytrain.config import load_config

GOAL_COMPUTE_FRACTION = 0.40
TOLERANCE = 0.01
MAX_CONCURRENT = 2
SIZE = (96, 32)
SCHEDULERS = ("fifo", "asha")


def search_config(shards: Path, storage: Path, scheduler: str, samples: int, epochs: int, seed: int):
    return load_config({
        "name": f"search-{scheduler}-seed{seed}",
        "data": {"path": str(shards), "size": list(SIZE)},
        "model": {"name": "unet", "base_channels": 4, "depth": 3, "batch_norm": True},
        "train": {"epochs": epochs, "batch_size": 4, "num_workers": 1, "cpus_per_worker": 1, "seed": seed,
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


def sampled_configs(grid) -> list[list]:
    """Each trial's sampled values (lr, loss), in the order the trials were created."""
    trials = sorted(grid, key=lambda result: result.path.rsplit("/", 1)[-1])
    return [[round(float(result.config["search"]["optim.lr"]), 6), result.config["search"]["loss.name"]]
            for result in trials]


def run_search(shards: Path, storage: Path, scheduler: str, samples: int, epochs: int, seed: int, num_cpus: int) -> dict:
    config = search_config(shards, storage, scheduler, samples, epochs, seed)
    log(f"seed {seed}, {scheduler}: {samples} trials x up to {epochs} epochs ...")
    started = time.time()
    grid = raytrain.tune(config, num_cpus=num_cpus)
    search = {"rows": trial_epochs(grid), "started": started, "wall_s": time.time() - started,
              "errors": len(grid.errors), "configs": sampled_configs(grid)}
    log(f"  {len(search['rows'])} trial-epochs in {search['wall_s']:.0f}s")
    return search


def one_repeat(searches: dict, seed: int) -> dict:
    """One seed's row: the target from its FIFO search, and each scheduler's cost to it."""
    fifo_best = max(row["val_iou"] for row in searches["fifo"]["rows"])
    target = fifo_best - TOLERANCE
    row = {"seed": seed, "fifo_best_val_iou": round(fifo_best, 4), "target_val_iou": round(target, 4)}
    for scheduler in SCHEDULERS:
        search = searches[scheduler]
        row[scheduler] = {
            "trial_epochs_total": len(search["rows"]),
            "wall_s_total": round(search["wall_s"], 1),
            "best_val_iou": round(max(row["val_iou"] for row in search["rows"]), 4),
            "trial_errors": search["errors"],
            "to_target": cost_to_target(search["rows"], target, search["started"]),
        }
    asha, fifo = row["asha"]["to_target"], row["fifo"]["to_target"]
    reached = asha["trial_epochs"] is not None
    row["asha_over_fifo_trial_epochs_to_target"] = round(asha["trial_epochs"] / fifo["trial_epochs"], 3) if reached else None
    row["asha_over_fifo_wall_to_target"] = round(asha["wall_s"] / max(fifo["wall_s"], 1), 3) if reached else None
    row["asha_over_fifo_trial_epochs_total"] = round(row["asha"]["trial_epochs_total"] / row["fifo"]["trial_epochs_total"], 3)
    row["asha_fewer_trial_epochs"] = reached and asha["trial_epochs"] < fifo["trial_epochs"]
    row["asha_less_wall"] = reached and asha["wall_s"] < fifo["wall_s"]
    row["configs"] = searches["fifo"]["configs"]
    # Same seed, same sampler: both schedulers should have run the same trials.
    row["same_configs"] = sorted(searches["fifo"]["configs"]) == sorted(searches["asha"]["configs"])
    return row


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for scheduler in SCHEDULERS:
        summary[scheduler] = {
            "trial_epochs_to_target": spread([row[scheduler]["to_target"]["trial_epochs"] for row in rows]),
            "wall_s_to_target": spread([row[scheduler]["to_target"]["wall_s"] for row in rows]),
            "trial_epochs_total": spread([row[scheduler]["trial_epochs_total"] for row in rows]),
            "wall_s_total": spread([row[scheduler]["wall_s_total"] for row in rows]),
            "best_val_iou": spread([row[scheduler]["best_val_iou"] for row in rows]),
            "reached_target": sum(row[scheduler]["to_target"]["trial_epochs"] is not None for row in rows),
            "trial_errors": sum(row[scheduler]["trial_errors"] for row in rows),
        }
    for key in ("asha_over_fifo_trial_epochs_to_target", "asha_over_fifo_wall_to_target", "asha_over_fifo_trial_epochs_total"):
        summary[key] = spread([row[key] for row in rows])
    summary["fraction_asha_fewer_trial_epochs_to_target"] = round(sum(row["asha_fewer_trial_epochs"] for row in rows) / len(rows), 3)
    summary["fraction_asha_less_wall_to_target"] = round(sum(row["asha_less_wall"] for row in rows) / len(rows), 3)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="search seeds; each runs both schedulers")
    parser.add_argument("--first-seed", type=int, default=0, help="repeat i uses train.seed first_seed + i")
    parser.add_argument("--samples", type=int, default=8, help="trials per search")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--count", type=int, default=200, help="synthetic scenes (80%% train)")
    args = parser.parse_args()

    scratch = scratch_dir("search")
    log("making the data ...")
    shards = synthetic_shards(scratch, count=args.count, size=SIZE)
    # One per concurrent 1-worker trial, and two for Ray Data: with only one, the trials' token CPU
    # shares (0.01 each) leave 0.98 free and no 1-CPU decode task can start (the search hangs).
    num_cpus = MAX_CONCURRENT + 2
    session.ensure_ray(num_cpus)  # one cluster for every search: raytrain.tune joins it
    rows = []
    for index in range(args.repeats):
        seed = args.first_seed + index
        # Alternate which scheduler goes first, so slow drift in the machine's load falls on both.
        order = SCHEDULERS if index % 2 == 0 else SCHEDULERS[::-1]
        searches = {scheduler: run_search(shards, scratch / "ray_results", scheduler, args.samples, args.epochs,
                                          seed, num_cpus) for scheduler in order}
        rows.append(one_repeat(searches, seed))
        log(json.dumps({key: value for key, value in rows[-1].items() if key != "configs"}))

    emit({
        **header("search"),
        "setup": {
            "data": f"{args.count} synthetic scenes {SIZE[0]}x{SIZE[1]}, seed 0 (one dataset for every search)",
            "model": "unet base_channels 4 depth 3", "trials": args.samples, "epochs_per_trial": args.epochs,
            "max_concurrent_trials": MAX_CONCURRENT, "workers_per_trial": 1,
            "space": "optim.lr loguniform [1e-4, 3e-2], loss.name choice [bce, bce_dice]",
            "asha": {"grace_period": 1, "reduction_factor": 2}, "repeats": args.repeats,
            "seeds": [args.first_seed + index for index in range(args.repeats)],
            "seed_sets": "train.seed: the search's sampler (configs and their order), weight init, data order",
            "target": f"each repeat's FIFO best val IoU less {TOLERANCE}",
        },
        "summary": summarise(rows),
        "goal_compute_fraction": GOAL_COMPUTE_FRACTION,
        "repeats": rows,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
