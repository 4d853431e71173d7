"""A trained checkpoint at work through the CLI: evaluate, predict, export (real subprocesses)."""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import raytrain
from raytrain.data.manifest import read_manifest
from tests.helpers import run_cli


def cli(*args, timeout=300):
    return run_cli(args, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run[1].checkpoint.path


def test_evaluate_gives_every_metric_and_the_reported_val_iou(trained_run, checkpoint):
    shards = trained_run[0].data.path
    run = cli("evaluate", checkpoint, shards, "--json")
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout)
    val_rows = sum(pq.read_metadata(path).num_rows for path in read_manifest(shards).shard_paths("val"))
    assert metrics["split"] == "val" and metrics["samples"] == val_rows > 0
    for key in ("accuracy", "precision", "recall", "f1", "iou", "maxf", "ap", "iou_road"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # The tiny shards are stored at the training size, so the original-size score is the reported one,
    # for every group of the grouped shards as well.
    reported = {key.removeprefix("val_"): value for key, value in trained_run[1].metrics.items() if key.startswith("val_")}
    grouped = {key for key in reported if "@" in key}
    assert grouped and {key for key in metrics if "@" in key} == grouped
    for key in ("iou", *grouped):
        assert metrics[key] == pytest.approx(reported[key], abs=1e-6), key


def test_predict_writes_masks_and_red_overlays_at_each_images_size(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"wide": (40, 90), "tall": (70, 50)}
    for name, (height, width) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(inputs / f"{name}.png")

    run = cli("predict", checkpoint, inputs / "wide.png", inputs / "tall.png", "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr

    model = raytrain.load_model(checkpoint)
    for name, (height, width) in sizes.items():
        image = np.asarray(Image.open(inputs / f"{name}.png").convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        overlay = np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png").convert("RGB"))
        assert mask.shape == (height, width) and overlay.shape == (height, width, 3)
        expected = raytrain.predict(model, [image], masks=True)[0]
        np.testing.assert_array_equal(mask, expected)
        red = np.all(overlay == (255, 0, 0), axis=-1)
        np.testing.assert_array_equal(red & (mask == 1), mask == 1)  # every predicted road pixel is red
        np.testing.assert_array_equal(overlay[mask == 0], image[mask == 0])  # the rest is the image
    record = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert record["model_sha256"] == hashlib.sha256((Path(checkpoint) / "model.pt").read_bytes()).hexdigest()
    assert record["tta"] == "none"
    again = cli("predict", checkpoint, inputs / "wide.png", inputs / "tall.png", "--out", tmp_path / "out")
    assert again.returncode == 0, again.stderr  # the same model into the same folder: fine


def test_predict_checks_every_input_before_writing(checkpoint, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(good)
    bad.write_bytes(b"not a png")
    run = cli("predict", checkpoint, good, bad, "--out", tmp_path / "out")
    assert run.returncode == 2
    assert run.stderr.strip() == f"raytrain: error: {bad}: not a readable image (UnidentifiedImageError)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("format,suffix", [("torchscript", "ts"), ("torch.export", "pt2")])
def test_export_runs_without_raytrain_and_matches_the_model(checkpoint, tmp_path, format, suffix):
    out = tmp_path / f"model.{suffix}"
    run = cli("export", checkpoint, "--format", format, "--out", out)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(out) if format == "torchscript" else torch.export.load(out).module()
    model = raytrain.load_model(checkpoint)
    images = np.random.default_rng(0).integers(0, 256, (3, 45, 70, 3), dtype=np.uint8)  # uint8, at any size
    with torch.no_grad():
        probabilities = exported(torch.from_numpy(images))
    torch.testing.assert_close(probabilities[:, 0], torch.from_numpy(np.stack(raytrain.predict(model, list(images)))))
