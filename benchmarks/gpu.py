"""GPU training speed: U-Net/ResNet-34 at 384x1248, bf16 + channels_last against fp32.

    python benchmarks/gpu.py [--images 160] [--batch-size 8] [--epochs 3] [--repeats 2] [--data-cpus 4,16]
                             [--alone-batches 8,32] [--compile]

smp:Unet with a ResNet-34 encoder (encoder_weights none) on synthetic KITTI-layout scenes of
1248x384, fed by raytrain's own Ray Data pipeline (decode; augmented on the GPU) with raytrain's
`train_one_epoch`, in one process on one GPU: fp32, and bf16 autocast with channels_last,
alternating. Reported per precision: steady-state images/s (epochs 2..E), peak GPU memory
(torch.cuda.max_memory_allocated), the fraction of each epoch's training time spent waiting
for the next batch (time blocked on the iterator; the epoch ends with a device sync), and the
model alone: images/s of train steps on one batch already on the device (the ceiling that data
feeding can reach), and a sweep of the model alone over --alone-batches, both precisions and (with
--compile) torch.compile, with each one's peak memory: the batch sizes that fit. Ray Data gets `--data-cpus` logical CPUs, each count a separate Ray cluster:
4 is what kitti_search gives each GPU worker (cpus_per_worker). Without a CUDA device it prints
{"skipped": "no CUDA device"}; `--device cpu --size 128x64` runs the same code on the CPU as a
smoke test. Prints one JSON object.
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
        self.batches, self.wait_s, self.first = batches, 0.0, None

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
            self.first = self.first or batch
            yield batch


def run(config, mode: str, device: torch.device, epochs: int) -> dict:
    from raytrain.data.manifest import read_manifest
    from raytrain.data.pipeline import build_datasets
    from raytrain.losses import create_loss
    from raytrain.training.augment import augment_of
    from raytrain.training.loop import ToTensors, create_optimizer, host_batches, train_one_epoch
    from raytrain.models import create_model

    amp_dtype, channels_last = MODES[mode]
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(config.loss.name, num_classes=config.num_classes).to(device)
    optimizer = create_optimizer(config, model.parameters())
    import ray

    # Streamed, decoding every epoch: the feed this measures (a cached split decodes only once).
    datasets = build_datasets(config, read_manifest(config.data.path), cpus=int(ray.cluster_resources()["CPU"]), cache=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rates, wait_fractions, first_batch = [], [], None
    for epoch in range(epochs):
        train = datasets["train"]
        batches = TimedBatches(train.iter_torch_batches(
            batch_size=config.train.batch_size, prefetch_batches=2,
            collate_fn=ToTensors(augment_of(config.data), config.data.size, seed=config.train.seed, epoch=epoch),
            local_shuffle_buffer_size=config.data.shuffle_buffer or None, **host_batches(device),
        ))
        started = time.perf_counter()
        _, seen = train_one_epoch(model, batches, loss_fn, optimizer, device, epoch,
                                  amp_dtype=amp_dtype, channels_last=channels_last)
        synchronize(device)
        seconds = time.perf_counter() - started
        rates.append(seen / seconds)
        wait_fractions.append(batches.wait_s / seconds)
        first_batch = first_batch or batches.first
        log(f"  {mode} epoch {epoch + 1}: {rates[-1]:.1f} images/s, {wait_fractions[-1]:.0%} waiting for data")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    alone = model_alone(model, first_batch, loss_fn, optimizer, device, amp_dtype, channels_last)
    log(f"  {mode} model alone: {alone:.1f} images/s")
    return {"images_per_s": rates, "data_wait_fraction": wait_fractions, "peak_memory_gib": peak,
            "model_alone_images_per_s": alone}


def model_alone(model, batch, loss_fn, optimizer, device, amp_dtype, channels_last, steps: int = 20) -> float:
    """Images/s of train steps on one batch that is already on the device: no data feeding at all."""
    from raytrain.training.loop import autocast, forward, grad_scaler, train_step

    # Parameters of the augmentation stay on the host, as the loop keeps them.
    batch = {name: tensor if name == "augment" else tensor.to(device) for name, tensor in batch.items()}
    scaler, precision = grad_scaler(device, amp_dtype), autocast(device, amp_dtype)
    for step in range(3 + steps):  # 3 warm-up steps
        if step == 3:
            synchronize(device)
            started = time.perf_counter()
        _, masks, loss = forward(model, loss_fn, batch, device, precision, channels_last)
        train_step(model, loss, optimizer, scaler, None)
    synchronize(device)
    return steps * len(masks) / (time.perf_counter() - started)


def model_sweep(config, device: torch.device, batch_sizes: list[int], compile_options: list[bool]) -> list[dict]:
    """The model alone (no data feeding) at each batch size, precision and compile setting, on one
    synthetic batch already on the device (augmentation included, as in training): images/s and
    peak memory."""
    import numpy as np

    from raytrain.losses import create_loss
    from raytrain.models import create_model
    from raytrain.training.augment import augment_of, batch_params
    from raytrain.training.loop import create_optimizer

    width, height = config.data.size
    rows = []
    for batch_size in batch_sizes:
        rng = np.random.default_rng(0)
        batch = {
            "image": torch.from_numpy(rng.integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)),
            "mask": torch.from_numpy(rng.integers(0, 2, (batch_size, height, width), dtype=np.uint8)),
            "augment": torch.from_numpy(batch_params(augment_of(config.data), (width, height),
                                                     [str(i) for i in range(batch_size)], seed=0, epoch=0)),
        }
        for mode, (amp_dtype, channels_last) in MODES.items():
            for compiled in compile_options:
                torch.manual_seed(0)
                model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs()).to(device)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                optimizer = create_optimizer(config, model.parameters())
                loss_fn = create_loss(config.loss.name, num_classes=config.num_classes).to(device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    rate = model_alone(torch.compile(model) if compiled else model, batch, loss_fn, optimizer, device,
                                       amp_dtype, channels_last)
                    error = None
                except torch.OutOfMemoryError:
                    rate, error = None, "out of memory"
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                rows.append({"batch_size": batch_size, "mode": mode, "compile": compiled,
                             "images_per_s": round(rate, 2) if rate else None,
                             "peak_memory_gib": round(peak, 2) if peak is not None else None, "error": error})
                log(f"  model alone, batch {batch_size}, {mode}, compile {compiled}: {rows[-1]}")
                del model, optimizer
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160, help="synthetic scenes (80%% train)")
    parser.add_argument("--size", default="1248x384", help="WIDTHxHEIGHT")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is left out of steady state")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-cpus", default="4", help="logical CPUs for Ray Data, comma-separated: one cluster each")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    parser.add_argument("--alone-batches", default="8,32", help="batch sizes of the model-alone sweep, comma-separated")
    parser.add_argument("--compile", action="store_true", help="the sweep also with torch.compile")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        emit({**header("gpu"), "skipped": "no CUDA device"})
        return 0
    device = torch.device(args.device)

    import ray

    from raytrain.launch import session
    from raytrain.config import load_config, parse_size

    size = parse_size(args.size)
    scratch = scratch_dir("gpu")
    log(f"making {args.images} synthetic scenes {size[0]}x{size[1]} ...")
    # Small files: one read task per file, so every data CPU gets work even in a short epoch.
    shards = synthetic_shards(scratch, count=args.images, size=size, rows_per_shard=4)
    config = load_config({
        "data": {"path": str(shards), "size": list(size)},
        "model": {"name": "smp:Unet", "encoder": "resnet34", "encoder_weights": None},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": args.batch_size, "num_workers": 1},
    })
    sweep = model_sweep(config, device, [int(n) for n in args.alone_batches.split(",")],
                        [False, True] if args.compile else [False])
    by_cpus = {}
    for data_cpus in [int(n) for n in args.data_cpus.split(",")]:
        session.ensure_ray(data_cpus)  # the driver trains; Ray Data's tasks decode on these
        runs = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                log(f"{data_cpus} data CPUs, repeat {repeat + 1}/{args.repeats}: {mode} ...")
                runs[mode].append(run(config, mode, device, args.epochs))
        ray.shutdown()
        by_cpus[f"data_cpus_{data_cpus}"] = summarise(runs)

    emit({
        **header("gpu"),
        "setup": {
            "model": "smp:Unet encoder resnet34, encoder_weights none", "size": f"{size[0]}x{size[1]}",
            "batch_size": args.batch_size, "train_images": "80% of " + str(args.images), "epochs_per_run": args.epochs,
            "repeats": args.repeats, "device": device_name(device),
            "data": "raytrain's Ray Data pipeline (PNG decode; augmentation on the GPU) on data_cpus logical CPUs of "
                    f"{os.cpu_count()}",
        },
        "model_alone_sweep": sweep,
        **by_cpus,
        "note": NOISE_NOTE,
    })
    return 0


def summarise(runs: dict) -> dict:
    results = {}
    for mode, mode_runs in runs.items():
        peaks = [r["peak_memory_gib"] for r in mode_runs if r["peak_memory_gib"] is not None]
        results[mode] = {
            "steady_images_per_s_median": round(median(median(r["images_per_s"][1:]) for r in mode_runs), 2),
            "steady_data_wait_fraction_median": round(median(median(r["data_wait_fraction"][1:]) for r in mode_runs), 3),
            "model_alone_images_per_s_median": round(median(r["model_alone_images_per_s"] for r in mode_runs), 2),
            "peak_memory_gib": round(max(peaks), 2) if peaks else None,
            "raw": mode_runs,
        }
    for key in ("steady_images_per_s_median", "model_alone_images_per_s_median"):
        results[f"bf16_channels_last_over_fp32_{key}"] = round(
            results["bf16_channels_last"][key] / results["fp32"][key], 3)
    return results


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
