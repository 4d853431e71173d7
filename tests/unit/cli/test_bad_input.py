"""The bad-input table: every way a user can hand raytrain something wrong, each a real `raytrain`
process (forked from tests/processes.py's server, or a fresh interpreter where a row needs one) that
must answer with one line `raytrain: error: ...` naming what is wrong, exit code 2,
no traceback, and nothing written.

Each row: the command line ("{tmp}" is the test's tmp_path), a setup that makes the files it needs,
and the fragments its one-line message must contain.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytrain.checkpoints import seal
from tests.helpers import BROKEN_PNGS, C, MEMORY_LIMIT, SHARD, SMALL_ENCODER, assert_one_line_error, big_png, big_png_bytes, broken_png, check_bad_input_row, check_one_line_and_nothing_written, checkpoint, config, encoder_weights, finished_experiment, kitti_folder, kitti_um_and_uu, mask_value_outside_class_map, png_header, run_raytrain, shards, shards_without_val

# ---------------------------------------------------------------- the files a row needs


# Nine levels of nine references: 387 million strings once expanded, from a few hundred bytes.
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


def folder_with_class_map(text: str):
    def setup(tmp: Path) -> None:
        mask_value_outside_class_map(tmp)
        (tmp / "raw/classes.yaml").write_text(text)

    return setup


def text_file(name: str, text: str):
    return lambda tmp: (tmp / name).write_text(text)


def corrupt_image(tmp: Path) -> None:
    image = kitti_folder(tmp) / "training/image_2/um_000001.png"
    image.write_bytes(image.read_bytes()[:100])


def mask_of_other_size(tmp: Path) -> None:
    mask = kitti_folder(tmp) / "training/gt_image_2/um_road_000002.png"
    Image.open(mask).resize((30, 16), Image.NEAREST).save(mask)  # nearest: still KITTI colours


def image_without_mask(tmp: Path) -> None:
    (kitti_folder(tmp) / "training/gt_image_2/um_road_000003.png").unlink()


def kitti_gt_as(change):
    """A KITTI folder whose first road mask is replaced by change(RGB array) -> PIL image."""

    def setup(tmp: Path) -> None:
        gt = kitti_folder(tmp) / "training/gt_image_2/um_road_000000.png"
        change(np.asarray(Image.open(gt).convert("RGB"))).save(gt)

    return setup


def with_colour(rgb: np.ndarray) -> Image.Image:
    rgb = rgb.copy()
    rgb[3, 5] = (0, 255, 0)
    return Image.fromarray(rgb)


def image_16bit(tmp: Path) -> None:
    image = kitti_folder(tmp) / "training/image_2/um_000001.png"
    Image.fromarray(np.full((16, 32), 40000, np.uint16)).save(image)


def same_stem_png_and_jpg(tmp: Path) -> None:
    mask_value_outside_class_map(tmp)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp / "raw/images/0.jpg")


def checkpoint_with(file: str, content: bytes | str):
    """A checkpoint with `file` replaced, and its complete.json rewritten to match, as a hand could."""
    def setup(tmp: Path) -> None:
        path = checkpoint(tmp) / file
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        seal(path.parent)

    return setup


def config_with_line_appended(ckpt: Path, line: str) -> None:
    with open(ckpt / "config.yaml", "a") as config_file:
        config_file.write(f"{line}\n")
    seal(ckpt)


def truncated_weights(tmp: Path) -> None:
    weights = checkpoint(tmp) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:300])
    seal(weights.parent)  # the weights' own check, not complete.json's (test_full_disk.py)


def checkpoint_and_shards(tmp: Path) -> None:
    checkpoint(tmp)
    shards(tmp)


def checkpoint_and_text_as_image(tmp: Path) -> None:
    checkpoint(tmp)
    (tmp / "street.png").write_text("not an image")


def bad_weights_and_an_image(tmp: Path) -> None:
    (checkpoint(tmp) / "model.pt").write_bytes(b"not a state dict")
    seal(tmp / "exp/ckpt")
    Image.fromarray(np.full((16, 32, 3), 90, np.uint8)).save(tmp / "street.png")


def checkpoint_and_two_images_of_one_name(tmp: Path) -> None:
    checkpoint(tmp)
    for folder in ("a", "b"):
        (tmp / folder).mkdir()
        Image.fromarray(np.full((16, 32, 3), 90, np.uint8)).save(tmp / folder / "street.png")


def nothing(tmp: Path) -> None:
    pass


def encoder_weights_as(write, **dotted):
    """A config of SMALL_ENCODER's model with model.encoder_weights {tmp}/w.pt, which write(path) makes."""
    def setup(tmp: Path) -> None:
        write(tmp / "w.pt")
        config(tmp, **{**SMALL_ENCODER, "model.encoder_weights": str(tmp / "w.pt"), **dotted})

    return setup


