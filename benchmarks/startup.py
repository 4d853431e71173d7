"""A trial's fixed costs: from its start to its first training batch, between trials, and each
epoch's start to its first batch.

    python benchmarks/startup.py [--trials 4] [--epochs 3] [--cache auto|off] [--workers 1]

One search of `--trials` FIFO trials, one at a time, through raytrain.tune on the quickstart's data
(400 synthetic scenes at 192x64, its U-Net, batch 4, `--workers` workers: one trains in Tune's
trial actor, more are a Ray Train run of DDP workers), on a local Ray cluster of its own (3 logical
CPUs on the 2 cores, or as many as `raytrain tune` would start for the config, if more).
From each trial's Tune results:
- start_to_first_batch_s: Tune's clock of the trial at its first report (time_total_s, from the
  trial function's start), less that epoch's own time (epoch_s), plus the time its first batch took
  to arrive (first_batch_s): trial function start -> first training batch in hand;
- start_to_epoch_s: the same without first_batch_s, for versions of raytrain without that metric;
- between_trials_s: one trial's last report to the next trial's start (Tune's own scheduling);
- later_epochs_first_batch_s: first_batch_s of epochs 2.. (the cache's decoded split, or a new
  Ray Data execution that decodes again).
The first trial also pays the cluster's warm-up (worker processes, imports): it is reported apart.
- actors: from Ray's State API, every actor process a run started, by class, in the order of their
  creation: from its creation to its process running its constructor (wait_s: a new worker process,
  spawned and registered), and the constructor's own time (init_s: mostly imports).
Prints one JSON object with the median and range over trials.
"""
from __future__ import annotations

import argparse
import sys
import time

from common import NOISE_NOTE, emit, header, log, scratch_dir, spread, synthetic_shards

import raytrain
from raytrain.config import load_config
from raytrain.launch import session
from raytrain.preflight import local_cpus


def trial_rows(grid) -> list[dict]:
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        first = frame.iloc[0]
        start = float(first["timestamp"]) - float(first["time_total_s"])
        first_batch = frame["first_batch_s"].tolist() if "first_batch_s" in frame else []
        rows.append({
            "start": start,
            "last_report": float(frame.iloc[-1]["timestamp"]),
            "start_to_epoch_s": float(first["time_total_s"]) - float(first["epoch_s"]),
            "start_to_first_batch_s": (float(first["time_total_s"]) - float(first["epoch_s"]) + first_batch[0]) if first_batch else None,
            "later_epochs_first_batch_s": first_batch[1:],
        })
    return sorted(rows, key=lambda row: row["start"])


def actor_starts(since: float) -> list[dict]:
    """Each actor class's wait_s and init_s (see the docstring), in order of first creation."""
    from ray.util.state import list_tasks

    import ray

    tasks = list_tasks(address=ray.get_runtime_context().gcs_address, detail=True, limit=10000,
                       filters=[("type", "=", "ACTOR_CREATION_TASK")], raise_on_missing_output=False)
    by_class: dict[str, dict] = {}
    for task in sorted(tasks, key=lambda task: task.creation_time_ms or 0):
        if not (task.creation_time_ms and task.start_time_ms and task.end_time_ms):
            continue
        row = by_class.setdefault(task.name.split(".")[0], {"first_created_s": round(task.creation_time_ms / 1000 - since, 1),
                                                              "wait_s": [], "init_s": []})
        row["wait_s"].append(round((task.start_time_ms - task.creation_time_ms) / 1000, 2))
        row["init_s"].append(round((task.end_time_ms - task.start_time_ms) / 1000, 2))
    return [{"actor": name, "first_created_s": row["first_created_s"], "wait_s": spread(row["wait_s"]),
             "init_s": spread(row["init_s"])} for name, row in by_class.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", default=None, help="data.cache (auto, off); left out for versions without it")
    parser.add_argument("--workers", type=int, default=1, help="train.num_workers of each trial")
    args = parser.parse_args()

    scratch = scratch_dir("startup")
    log("making the quickstart's data ...")
    shards = synthetic_shards(scratch)
    overrides = {
        "data.path": str(shards), "train.storage_path": str(scratch / "results"), "train.epochs": args.epochs,
        "train.num_workers": args.workers, "train.max_failures": 0, "search.num_samples": args.trials,
        "search.max_concurrent_trials": 1, "search.scheduler.name": "fifo",
        "search.space": {"optim.lr": {"choice": [0.001, 0.002]}},
    }
    if args.cache:
        overrides["data.cache"] = args.cache
    config = load_config("quickstart", overrides)
    cpus = max(3, local_cpus(config, search=True))  # 3: the trial's worker, Ray Data, a share for the trial
    session.ensure_ray(cpus)
    log(f"{args.trials} trials of {args.epochs} epochs, one at a time ...")
    started = time.time()
    grid = raytrain.tune(config)
    rows = trial_rows(grid)
    later = rows[1:]
    gaps = [b["start"] - a["last_report"] for a, b in zip(rows, rows[1:])]
    emit({
        **header("startup"),
        "setup": {"trials": args.trials, "epochs": args.epochs, "cache": args.cache, "workers": args.workers,
                  "data": "quickstart (400 scenes, 192x64)", "cluster": f"local, {cpus} logical CPUs",
                  "trials_at_once": 1},
        "first_trial": {key: rows[0][key] for key in ("start_to_epoch_s", "start_to_first_batch_s")} if rows else None,
        "later_trials_start_to_first_batch_s": spread([round(r["start_to_first_batch_s"], 2) for r in later]) if later and later[0]["start_to_first_batch_s"] is not None else None,
        "later_trials_start_to_epoch_s": spread([round(r["start_to_epoch_s"], 2) for r in later]) if later else None,
        "between_trials_s": spread([round(g, 2) for g in gaps]) if gaps else None,
        "later_epochs_first_batch_s": spread([round(v, 3) for r in rows for v in r["later_epochs_first_batch_s"]])
        if any(r["later_epochs_first_batch_s"] for r in rows) else None,
        "actors": actor_starts(started),
        "goals": {"start_to_first_batch_s": 5, "epoch_first_batch_s": 0.3},
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
