"""Wall time of the README's first command, `raytrain quickstart`, from scratch.

    python benchmarks/quickstart.py [--repeats 3]

Each repeat runs the real CLI with a new data folder and a new results folder: the synthetic scenes
are made and sharded, then the quickstart search runs (4 trials). Reports each repeat's wall time and
best val IoU, with median and range. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import NOISE_NOTE, emit, header, log, scratch_dir, spread

import raytrain


def one_quickstart(root, repeat: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "raytrain.cli", "quickstart", "--data-dir", str(root / f"data-{repeat}"),
         "--set", f"train.storage_path={root / f'results-{repeat}'}"],
        capture_output=True, text=True,
    )
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"quickstart failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    experiment = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("experiment: "))
    best = raytrain.best_checkpoint(experiment)
    return {"wall_s": round(wall_s, 1), "best_val_iou": round(best.metrics["val_iou"], 4),
            "best_val_f1": round(best.metrics["val_f1"], 4)}


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
        "runs": runs,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
