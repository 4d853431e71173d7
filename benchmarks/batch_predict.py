"""Images/s of `raytrain predict --workers N` (Ray Data, a pool of model actors) against the
one-process loop (`raytrain predict` without --workers), on the same images and checkpoint.

    python benchmarks/batch_predict.py [--images 240] [--size 384x128] [--workers 2] [--cpus 2] [--repeats 3]

The images are synthetic road scenes (raytrain.data.synthetic), the checkpoint an untrained U-Net
of the quickstart's shape at 192x64 (prediction costs the same whatever the weights). One local Ray
of --cpus logical CPUs serves every cluster run. The two alternate, each into a fresh output folder;
a cluster run's wall time includes starting its actors (each imports torch and loads the model),
so "after_first_batch" is also given: the rate once the first batch is back. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import NOISE_NOTE, emit, header, log, median, scratch_dir  # noqa: E402
import raytrain  # noqa: E402
from raytrain.checkpoints import save_checkpoint  # noqa: E402
from raytrain.config import load_config, parse_size  # noqa: E402
from raytrain.data.synthetic import write_synthetic_kitti  # noqa: E402
from raytrain.console import QUIET
from raytrain.launch.session import ensure_ray  # noqa: E402
from raytrain.models import create_model  # noqa: E402

MODEL = {"name": "unet", "base_channels": 8, "depth": 4}


def untrained_checkpoint(root: Path) -> Path:
    config = load_config({"data": {"path": str(root), "size": "192x64"}, "model": MODEL})
    model = create_model(MODEL["name"], base_channels=MODEL["base_channels"], depth=MODEL["depth"])
    return save_checkpoint(root / "ckpt", model, torch.optim.Adam(model.parameters()), None, 1, config, {"val_iou": 0.0})


def timed(checkpoint: Path, images: Path, out: Path, workers: int | None) -> dict:
    started, first = time.perf_counter(), {}

    def on_progress(done: int, total: int) -> None:
        first.setdefault("at", (time.perf_counter() - started, done))

    summary = raytrain.predict_folder(checkpoint, images, out, workers=workers, progress=on_progress)
    seconds = time.perf_counter() - started
    result = {"images": summary.written, "seconds": round(seconds, 2), "images_per_s": round(summary.written / seconds, 2)}
    if workers and first and summary.written > first["at"][1]:
        at, done = first["at"]
        result["after_first_batch_images_per_s"] = round((summary.written - done) / (seconds - at), 2)
    return result


def spread(values: list[float]) -> dict:
    return {"median": round(median(values), 2), "min": min(values), "max": max(values), "runs": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--size", default="384x128", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--workers", type=int, default=2, help="model actors of the cluster path")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = scratch_dir("batch-predict")
    images = write_synthetic_kitti(root / "synthetic", args.images, seed=0, size=parse_size(args.size)) / "training" / "image_2"
    checkpoint = untrained_checkpoint(root)
    ensure_ray(args.cpus, verbosity=QUIET)
    runs: dict[str, list[dict]] = {"one_process": [], "cluster": []}
    for repeat in range(args.repeats):
        for path, workers in (("one_process", None), ("cluster", args.workers)):
            runs[path].append(timed(checkpoint, images, root / f"out_{path}_{repeat}", workers))
            log(f"repeat {repeat} {path}: {runs[path][-1]}")
    one, cluster = ([r["images_per_s"] for r in runs[path]] for path in ("one_process", "cluster"))
    emit({
        **header("batch_predict"),
        "settings": {**vars(args), "model": MODEL, "torch_threads_one_process": torch.get_num_threads()},
        "one_process_images_per_s": spread(one),
        "cluster_images_per_s": spread(cluster),
        "cluster_after_first_batch_images_per_s": spread([r.get("after_first_batch_images_per_s", 0.0) for r in runs["cluster"]]),
        "ratio_of_medians_cluster_to_one_process": round(median(cluster) / median(one), 3),
        "runs": runs,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