def saved_encoder(change):
    return lambda path: encoder_weights(path, change=change)


# ---------------------------------------------------------------- the table

TRAIN = ["train", C, "--num-cpus", "4"]  # enough CPUs: the rows below fail on their own fault
CASES = [
    # config files
    pytest.param(["train", "{tmp}/missing.yaml"], nothing, ["{tmp}/missing.yaml", "config file not found"], id="config-missing"),
    pytest.param(["train", C], text_file("c.yaml", "name: [unclosed\n"), ["{tmp}/c.yaml", "not valid YAML"], id="config-not-yaml"),
    pytest.param(["train", C], text_file("c.yaml", "- data\n- model\n"), ["{tmp}/c.yaml", "expected a mapping", "list"], id="config-is-a-list"),
    pytest.param(["train", C], lambda t: config(t, "d", **{"model.nmae": "unet"}), ["{tmp}/c.yaml", "model.nmae: unknown key"], id="config-unknown-key"),
    pytest.param(["train", C], lambda t: config(t, "d", **{"train.epochs": "three"}), ["{tmp}/c.yaml", "train.epochs", "integer"], id="config-wrong-type"),
    pytest.param(["train", C], lambda t: config(t, "d", **{"optim.lr": -0.1}), ["{tmp}/c.yaml", "optim.lr", "greater than 0"], id="config-out-of-range"),
    pytest.param(["train", C], lambda t: config(t, "d", **{"data.size": "64by32"}), ["{tmp}/c.yaml", "data.size", "WIDTHxHEIGHT"], id="config-bad-size"),
    pytest.param(["train", C], lambda t: config(t, "d", **{"optim.lr": float("inf")}), ["{tmp}/c.yaml", "optim.lr", "finite"], id="config-lr-inf"),
    pytest.param(["train", C], lambda t: config(t, "d", **{"train.epochs": True}), ["{tmp}/c.yaml", "train.epochs", "not true"], id="config-epochs-true"),
    pytest.param(
        ["train", C], lambda t: config(t, "d", **{"data.scale": [-1, 0]}), ["{tmp}/c.yaml", "data.scale", "0 < low <= high"], id="config-scale-negative",
    ),
    pytest.param(
        ["train", C], lambda t: config(t, "d", **{"data.blur_sigma": [2, 1]}), ["{tmp}/c.yaml", "data.blur_sigma", "low <= high"], id="config-blur-sigma-reversed",
    ),
    pytest.param(["train", C], lambda t: config(t, "d", **{"data.noise": 2}), ["{tmp}/c.yaml", "data.noise", "less than or equal to 1"], id="config-noise-over-1"),
    pytest.param(
        ["train", C, "--set", "data.size=100"], lambda t: config(t, "d"), ["{tmp}/c.yaml", "data.size", "WIDTHxHEIGHT", "100"], id="set-size-a-number",
    ),
    pytest.param(
        ["train", C, "--set", "data.size=0x64"], lambda t: config(t, "d"), ["{tmp}/c.yaml", "data.size", "hexadecimal"], id="set-size-hexadecimal",
    ),
    pytest.param(TRAIN, lambda t: config(t, **{"model.name": "resnet"}), ["model", "unknown model 'resnet'", "unet"], id="config-unknown-model"),
    pytest.param(TRAIN, lambda t: config(t, **{"loss.name": "focall"}), ["loss", "unknown loss 'focall'", "focal"], id="config-unknown-loss"),
    pytest.param(TRAIN, lambda t: config(t, **{"model.name": "simple"}), ["model 'simple' does not take 'base_channels'"], id="config-model-option"),
    pytest.param(
        ["tune", C], lambda t: config(t, "d", **{"search.space": {"optim.lrr": {"choice": [0.1]}}}),
        ["{tmp}/c.yaml", "search.space", "optim.lrr", "unknown key"], id="search-unknown-key",
    ),
    pytest.param(
        ["tune", C], lambda t: config(t, "d", **{"search.space": {"optim.lr": {"choice": [0.01, -1]}}}),
        ["{tmp}/c.yaml", "search.space.optim.lr", "-1", "greater than 0"], id="search-value-invalid",
    ),
    pytest.param(
        ["tune", C, "--num-cpus", "4"], lambda t: config(t, **{"search.space": {"model.name": {"grid": ["unet", "resnet"]}}}),
        ["search.space model.name='resnet'", "unknown model 'resnet'"], id="search-value-unknown-model",
    ),
    pytest.param(["train", C], text_file("c.yaml", ALIAS_BOMB), ["{tmp}/c.yaml", "line 2", "YAML aliases"], id="config-yaml-alias"),
    pytest.param(
        ["train", C], text_file("c.yaml", "name: a\ntrain:\n  epochs: 1\n  epochs: 3\n"),
        ["{tmp}/c.yaml", "line 4", "duplicate key 'epochs'"], id="config-yaml-duplicate-key",
    ),
    pytest.param(
        ["train", C, "--set", "search.space={{optim.lr: {{grid: [1]}}, optim.lr: {{grid: [2]}}}}"], lambda t: config(t, "d"),
        ["--set", "search.space", "duplicate key 'optim.lr'"], id="set-yaml-duplicate-key",
    ),
    pytest.param(
        ["train", C, "--set", "search.space=[&a [1, 1], [*a, *a]]"], lambda t: config(t, "d"),
        ["--set", "search.space", "YAML aliases"], id="set-yaml-alias",
    ),
    pytest.param(["train", C, "--set", "train.epochs"], lambda t: config(t, "d"), ["--set", "train.epochs", "key=value"], id="set-without-equals"),
    pytest.param(["train", C, "--set", "train.epocs=3"], lambda t: config(t, "d"), ["{tmp}/c.yaml", "train.epocs", "unknown key"], id="set-unknown-key"),
    pytest.param(["train", C, "--set", "train.epochs.max=3"], lambda t: config(t, "d"), ["train.epochs", "not a section"], id="set-into-non-section"),
    pytest.param(TRAIN, lambda t: config(t, t / "nowhere"), ["data.path", "{tmp}/nowhere"], id="data-path-missing"),
    pytest.param(TRAIN, lambda t: config(t, kitti_folder(t)), ["data.path", "{tmp}/raw", "raytrain data shard"], id="data-path-not-sharded"),
    pytest.param(TRAIN, lambda t: config(t, classes=["road", "sky"]), ["classes", "'sky'", "do not match", "{tmp}/shards"], id="classes-not-in-manifest"),
    pytest.param(TRAIN, lambda t: config(t, shards_without_val(t)), ["data.path", "{tmp}/shards", "0 val samples", "--val-fraction"], id="data-without-val-split"),
    pytest.param(
        ["train", C, "--num-cpus", "2"], lambda t: config(t), ["train.num_workers=2", "needs 3 CPUs", "--num-cpus"], id="workers-do-not-fit",
    ),
    pytest.param(["train", C], lambda t: config(t, "d", **{"data.cache": "ram"}), ["{tmp}/c.yaml", "data.cache", "'auto', 'off' or 'memory'"], id="config-cache-unknown"),
    pytest.param(["train", C, "--set", "train.ema=1.5"], lambda t: config(t, "d"), ["{tmp}/c.yaml", "train.ema", "less than 1"], id="config-ema-over-1"),
    pytest.param(
        ["tune", C], lambda t: config(t, "d", **{"search.select": "median"}),
        ["{tmp}/c.yaml", "search.select", "'best', 'last' or 'mean_last'"], id="search-select-unknown",
    ),
    pytest.param(
        ["tune", C, "--set", "search.last_k=0"], lambda t: config(t, "d"), ["{tmp}/c.yaml", "search.last_k", "greater than or equal to 1"],
        id="search-last-k-zero",
    ),
    pytest.param(
        ["tune", C, "--num-cpus", "4"], lambda t: config(t, **{"search.metric": "val_iou@worst"}),
        ["search.metric val_iou@worst", "needs val groups", "data.path {tmp}/shards has no val groups", "--group-by"],
        id="search-worst-group-without-groups",
    ),
    pytest.param(
        ["train", C, "--dry-run", "--set", "data.size=60000x60000"], lambda t: config(t),
        ["data.size 60000x60000", "over the limit of 50000000 pixels", "RAYTRAIN_MAX_PIXELS"], id="train-size-over-pixel-limit",
    ),
    pytest.param(
        ["tune", C, "--dry-run"], lambda t: config(t, **{"search.space": {"data.size": {"grid": ["64x32", "60000x60000"]}}}),
        ["search.space data.size='60000x60000'", "data.size 60000x60000", "RAYTRAIN_MAX_PIXELS"], id="search-size-over-pixel-limit",
    ),
    pytest.param(
        [*TRAIN, "--set", "train.use_gpu=true"], lambda t: config(t), ["train.use_gpu", "needs 2 GPUs", "has 0", "RAY_ADDRESS"],
        id="gpus-asked-none-here", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    pytest.param(
        TRAIN, encoder_weights_as(lambda path: None), ["model.encoder_weights: {tmp}/w.pt", "cannot read the weights", "No such file"],
        id="encoder-weights-missing",
    ),
    pytest.param(
        TRAIN, encoder_weights_as(lambda path: path.write_text("conv1.weight: [0.1, 0.2]\n")),
        ["model.encoder_weights: {tmp}/w.pt", "not a torch.save file"], id="encoder-weights-not-a-torch-file",
    ),
    pytest.param(
        TRAIN, encoder_weights_as(saved_encoder(lambda state: {**state, "hook": os.system})),
        ["model.encoder_weights: {tmp}/w.pt", "refused: not a weights-only file", "posix.system"], id="encoder-weights-pickled-code",
    ),
    pytest.param(
        TRAIN, encoder_weights_as(encoder_weights, **{"model.encoder": "resnet34"}),
        ["model.encoder_weights: {tmp}/w.pt", "not the weights of the encoder", "missing ['layer1.2."], id="encoder-weights-other-architecture",
    ),
    pytest.param(
        TRAIN, encoder_weights_as(saved_encoder(lambda state: {**state, "conv1.weight": torch.zeros(64, 1, 7, 7)})),
        ["model.encoder_weights: {tmp}/w.pt", "conv1.weight is (64, 1, 7, 7)", "the model's is (64, 3, 7, 7)"], id="encoder-weights-other-shape",
    ),
    pytest.param(
        TRAIN, encoder_weights_as(lambda path: os.truncate(encoder_weights(path), 9 * 10**9)),  # sparse: no disk taken
        ["model.encoder_weights: {tmp}/w.pt: 9000000000 bytes, over the weights limit", "RAYTRAIN_MAX_PARAMETERS"],
        id="encoder-weights-over-the-limit",
    ),
    pytest.param(
        TRAIN, lambda t: (encoder_weights(t / "w.pt"), config(t, **{"model.encoder_weights": str(t / "w.pt")})),
        ["model 'unet' does not take 'encoder_weights'"], id="encoder-weights-for-a-model-without-an-encoder",
    ),
    pytest.param(
        ["train", C, "--set", "model.encoder_weights_sha256=abc"], lambda t: config(t, "d", **SMALL_ENCODER),
        ["{tmp}/c.yaml", "model.encoder_weights_sha256", "64 hexadecimal digits", "'abc'"], id="config-encoder-sha256-not-a-digest",
    ),
    # CLI arguments
    pytest.param(["fly"], nothing, ["invalid choice: 'fly'"], id="cli-unknown-command"),
    pytest.param(["best", "{tmp}", "--fast"], nothing, ["unrecognized arguments: --fast"], id="cli-unknown-option"),
    pytest.param(["data", "synth"], nothing, ["required", "--out"], id="cli-missing-argument"),
    pytest.param(["data", "synth", "--out", "{tmp}/synth", "--size", "64by32"], nothing, ["--size", "WIDTHxHEIGHT"], id="cli-bad-size"),
    pytest.param(["data", "synth", "--out", "{tmp}/synth", "--count", "0"], nothing, ["--count", "'0'"], id="cli-count-zero"),
    pytest.param(["data", "shard", "{tmp}", "--format", "pascal", "--out", "{tmp}/out"], nothing, ["--format", "'pascal'"], id="cli-bad-format"),
    pytest.param(["train", C, "--num-cpus", "0"], lambda t: config(t, "d"), ["--num-cpus", "'0'"], id="cli-num-cpus-zero"),
    pytest.param(["best", "{tmp}", "--mode", "up"], nothing, ["--mode", "'up'"], id="cli-bad-mode"),
    pytest.param(["best", "{tmp}", "--select", "median"], nothing, ["--select", "'median'", "mean_last"], id="cli-bad-select"),
    pytest.param(["best", "{tmp}", "--last-k", "0"], nothing, ["--last-k", "'0'"], id="cli-last-k-zero"),
    # data folders
    pytest.param(SHARD, nothing, ["{tmp}/raw", "not found"], id="data-src-missing"),
    pytest.param(
        SHARD, lambda t: (t / "raw").mkdir(),
        ["{tmp}/raw"], id="data-src-empty",
    ),
    pytest.param(
        SHARD, corrupt_image,
        ["{tmp}/raw/training/image_2/um_000001.png", "not a readable image"], id="data-corrupt-image",
    ),
    pytest.param(
        SHARD, mask_of_other_size,
        ["{tmp}/raw/training/gt_image_2/um_road_000002.png", "mask is 30x16 but its image is 32x16"], id="data-mask-size",
    ),
    pytest.param(
        SHARD, image_without_mask,
        ["{tmp}/raw/training/image_2/um_000003.png", "no mask"], id="data-image-without-mask",
    ),
    pytest.param(
        ["data", "shard", "{tmp}/raw", "--format", "folder", "--out", "{tmp}/out"], mask_value_outside_class_map,
        ["{tmp}/raw/masks/1.png", "mask values [7]"], id="data-mask-value-outside-class-map",
    ),
    pytest.param(
        SHARD, kitti_gt_as(lambda rgb: Image.fromarray(rgb).convert("L")),
        ["{tmp}/raw/training/gt_image_2/um_road_000000.png", "mode L", "8-bit RGB"], id="data-kitti-mask-grayscale",
    ),
    pytest.param(
        SHARD, kitti_gt_as(lambda rgb: Image.fromarray(rgb[..., 2].astype(np.uint16) * 257)),
        ["{tmp}/raw/training/gt_image_2/um_road_000000.png", "mode I;16"], id="data-kitti-mask-16bit",
    ),
    pytest.param(
        SHARD, kitti_gt_as(with_colour),
        ["{tmp}/raw/training/gt_image_2/um_road_000000.png", "colour [0, 255, 0] at x=5, y=3", "not a KITTI colour"],
        id="data-kitti-mask-other-colour",
    ),
    pytest.param(SHARD, image_16bit, ["{tmp}/raw/training/image_2/um_000001.png", "mode I;16"], id="data-image-16bit"),
    pytest.param(
        ["data", "shard", "{tmp}/raw", "--format", "folder", "--out", "{tmp}/out"], same_stem_png_and_jpg,
        ["{tmp}/raw/images/0.jpg and {tmp}/raw/images/0.png", "two images of sample '0'"], id="data-same-stem-png-and-jpg",
    ),
    pytest.param([*SHARD, "--val-fraction", "nan"], kitti_folder, ["--val-fraction", "'nan'"], id="cli-val-fraction-nan"),
    pytest.param([*SHARD, "--val-fraction", "-1"], kitti_folder, ["--val-fraction", "'-1'"], id="cli-val-fraction-negative"),
    pytest.param([*SHARD, "--val-fraction", "1"], kitti_folder, ["--val-fraction", "'1'"], id="cli-val-fraction-one"),
    pytest.param([*SHARD, "--val-fraction", "0.01"], kitti_folder, ["0 val samples", "--val-fraction"], id="data-shard-empty-val-split"),
    pytest.param([*SHARD, "--group-by", "("], kitti_um_and_uu, ["--group-by '('", "not a regular expression"], id="group-by-not-a-regex"),
    pytest.param([*SHARD, "--group-by", "^zz"], kitti_um_and_uu, ["--group-by '^zz'", "matches none of the 4 sample ids"], id="group-by-matches-nothing"),
    pytest.param(
        [*SHARD, "--group-by", "^um"], kitti_um_and_uu, ["--group-by '^um'", "does not match sample id 'uu_000002'"],
        id="group-by-misses-an-id",
    ),
    pytest.param([*SHARD, "--group-by", "^[^_]+"], kitti_folder, ["--group-by '^[^_]+'", "one group (um)"], id="group-by-one-group"),
    pytest.param(
        [*SHARD, "--group-by", "^[^_]+", "--val-groups", "uu,umm"], kitti_um_and_uu,
        ["--val-groups 'umm'", "no such group", "um, uu"], id="val-groups-unknown",
    ),
    pytest.param(
        [*SHARD, "--group-by", "^[^_]+", "--val-groups", "uu,um"], kitti_um_and_uu,
        ["--val-groups um,uu", "leaves no training samples"], id="val-groups-every-group",
    ),
    pytest.param(
        [*SHARD, "--group-by", "^[^_]+", "--val-fraction", "0"], kitti_um_and_uu, ["--val-fraction 0 puts no group in val"],
        id="group-by-val-fraction-zero",
    ),
    pytest.param([*SHARD, "--val-groups", "uu"], kitti_um_and_uu, ["--val-groups needs --group-by"], id="val-groups-without-group-by"),
    pytest.param(
        ["data", "shard", "{tmp}/raw", "--format", "folder", "--out", "{tmp}/out"],
        folder_with_class_map("classes: &c [{name: road, index: 1}]\nmore: *c\n"),
        ["{tmp}/raw/classes.yaml", "line 2", "YAML aliases"], id="data-class-map-yaml-alias",
    ),
    pytest.param(
        ["data", "shard", "{tmp}/raw", "--format", "folder", "--out", "{tmp}/out"],
        folder_with_class_map("classes: [{name: road, index: 1}]\nclasses: [{name: sky, index: 1}]\n"),
        ["{tmp}/raw/classes.yaml", "line 2", "duplicate key 'classes'"], id="data-class-map-duplicate-key",
    ),
    # checkpoint and experiment paths
    pytest.param(["best", "{tmp}/exp"], nothing, ["{tmp}/exp", "not found"], id="best-missing-dir"),
    pytest.param(["best", "{tmp}/exp"], lambda t: (t / "exp").mkdir(), ["{tmp}/exp", "no checkpoint"], id="best-no-checkpoints"),
    pytest.param(["best", "{tmp}/exp"], checkpoint_with("metrics.json", "{val_iou: "), ["{tmp}/exp/ckpt/metrics.json", "JSON"], id="best-corrupt-metrics"),
    pytest.param(["best", "{tmp}/exp"], lambda t: checkpoint(t, metrics={"val_f1": 0.5}), ["{tmp}/exp", "'val_iou'"], id="best-metric-missing"),
    pytest.param(["best", "{tmp}/exp", "--metric", "val_ioux"], checkpoint, ["{tmp}/exp", "'val_ioux'"], id="best-unknown-metric"),
    pytest.param(["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"], shards, ["{tmp}/exp/ckpt", "not a raytrain checkpoint"], id="evaluate-missing-checkpoint"),
    pytest.param(
        ["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"], lambda t: (checkpoint_with("config.yaml", "model: [\n")(t), shards(t)),
        ["{tmp}/exp/ckpt/config.yaml", "unreadable"], id="evaluate-corrupt-config",
    ),
    pytest.param(
        ["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"], lambda t: (checkpoint_with("config.yaml", ALIAS_BOMB)(t), shards(t)),
        ["{tmp}/exp/ckpt/config.yaml", "YAML aliases"], id="evaluate-config-yaml-alias",
    ),
    pytest.param(
        ["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"], lambda t: (config_with_line_appended(checkpoint(t), "name: again"), shards(t)),
        ["{tmp}/exp/ckpt/config.yaml", "duplicate key 'name'"], id="evaluate-config-duplicate-key",
    ),
    pytest.param(["evaluate", "{tmp}/exp/ckpt", "{tmp}/nowhere"], checkpoint, ["{tmp}/nowhere"], id="evaluate-data-not-sharded"),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/street.png", "--out", "{tmp}/out"], checkpoint_and_text_as_image,
        ["{tmp}/street.png"], id="predict-input-not-an-image",
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/nothing.png", "--out", "{tmp}/out"], checkpoint,
        ["{tmp}/nothing.png", "no such file"], id="predict-input-missing",
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/street.png", "--out", "{tmp}/out"], bad_weights_and_an_image,
        ["{tmp}/exp/ckpt/model.pt", "cannot load"], id="predict-weights-not-a-state-dict",
    ),
    pytest.param(["serve", "{tmp}/exp"], bad_weights_and_an_image, ["{tmp}/exp/ckpt/model.pt", "cannot load"], id="serve-weights-not-a-state-dict"),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/out", "--workers", "2"],
        checkpoint_and_two_images_of_one_name, ["{tmp}/a/street.png", "{tmp}/b/street.png", "share a file name"],
        id="predict-workers-two-inputs-of-one-name",  # checked before Ray starts or anything is written
    ),
    pytest.param(["export", "{tmp}/exp/ckpt"], nothing, ["{tmp}/exp/ckpt", "not a raytrain checkpoint"], id="export-missing-checkpoint"),
    pytest.param(["export", "{tmp}/exp/ckpt", "--out", "{tmp}/m.pt"], truncated_weights, ["{tmp}/exp/ckpt/model.pt", "cannot load"], id="export-truncated-weights"),
    pytest.param(["export", "{tmp}/exp/ckpt", "--tta", "mirror"], checkpoint, ["--tta", "'mirror'", "flip"], id="export-unknown-tta"),
    pytest.param(["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards", "--tta", "mirror"], checkpoint, ["--tta", "'mirror'"], id="evaluate-unknown-tta"),
    pytest.param(["serve", "{tmp}/exp", "--tta", "mirror"], checkpoint, ["--tta", "'mirror'"], id="serve-unknown-tta"),
    pytest.param(["serve", "{tmp}/exp", "--body-timeout-s", "0"], checkpoint, ["--body-timeout-s", "a number above 0", "'0'"], id="serve-no-body-time"),
    # config names and experiments to resume
    pytest.param(
        ["tune", C, "--num-cpus", "3"], lambda t: config(t), ["train.num_workers=2", "needs 4 CPUs", "a share for the trial"],
        id="search-workers-do-not-fit",
    ),
    pytest.param(
        ["tune", "quickstart", "--set", "train.epochs=1"], nothing,
        ["search.scheduler.grace_period 2 is more than train.epochs 1"], id="config-grace-period-over-epochs",
    ),
    pytest.param(
        ["quickstart", "--data-dir", "{tmp}/data", "--set", "train.epochs=1"], nothing,
        ["search.scheduler.grace_period 2 is more than train.epochs 1"], id="quickstart-bad-set-before-the-data-is-made",
    ),
    pytest.param(["train", "nosuchconfig"], nothing, ["nosuchconfig", "config file not found", "quickstart"], id="config-unknown-name"),
    pytest.param(["config", "show", "nosuchconfig"], nothing, ["nosuchconfig", "config file not found"], id="config-show-unknown-name"),
    pytest.param(["tune", C, "--resume"], lambda t: config(t), ["--resume", "no tune experiment named 'bad'"], id="resume-nothing-to-resume"),
    pytest.param(
        ["train", C, "--resume", "{tmp}/exp"], lambda t: (config(t), (t / "exp").mkdir()),
        ["--resume {tmp}/exp", "not a raytrain experiment"], id="resume-not-an-experiment",
    ),
    pytest.param(["train", C, "--resume"], finished_experiment, ["--resume", "finished", "nothing to resume"], id="resume-finished-run"),
    pytest.param(["tune", C, "--resume"], finished_experiment, ["--resume", "no tune experiment named 'bad'"], id="resume-train-as-tune"),
    pytest.param(["runs", "{tmp}/nowhere"], nothing, ["{tmp}/nowhere", "not found"], id="runs-storage-missing"),
]


