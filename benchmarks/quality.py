"""Model quality within a stated CPU budget: the quickstart's synthetic val IoU, and CamVid val
road IoU (binary) and 11-class mIoU.

    python benchmarks/quality.py [--camvid-size 160x120] [--camvid-epochs 10] [--skip-quickstart]

Every run is a plain `raytrain train` of the quickstart settings (tune_configs/quickstart.yaml: the
lab's U-Net with batch norm, Adam lr 3e-3, batch 4, 2 DDP workers of 1 CPU) without the search:
- quickstart: its 400 synthetic scenes 192x64 (seed 0), its 8 epochs;
- CamVid (SegNet's 11-class version, /work/shared/datasets/camvid or RAYTRAIN_CAMVID; skipped when
  absent): its own train (367) / val (101) split, resized to --camvid-size, --camvid-epochs epochs,
  once with road as the one class (binary road IoU) and once with all 11 classes (mean IoU over
  the classes present, void ignored). Loss: bce (binary), cross-entropy (11 classes).
Reported: the val IoU of the best epoch and of the last, the epoch count and the wall time of each
run (the budget), on this machine. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import NOISE_NOTE, camvid_root, emit, header, log, scratch_dir, synthetic_shards, timed_fit

from raytrain import launch
from raytrain.config import load_config, parse_size
from raytrain.data.formats import CAMVID_CLASSES
from raytrain.data.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2


def train_and_score(config, scratch: Path, name: str) -> dict:
    log(f"{name}: {config.train.epochs} epochs at {config.data.size[0]}x{config.data.size[1]} ...")
    run = timed_fit(config, scratch / "reports.jsonl", name=name)
    scores = [report["val_iou"] for report in run["reports"]]
    best = max(range(len(scores)), key=scores.__getitem__)
    result = {
        "classes": len(config.classes),
        "size": f"{config.data.size[0]}x{config.data.size[1]}",
        "epochs": len(scores),
        "best_val_iou": round(scores[best], 4),
        "best_epoch": best + 1,
        "last_val_iou": round(scores[-1], 4),
        "val_iou_per_epoch": [round(s, 4) for s in scores],
        "wall_s": round(run["total_s"], 1),
    }
    if len(config.classes) == 1:
        result["best_val_f1"] = round(run["reports"][best]["val_f1"], 4)
    else:
        result["best_val_iou_per_class"] = {
            name: (round(v, 4) if v is not None else None)
            for name in config.classes for v in [run["reports"][best].get(f"val_iou_{name}")]
        }
    log(f"  best val IoU {result['best_val_iou']} (epoch {best + 1}) in {result['wall_s']}s")
    return result


def quickstart_config(shards: Path, storage: Path, **overrides):
    return load_config(REPO / "tune_configs/quickstart.yaml", {
        "data.path": str(shards), "train.num_workers": WORKERS, "train.storage_path": str(storage),
        "train.max_failures": 0, **overrides,
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid-size", default="160x120", help="WIDTHxHEIGHT for CamVid (its images are 480x360)")
    parser.add_argument("--camvid-epochs", type=int, default=10)
    parser.add_argument("--skip-quickstart", action="store_true")
    args = parser.parse_args()
    camvid_size = parse_size(args.camvid_size)

    scratch = scratch_dir("quality")
    storage = scratch / "ray_results"
    launch.ensure_ray(WORKERS + 1)  # one CPU per worker, one for Ray Data
    results = {}
    if not args.skip_quickstart:
        log("making the quickstart data ...")
        shards = synthetic_shards(scratch / "quickstart")
        results["quickstart"] = train_and_score(quickstart_config(shards, storage), scratch, "quickstart")

    camvid = camvid_root()
    if camvid is None:
        results["camvid"] = {"skipped": "no CamVid folder (set RAYTRAIN_CAMVID or place it at ../shared/datasets/camvid)"}
    else:
        for name, classes, loss in (("camvid_road", ["road"], "bce"), ("camvid_11", list(CAMVID_CLASSES), "ce")):
            log(f"sharding CamVid for {name} ...")
            shards = scratch / name
            write_shards(camvid, "camvid", shards, classes=classes)
            config = quickstart_config(shards, storage, **{
                "classes": classes, "loss.name": loss, "data.size": list(camvid_size),
                "train.epochs": args.camvid_epochs,
            })
            results[name] = train_and_score(config, scratch, name)

    emit({
        **header("quality"),
        "setup": {
            "model": "quickstart unet (batch norm), Adam lr 3e-3, batch 4", "workers": WORKERS, "cpus_per_worker": 1,
            "ray_cpus": WORKERS + 1, "metric": "val_iou: binary road IoU; for 11 classes the mean IoU over present classes",
        },
        **results,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
