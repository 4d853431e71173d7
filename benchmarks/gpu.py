"""GPU training speed: U-Net/ResNet-34 at 384x1248, bf16 + channels_last against fp32.

    python benchmarks/gpu.py [--images 160] [--batch-size 8] [--epochs 3] [--repeats 2]

smp:Unet with a ResNet-34 encoder (encoder_weights none) on synthetic KITTI-layout scenes of
1248x384, fed by raytrain's own Ray Data pipeline (decode, augment) with raytrain's
`train_one_epoch`, in one process on one GPU: fp32, and bf16 autocast with channels_last,
alternating. Reported per precision: steady-state images/s (epochs 2..E), peak GPU memory
(torch.cuda.max_memory_allocated) and the fraction of each epoch's training time spent waiting
for the next batch (the step ends with loss.item(), so time blocked on the iterator is data wait).
Without a CUDA device it prints {"skipped": "no CUDA device"}; `--device cpu --size 128x64`
runs the same code on the CPU as a smoke test. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import NOISE_NOTE, emit, header, log, median, scratch_dir, synthetic_shards

import torch

MODES = {"fp32": (None, False), "bf16_channels_last": (torch.bfloat16, True)}


class TimedBatches:
    """Wraps a batch iterator and adds up the time spent waiting for each next batch."""

    def __init__(self, batches):
        self.batches, self.wait_s = batches, 0.0

    def __iter__(self):
        iterator = iter(self.batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - started
            yield batch


def run(config, mode: str, device: torch.device, epochs: int) -> dict:
    from raytrain.data.pipeline import build_datasets
    from raytrain.losses import create_loss
    from raytrain.loop import create_optimizer, to_tensors, train_one_epoch
    from raytrain.models import create_model

    amp_dtype, channels_last = MODES[mode]
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(config.loss.name, num_classes=config.num_classes).to(device)
    optimizer = create_optimizer(config, model.parameters())
    train = build_datasets(config)["train"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rates, wait_fractions = [], []
    for epoch in range(epochs):
        batches = TimedBatches(train.iter_torch_batches(
            batch_size=config.train.batch_size, collate_fn=to_tensors, prefetch_batches=2,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
        ))
        started = time.perf_counter()
        _, seen = train_one_epoch(model, batches, loss_fn, optimizer, device, epoch,
                                  amp_dtype=amp_dtype, channels_last=channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        rates.append(seen / seconds)
        wait_fractions.append(batches.wait_s / seconds)
        log(f"  {mode} epoch {epoch + 1}: {rates[-1]:.1f} images/s, {wait_fractions[-1]:.0%} waiting for data")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": rates, "data_wait_fraction": wait_fractions, "peak_memory_gib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160, help="synthetic scenes (80%% train)")
    parser.add_argument("--size", default="1248x384", help="WIDTHxHEIGHT")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is left out of steady state")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        emit({**header("gpu"), "skipped": "no CUDA device"})
        return 0
    device = torch.device(args.device)

    from raytrain import launch
    from raytrain.config import load_config, parse_size

    size = parse_size(args.size)
    scratch = scratch_dir("gpu")
    log(f"making {args.images} synthetic scenes {size[0]}x{size[1]} ...")
    shards = synthetic_shards(scratch, count=args.images, size=size, rows_per_shard=16)
    config = load_config({
        "data": {"path": str(shards), "size": list(size)},
        "model": {"name": "smp:Unet", "encoder": "resnet34", "encoder_weights": None},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": args.batch_size, "num_workers": 1},
    })
    # Every core but the one driving the GPU decodes and augments (Ray Data's tasks).
    launch.ensure_ray(os.cpu_count())
    runs = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            log(f"repeat {repeat + 1}/{args.repeats}: {mode} ...")
            runs[mode].append(run(config, mode, device, args.epochs))

    results = {}
    for mode, mode_runs in runs.items():
        peaks = [r["peak_memory_gib"] for r in mode_runs if r["peak_memory_gib"] is not None]
        results[mode] = {
            "steady_images_per_s_median": round(median(median(r["images_per_s"][1:]) for r in mode_runs), 2),
            "steady_data_wait_fraction_median": round(median(median(r["data_wait_fraction"][1:]) for r in mode_runs), 3),
            "peak_memory_gib": round(max(peaks), 2) if peaks else None,
            "raw": mode_runs,
        }
    emit({
        **header("gpu"),
        "setup": {
            "model": "smp:Unet encoder resnet34, encoder_weights none", "size": f"{size[0]}x{size[1]}",
            "batch_size": args.batch_size, "train_images": "80% of " + str(args.images), "epochs_per_run": args.epochs,
            "repeats": args.repeats, "device": str(device), "data": f"Ray Data pipeline on {os.cpu_count()} logical CPUs",
        },
        **results,
        "bf16_channels_last_over_fp32_images_per_s": round(
            results["bf16_channels_last"]["steady_images_per_s_median"] / results["fp32"]["steady_images_per_s_median"], 3),
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