@pytest.mark.parametrize("args, setup, fragments", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(request, tmp_path, args, setup, fragments):
    check_bad_input_row(request, tmp_path, args, setup, fragments)


def test_a_memory_cache_over_the_object_store_budget_is_one_line(tmp_path, monkeypatch):
    """16 samples at 30000x30000 are more than any object store holds; the pixel limit, which
    would refuse that size first, is raised for it."""
    monkeypatch.setenv("RAYTRAIN_MAX_PIXELS", str(30000 * 30000))
    check_one_line_and_nothing_written(
        tmp_path, [*TRAIN, "--set", "data.cache=memory", "--set", "data.size=30000x30000"], lambda t: config(t),
        ["data.cache memory", "{tmp}/shards", "GiB decoded, over the budget", "object store", "data.cache=auto"],
    )


# A sample of rows, one per kind of input, that a fresh `python -m raytrain.cli` must answer exactly as the
# forked one does: what only a fresh interpreter shows (a warning printed at import, state the server holds)
# would differ here.
FRESH_SAMPLE = ["config-unknown-key", "data-corrupt-image", "best-corrupt-metrics", "predict-input-not-an-image"]


@pytest.mark.parametrize("args, setup, fragments", [case for case in CASES if case.id in FRESH_SAMPLE])
def test_a_fresh_interpreter_answers_as_the_forked_cli(tmp_path, args, setup, fragments):
    setup(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    forked, fresh = run_raytrain(args, tmp_path), run_raytrain(args, tmp_path, fresh=True)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (forked.returncode, forked.stdout, forked.stderr)
    assert_one_line_error(fresh, fragments, tmp_path)


# ---------------------------------------------------------------- decompression bombs


def big_kitti_sample(tmp: Path) -> None:
    """A 12000x12000 image with its mask: before the limit, `data shard` took 3 GB on them and exit 0."""
    root = kitti_folder(tmp) / "training"
    big_png(root / "image_2/um_000001.png")
    big_png(root / "gt_image_2/um_road_000001.png")  # all outside the valid area: legal, and the same bytes


def street(make):
    def setup(tmp: Path) -> None:
        checkpoint(tmp)
        make(tmp / "street.png")

    return setup


BOMBS = [
    pytest.param(
        SHARD, big_kitti_sample,
        ["{tmp}/raw/training/image_2/um_000001.png", "12000x12000", "RAYTRAIN_MAX_PIXELS"], id="shard-image-144-megapixels",
    ),
    pytest.param(
        SHARD, lambda t: big_png(kitti_folder(t) / "training/gt_image_2/um_road_000000.png"),
        ["{tmp}/raw/training/gt_image_2/um_road_000000.png", "12000x12000", "RAYTRAIN_MAX_PIXELS"], id="shard-mask-144-megapixels",
    ),
    pytest.param(
        SHARD, lambda t: png_header(kitti_folder(t) / "training/image_2/um_000002.png", 100000, 100000),
        ["{tmp}/raw/training/image_2/um_000002.png", "10000000000 pixels", "RAYTRAIN_MAX_PIXELS"], id="shard-header-100000x100000",
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/street.png", "--out", "{tmp}/out"], street(big_png),
        ["{tmp}/street.png", "12000x12000", "RAYTRAIN_MAX_PIXELS"], id="predict-144-megapixels",
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/street.png", "--out", "{tmp}/out"], street(lambda p: png_header(p, 100000, 100000)),
        ["{tmp}/street.png", "10000000000 pixels", "RAYTRAIN_MAX_PIXELS"], id="predict-header-100000x100000",
    ),
]


@pytest.mark.parametrize("args, setup, fragments", BOMBS)
def test_decompression_bomb_is_refused_from_its_header(tmp_path, args, setup, fragments):
    """An image past the pixel limit is a one-line error before it is decoded, within MEMORY_LIMIT
    (the old code took 2.6 GB to decode a 420 KB 12000x12000 PNG)."""
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments, memory_limit=MEMORY_LIMIT)


def val_shard_images(image: bytes):
    """A checkpoint and shards whose val shard, rewritten by hand, holds `image` as every row's image."""

    def setup(tmp: Path) -> None:
        checkpoint(tmp)
        path = shards(tmp) / "val-00000.parquet"
        table = pq.read_table(path)
        column = table.schema.get_field_index("image")
        pq.write_table(table.set_column(column, "image", pa.array([image] * table.num_rows, pa.binary())), path)

    return setup


EVALUATE = ["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"]
SHARD_BOMBS = [
    pytest.param(
        EVALUATE, lambda t: val_shard_images(big_png_bytes())(t),
        ["{tmp}/shards/val-00000.parquet", "sample '", "image is 12000x12000", "RAYTRAIN_MAX_PIXELS"], id="evaluate-shard-image-144-megapixels",
    ),
]


@pytest.mark.parametrize("args, setup, fragments", SHARD_BOMBS)
def test_a_bomb_inside_a_shard_is_refused_from_its_header(tmp_path, args, setup, fragments):
    """Shards are data from elsewhere too: their bytes decode through the same checked decoder."""
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments, memory_limit=MEMORY_LIMIT)


# ---------------------------------------------------------------- what else Pillow raises

PREDICT = ["predict", "{tmp}/exp/ckpt", "{tmp}/street.png", "--out", "{tmp}/out"]
PILLOW_ERRORS = [
    *[pytest.param(PREDICT, street(lambda p, d=damage: p.write_bytes(broken_png(d))), ["{tmp}/street.png", "not a readable image"],
                   id=f"predict-png-{damage}") for damage in BROKEN_PNGS],
    pytest.param(
        EVALUATE, val_shard_images(broken_png("junk-chunk")), ["{tmp}/shards/val-00000.parquet", "sample '", "not a readable image"],
        id="evaluate-shard-png-junk-chunk",
    ),
]


@pytest.mark.parametrize("args, setup, fragments", PILLOW_ERRORS)
def test_every_pillow_error_is_the_same_one_line(tmp_path, args, setup, fragments):
    """Pillow raises ValueError and SyntaxError too, not only OSError: each is a damaged image."""
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments)
