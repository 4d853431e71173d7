"""Wall time of the README's first command, `raytrain quickstart`, from scratch.

    python benchmarks/quickstart.py [--repeats 3]

Each repeat runs the real CLI with a new data folder and a new results folder: the synthetic scenes
are made and sharded, then the quickstart search runs (4 trials). Reports each repeat's wall time,
best val IoU, where the time went (data and checks, Ray and the cache, the search, the wrap-up; each
trial's start-up and epochs) and how many Ray warning lines it printed, with median and range.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import NOISE_NOTE, emit, header, log, scratch_dir, spread

import raytrain


def one_quickstart(root, repeat: int) -> dict:
    """One `raytrain quickstart`, its stdout lines timed as they arrive: where its time goes."""
    started = time.perf_counter()
    stderr_path = root / f"stderr-{repeat}.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "raytrain.cli", "quickstart", "--data-dir", str(root / f"data-{repeat}"),
             "--set", f"train.storage_path={root / f'results-{repeat}'}"],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
        process.wait()
    wall_s = time.perf_counter() - started
    errors = stderr_path.read_text()
    if process.returncode != 0:
        raise SystemExit(f"quickstart failed (exit {process.returncode}): {errors.strip()[-2000:]}")

    def first(prefix: str) -> tuple[float, str]:
        return next((at, line) for at, line in lines if line.startswith(prefix))

    experiment_at, experiment_line = first("experiment: ")
    experiment = experiment_line.split(": ", 1)[1]
    cached_at, table_at = first("data.cache: ")[0], first("#  trial")[0]
    trials = [[json.loads(row) for row in path.read_text().splitlines()]
              for path in sorted(Path(experiment).glob("trial_*/result.json"))]
    best = raytrain.best_checkpoint(experiment)
    return {
        "wall_s": round(wall_s, 1),
        "best_val_iou": round(best.metrics["val_iou"], 4),
        "best_val_f1": round(best.metrics["val_f1"], 4),
        "breakdown_s": {
            "data_and_checks": round(experiment_at, 1),  # imports, synthetic scenes, shards, preflight
            "ray_and_cache": round(cached_at - experiment_at, 1),  # local cluster, data decoded once
            "search": round(table_at - cached_at, 1),  # the trials, two at a time
            "wrap_up": round(wall_s - table_at, 1),  # table, best checkpoint, exit
        },
        # Tune's clock in each trial, before its first epoch began: its Ray Train run starting.
        "trial_start_s": [round(rows[0]["time_total_s"] - rows[0]["epoch_s"], 1) for rows in trials],
        "trial_epochs": [len(rows) for rows in trials],
        "epoch_s": spread([row["epoch_s"] for rows in trials for row in rows]),
        "ray_warning_lines": sum("WARNING" in line or "(raylet)" in line for line in [l for _, l in lines] + errors.splitlines()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    scratch = scratch_dir("quickstart")
    runs = []
    for repeat in range(args.repeats):
        log(f"repeat {repeat + 1}/{args.repeats}: raytrain quickstart ...")
        runs.append(one_quickstart(scratch, repeat))
        log(f"  {runs[-1]}")
    emit({
        **header("quickstart"),
        "setup": {"command": "raytrain quickstart (new data and results folders each repeat)", "repeats": args.repeats},
        "wall_s": spread([run["wall_s"] for run in runs]),
        "best_val_iou": spread([run["best_val_iou"] for run in runs]),
        "breakdown_s": {part: spread([run["breakdown_s"][part] for run in runs]) for part in runs[0]["breakdown_s"]},
        "trial_start_s": spread([value for run in runs for value in run["trial_start_s"]]),
        "ray_warning_lines": [run["ray_warning_lines"] for run in runs],
        "runs": runs,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
