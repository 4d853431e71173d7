"""What drawing overlays with torchvision costs against the plain-numpy painter raytrain had before.

    python benchmarks/overlay.py [--repeats 15]

raytrain.viz draws with torchvision (draw_segmentation_masks, make_grid); `numpy_overlay` below is
the numpy painter it replaced (same pixels, up to rounding of the multi-class blend). Timed, one
torch thread, alternating numpy and torchvision, medians in ms:
- a full-size prediction overlay, 1248x384 (what `raytrain predict` writes per image);
- an overlay grid of 4 images at 384x128 (what rank 0 logs to TensorBoard each epoch);
each for binary road and for CamVid's 11 classes. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import NOISE_NOTE, emit, header, log

import numpy as np
import torch

from raytrain import viz
from raytrain.data.formats import CAMVID_CLASSES


def numpy_paint(image: np.ndarray, labels: np.ndarray, classes) -> np.ndarray:
    """The painter before torchvision: binary label 1 pure red, else each class blended with its colour."""
    out = image.copy()
    if len(classes) == 1:
        out[labels == 1] = viz.ROAD_RGB
        return out
    known = labels < len(classes)
    colours = viz.palette(classes).astype(np.float32)
    blended = (1 - viz.BLEND) * image[known].astype(np.float32) + viz.BLEND * colours[labels[known]]
    out[known] = np.round(blended).astype(np.uint8)
    return out


def numpy_overlay(image: np.ndarray, probabilities: np.ndarray, classes) -> np.ndarray:
    labels = (probabilities[0] > 0.5).astype(np.uint8) if len(classes) == 1 else probabilities.argmax(0)
    return numpy_paint(image, labels, classes)


def numpy_grid(images, masks, probabilities, classes) -> np.ndarray:
    rows = []
    for image, mask, probs in zip(images, masks, probabilities):
        gap = np.full((image.shape[0], viz.GRID_GAP, 3), 255, dtype=np.uint8)
        truth = numpy_paint(image, mask.astype(np.int64), classes)
        rows.append(np.concatenate([numpy_overlay(image, probs, classes), gap, truth], 1))
    gap = np.full((viz.GRID_GAP, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1], 0)


def timed_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


def cases(rng) -> dict:
    out = {}
    for label, classes in (("binary", ["road"]), ("camvid11", list(CAMVID_CLASSES))):
        image = rng.integers(0, 256, (384, 1248, 3), dtype=np.uint8)
        probs = rng.random((len(classes), 384, 1248)).astype(np.float32)
        out[f"{label}_overlay_1248x384"] = (
            lambda i=image, p=probs, c=classes: numpy_overlay(i, p, c),
            lambda i=image, p=probs, c=classes: viz.overlay(i, p, c),
        )
        images = rng.integers(0, 256, (4, 128, 384, 3), dtype=np.uint8)
        masks = rng.integers(0, len(classes) + 1, (4, 128, 384)).astype(np.uint8)
        probs4 = rng.random((4, len(classes), 128, 384)).astype(np.float32)
        out[f"{label}_grid_4x384x128"] = (
            lambda i=images, m=masks, p=probs4, c=classes: numpy_grid(i, m, p, c),
            lambda i=images, m=masks, p=probs4, c=classes: viz.overlay_grid(i, m, p, c),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, (numpy_fn, torchvision_fn) in cases(np.random.default_rng(0)).items():
        numpy_ms, torchvision_ms = [], []
        for _ in range(args.repeats):  # alternating, so both see the same load
            numpy_ms += timed_ms(numpy_fn, 1)
            torchvision_ms += timed_ms(torchvision_fn, 1)
        medians = statistics.median(numpy_ms), statistics.median(torchvision_ms)
        results[name] = {"numpy_ms": round(medians[0], 1), "torchvision_ms": round(medians[1], 1),
                         "ratio": round(medians[1] / medians[0], 2)}
        log(name, results[name])
    emit({**header("overlay"), "median_ms": results, "note": NOISE_NOTE})


if __name__ == "__main__":
    main()
