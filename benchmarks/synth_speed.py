"""Speed of the synthetic KITTI generator on one core, PNG writing included.

    python benchmarks/synth_speed.py [--images 200] [--size 384x128]

Prints one JSON object; the goal is 50 images/s at 384x128.
"""
from __future__ import annotations

import os

# One core: pin the process and keep BLAS/OpenMP from spawning threads (before numpy is imported).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from raytrain.data.synthetic import write_synthetic_kitti  # noqa: E402

GOAL_IMAGES_PER_S = 50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="384x128", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_kitti(Path(tmp) / "warmup", 2, seed=1, size=(width, height))
        start = time.perf_counter()
        write_synthetic_kitti(Path(tmp) / "kitti", args.images, seed=0, size=(width, height))
        seconds = time.perf_counter() - start

    rate = args.images / seconds
    print(json.dumps({
        "benchmark": "synth",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpus_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "versions": {"numpy": np.__version__, "pillow": PIL.__version__},
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "size": f"{width}x{height}",
        "images": args.images,
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 1),
        "goal_images_per_s": GOAL_IMAGES_PER_S,
    }))
    return 0 if rate >= GOAL_IMAGES_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
