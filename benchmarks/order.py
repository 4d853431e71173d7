"""What keeping Ray Data's block order costs a training run (controller.SplitData sets preserve_order,
which makes runs with the same seed repeatable).

    python benchmarks/order.py [--repeats 2] [--epochs 4]

A 2-worker `raytrain train quickstart` run on the quickstart's data, alternately with and without
preserve_order; the figure is each run's last-epoch images/s. Prints one JSON object.
"""
from __future__ import annotations

import argparse
from statistics import median

from common import NOISE_NOTE, emit, header, log, scratch_dir, synthetic_shards

import raytrain
from raytrain.launch import controller


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    scratch = scratch_dir("order")
    shards = synthetic_shards(scratch)
    figures = {"preserve_order": [], "any_order": []}
    for repeat in range(args.repeats):
        for preserve in (True, False):
            controller.SplitData.preserve_order = preserve
            result = raytrain.train("quickstart", {
                "data.path": str(shards), "train.storage_path": str(scratch / "results"), "train.epochs": args.epochs})
            images_per_s = float(result.metrics["images_per_s"])
            figures["preserve_order" if preserve else "any_order"].append(round(images_per_s, 1))
            log(f"repeat {repeat}, preserve_order={preserve}: {images_per_s:.1f} images/s")
    emit({
        **header("order"),
        "command": "python benchmarks/order.py " + f"--repeats {args.repeats} --epochs {args.epochs}",
        "last_epoch_images_per_s": figures,
        "ratio_of_medians": round(median(figures["preserve_order"]) / median(figures["any_order"]), 3),
        "note": NOISE_NOTE,
    })


if __name__ == "__main__":
    main()
