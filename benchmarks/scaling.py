"""DDP scaling: the same Ray Train run with 1 and with 2 workers, on this machine's CPUs or its GPUs.

    python benchmarks/scaling.py [--repeats 2] [--epochs 3] [--workers 1 2]

raytrain's own worker loop on the quickstart data (400 synthetic scenes 192x64, its U-Net, batch 4
per worker). images/s is the run's total: training images over all workers divided by rank 0's
training time, in epochs 2..E (steady state); the first epoch and the fixed start-up are reported
apart. Runs alternate 1, 2, 1, 2, ... workers on one Ray cluster of (max workers + 1) logical CPUs,
one CPU per worker plus one for Ray Data. With CUDA devices every worker gets one GPU (two
workers share the GPU when there is only one; the JSON says so). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import (NOISE_NOTE, emit, header, log, scratch_dir, spread, steady_summary, synthetic_shards, timed_fit)

import torch

from raytrain.launch import session
from raytrain.config import load_config

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is left out of steady state")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    gpus = torch.cuda.device_count()
    scratch = scratch_dir("scaling")
    log("making the quickstart data ...")
    shards = synthetic_shards(scratch)
    session.ensure_ray(max(args.workers) + 1)
    runs = {n: [] for n in args.workers}
    for repeat in range(args.repeats):
        for workers in args.workers:
            overrides = {
                "data.path": str(shards), "train.epochs": args.epochs, "train.num_workers": workers,
                "train.cpus_per_worker": 1, "train.storage_path": str(scratch / "ray_results"), "train.max_failures": 0,
            }
            if gpus:
                overrides.update({"train.use_gpu": True, "train.gpus_per_worker": min(1.0, gpus / workers)})
            config = load_config(REPO / "tune_configs/quickstart.yaml", overrides)
            log(f"repeat {repeat + 1}/{args.repeats}: {workers} worker(s) ...")
            run = timed_fit(config, scratch / "reports.jsonl", name=f"scaling-{workers}-{repeat}")
            run.pop("reports")
            runs[workers].append(run)
            log(f"  {[round(r, 1) for r in run['images_per_s']]} images/s")

    results = {f"{n}_workers": steady_summary(runs[n]) for n in args.workers}
    base = results[f"{args.workers[0]}_workers"]["steady_images_per_s_median"]
    emit({
        **header("scaling"),
        "setup": {
            "data": "quickstart: 400 synthetic scenes 192x64, seed 0", "model": "quickstart unet (batch norm)",
            "batch_size_per_worker": 4, "epochs_per_run": args.epochs, "repeats": args.repeats,
            "device": f"{gpus} CUDA device(s), gpus_per_worker = min(1, gpus / workers)" if gpus
            else f"CPU: 1 logical CPU (1 torch thread) per worker, {max(args.workers) + 1} logical CPUs in Ray",
        },
        **results,
        "speedup": {f"{n}_workers": round(results[f"{n}_workers"]["steady_images_per_s_median"] / base, 3)
                    for n in args.workers},
        "speedup_per_repeat": {f"{n}_workers": spread([
            run / first for run, first in zip(results[f"{n}_workers"]["steady_images_per_s_per_repeat"],
                                              results[f"{args.workers[0]}_workers"]["steady_images_per_s_per_repeat"])])
            for n in args.workers[1:]},
        "raw": {f"{n}_workers": runs[n] for n in args.workers},
        "note": NOISE_NOTE + (
            f"; this machine has {__import__('os').cpu_count()} cores, so 2 workers plus Ray Data's decoding "
            "oversubscribe it" if not gpus else ""),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
