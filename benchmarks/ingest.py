"""Images/s that the Ray Data pipeline delivers to a training loop, against a PyTorch DataLoader.

    python benchmarks/ingest.py [--images 320] [--size 384x128] [--cpus N] [--repeats 3]

Both read the SAME Parquet shards (made here with raytrain.data.synthetic + write_shards), apply the
SAME transforms (decode_batch: decode and resize; augmentation is the training device's) and use the
SAME CPUs (Ray gets --cpus logical CPUs; the DataLoader --cpus worker processes). Each epoch is
consumed as raytrain/loop.py does (iter_torch_batches, then to_model_input) by a trivial consumer.
The two alternate, epoch by epoch, after one warm-up epoch each; the figures are medians.
Prints one JSON object; the goal is Ray Data at least 1.0x the DataLoader.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import emit, header, spread  # noqa: E402  (the JSON header; stdout kept for the result alone)
from raytrain.config import load_config, parse_size  # noqa: E402
from raytrain.data.pipeline import COLUMNS, ROWS_PER_TASK, build_datasets  # noqa: E402
from raytrain.data.manifest import read_manifest  # noqa: E402
from raytrain.data.shards import write_shards  # noqa: E402
from raytrain.data.synthetic import write_synthetic_kitti  # noqa: E402
from raytrain.data.transforms import decode_batch  # noqa: E402
from raytrain.models import to_model_input  # noqa: E402
from raytrain.training.loop import ToTensors  # noqa: E402

GOAL_RATIO = 1.0


class ParquetShards(torch.utils.data.IterableDataset):
    """The DataLoader's side: each worker streams its share of the Parquet files, ROWS_PER_TASK rows
    at a time, through the same decode_batch as the Ray Data pipeline."""

    def __init__(self, files: list[str], size):
        self.files, self.size = files, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for path in self.files[worker::workers]:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_TASK, columns=COLUMNS):
                batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in COLUMNS}
                yield decode_batch(batch, self.size)


def consume(batches) -> tuple[int, float, float]:
    """A trivial training step: the model input the loop would build, summed.
    -> (images, seconds, seconds until the first batch)."""
    started = time.perf_counter()
    images, checksum, first = 0, 0.0, None
    for batch in batches:
        first = first or time.perf_counter() - started
        checksum += float(to_model_input(batch["image"], "cpu").sum()) + float(batch["mask"].sum())
        images += len(batch["image"])
    return images, time.perf_counter() - started, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", default="384x128", help="WIDTHxHEIGHT of the images and of training")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's logical CPUs = DataLoader workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each, alternating")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    size = parse_size(args.size)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        raw = write_synthetic_kitti(Path(tmp) / "kitti", args.images, seed=0, size=size)
        shards = Path(tmp) / "shards"
        write_shards(raw, "kitti", shards, val_fraction=0.1)  # its default ROWS_PER_SHARD files
        prepare_s = time.perf_counter() - started
        config = load_config(
            {"data": {"path": str(shards), "size": f"{size[0]}x{size[1]}", "augment": True, "shuffle_buffer": 0},
             "train": {"batch_size": args.batch_size}}
        )

        # As raytrain's own local clusters (launch.ensure_ray): Ray workers at nice 0, like the
        # DataLoader's, not Ray's default 15, which yields every core to the consuming process.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": a cluster of its own, even beside one that another job started here.
        ray.init(address="local", num_cpus=args.cpus, log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Streamed, as before the decoded cache: both sides decode every epoch.
        train = build_datasets(config, read_manifest(config.data.path), cpus=args.cpus, cache=False)["train"]
        loader = torch.utils.data.DataLoader(
            ParquetShards(read_manifest(shards).shard_paths("train"), size),
            batch_size=None, num_workers=args.cpus, persistent_workers=True, prefetch_factor=2,
            collate_fn=ToTensors(),
        )

        def ray_epoch():
            return consume(train.iter_torch_batches(batch_size=args.batch_size, collate_fn=ToTensors(), prefetch_batches=2))

        def loader_epoch():
            return consume(loader)  # ROWS_PER_TASK-row batches; the consumer does not care

        runs = {"ray_data": [], "dataloader": []}
        first_batch = {"ray_data": [], "dataloader": []}
        counts = {}
        for repeat in range(args.repeats + 1):  # the first round warms both up and is not counted
            for name, epoch in (("ray_data", ray_epoch), ("dataloader", loader_epoch)) if repeat % 2 == 0 else (
                ("dataloader", loader_epoch), ("ray_data", ray_epoch)):
                images, seconds, first = epoch()
                counts[name] = images
                if repeat:
                    runs[name].append(images / seconds)
                    first_batch[name].append(first)
        ray.shutdown()

    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    ratio = medians["ray_data"] / medians["dataloader"]
    emit({
        **header("ingest"),
        "images": counts, "size": f"{size[0]}x{size[1]}", "cpus": args.cpus, "batch_size": args.batch_size,
        "repeats": args.repeats, "prepare_s": round(prepare_s, 1),
        "images_per_s": {name: [round(rate, 1) for rate in rates] for name, rates in runs.items()},
        "median_images_per_s": {name: round(rate, 1) for name, rate in medians.items()},
        "ratio_ray_data_to_dataloader": round(ratio, 3),
        # Each repeat's pair ran back to back, so their ratio is the comparison least touched by other load.
        "ratio_per_repeat": spread([r / d for r, d in zip(runs["ray_data"], runs["dataloader"])]),
        "median_first_batch_s": {name: round(statistics.median(times), 3) for name, times in first_batch.items()},
        "goal_ratio": GOAL_RATIO,
    })
    return 0 if ratio >= GOAL_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
