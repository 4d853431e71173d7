"""Untrusted files: what a dataset folder, a config or a manifest can really hold (broken links,
link loops, folders named like images, unreadable files, names that are not UTF-8, binary text,
paths that lead out of the dataset, FIFOs, links to devices, sparse files of gigabytes), and runs
that are killed. Each bad-input row is a real `raytrain` subprocess that must answer with one line,
exit code 2, and nothing written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from raytrain.checkpoints import seal
from tests.helpers import (
    C,
    MEMORY_LIMIT,
    NEEDS_PERMISSIONS,
    SHARD,
    check_one_line_and_nothing_written,
    run_raytrain,
    sparse_tail,
    needs_a_fresh_interpreter,
    checkpoint,
    config,
    finished_experiment,
    kitti_folder,
    mask_value_outside_class_map,
    shards,
)


IMAGES, MASKS = "raw/training/image_2", "raw/training/gt_image_2"
FOLDER_SHARD = ["data", "shard", "{tmp}/raw", "--format", "folder", "--out", "{tmp}/out"]
CAMVID_SHARD = ["data", "shard", "{tmp}/raw", "--format", "camvid", "--out", "{tmp}/out", "--val-fraction", "0"]
RANDOM_BYTES = np.random.default_rng(0).bytes(300)
UTF16 = "name: bad\n".encode("utf-16")


def kitti_plus(image: str, make_image, mask: str | None = None):
    """The KITTI folder with one more sample: make_image(path) makes its image, its mask is a copy."""

    def setup(tmp: Path) -> None:
        kitti_folder(tmp)
        if mask is not None:
            shutil.copy(tmp / MASKS / "um_road_000000.png", tmp / MASKS / mask)
        make_image(tmp / IMAGES / image)

    return setup


def kitti_mask_as(make_mask):
    def setup(tmp: Path) -> None:
        (kitti_folder(tmp) / "training/gt_image_2/um_road_000001.png").unlink()
        make_mask(tmp / MASKS / "um_road_000001.png")

    return setup


def non_utf8_name(tmp: Path) -> None:
    kitti_folder(tmp)
    for folder, old, new in [(IMAGES, b"um_000001.png", b"um_\xff00001.png"), (MASKS, b"um_road_000001.png", b"um_road_\xff00001.png")]:
        base = os.fsencode(tmp / folder)
        os.rename(base + b"/" + old, base + b"/" + new)


def checkpoint_and_image_named_not_utf8(tmp: Path) -> None:
    checkpoint(tmp)
    (tmp / "in").mkdir()
    Image.fromarray(np.full((16, 32, 3), 90, np.uint8)).save(os.fsencode(tmp / "in") + b"/street_\xff.png", format="PNG")


def newline_in_name(tmp: Path) -> None:
    (kitti_folder(tmp) / "training/image_2/um_000001.png").rename(tmp / IMAGES / "um_0\n0001.png")


def folder_with(change):
    def setup(tmp: Path) -> None:
        mask_value_outside_class_map(tmp)
        Image.fromarray(np.full((8, 8), 1, np.uint8)).save(tmp / "raw/masks/1.png")  # a valid dataset
        change(tmp / "raw")

    return setup


def camvid_with_dangling_link(tmp: Path) -> None:
    for split in ("train", "trainannot"):
        (tmp / "raw" / split).mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp / "raw/train/a.png")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(tmp / "raw/trainannot/a.png")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(tmp / "raw/trainannot/b.png")
    (tmp / "raw/train/b.png").symlink_to(tmp / "gone.png")


def unreadable(relative: str):
    def setup(tmp: Path) -> None:
        kitti_folder(tmp)
        (tmp / relative).chmod(0)

    return setup


def read_only_parent(tmp: Path) -> None:
    kitti_folder(tmp)
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def locked_parent(tmp: Path) -> None:
    kitti_folder(tmp)
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0)


def file_as_parent(tmp: Path) -> None:
    kitti_folder(tmp)
    (tmp / "f").write_text("a file, not a folder")


def config_bytes(content: bytes):
    return lambda tmp: (tmp / "c.yaml").write_bytes(content)


def unreadable_config(tmp: Path) -> None:
    config(tmp, "d")
    (tmp / "c.yaml").chmod(0)


def experiment_config_bytes(content: bytes):
    def setup(tmp: Path) -> None:
        finished_experiment(tmp)
        [saved] = tmp.glob("results/bad/*/config.yaml")
        saved.write_bytes(content)

    return setup


def checkpoint_and_manifest(change):
    """A checkpoint, shards, and other shards beside them; change(manifest, tmp) edits the manifest."""

    def setup(tmp: Path) -> None:
        checkpoint(tmp)
        shards(tmp)
        shutil.copytree(tmp / "shards", tmp / "other")
        path = tmp / "shards/manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest, tmp)
        path.write_text(json.dumps(manifest))

    return setup


def val_files(names):
    return checkpoint_and_manifest(lambda manifest, tmp: manifest["files"].update(val=[n.format(tmp=tmp) for n in names]))


def shard_linked_outside(manifest: dict, tmp: Path) -> None:
    (tmp / "shards/outside.parquet").symlink_to(tmp / "other" / manifest["files"]["val"][0])
    manifest["files"]["val"] = ["outside.parquet"]


def manifest_bytes(content: bytes):
    def setup(tmp: Path) -> None:
        checkpoint(tmp)
        shards(tmp)
        (tmp / "shards/manifest.json").write_bytes(content)

    return setup


EVALUATE = ["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"]


CASES = [
    # dataset folders
    pytest.param(
        SHARD, kitti_plus("um_000009.png", lambda p: p.symlink_to(p.parent / "gone.png"), "um_road_000009.png"),
        [f"{{tmp}}/{IMAGES}/um_000009.png", "broken symbolic link", "gone.png"], id="shard-image-broken-link",
    ),
    pytest.param(
        SHARD, kitti_plus("um_000009.png", lambda p: p.symlink_to(p), "um_road_000009.png"),
        [f"{{tmp}}/{IMAGES}/um_000009.png", "symbolic link loop"], id="shard-image-link-loop",
    ),
    pytest.param(
        SHARD, kitti_plus("um_000009.png", Path.mkdir, "um_road_000009.png"),
        [f"{{tmp}}/{IMAGES}/um_000009.png", "a folder, not a file"], id="shard-folder-named-like-image",
    ),
    pytest.param(
        SHARD, kitti_mask_as(lambda p: p.symlink_to(p.parent / "gone.png")),
        [f"{{tmp}}/{MASKS}/um_road_000001.png", "cannot read the mask", "broken symbolic link"], id="shard-mask-broken-link",
    ),
    pytest.param(
        SHARD, kitti_mask_as(Path.mkdir), [f"{{tmp}}/{MASKS}/um_road_000001.png", "a folder, not a file"], id="shard-folder-named-like-mask",
    ),
    pytest.param(
        FOLDER_SHARD, folder_with(lambda root: (root / "images/2.png").mkdir()),
        ["{tmp}/raw/images/2.png"], id="shard-folder-format-folder-named-like-image",
    ),
    pytest.param(
        CAMVID_SHARD, camvid_with_dangling_link, ["{tmp}/raw/train/b.png", "broken symbolic link"], id="shard-camvid-image-broken-link",
    ),
    pytest.param(
        SHARD, non_utf8_name, [f"{{tmp}}/{IMAGES}/um_\\xff00001.png", "not valid UTF-8"], id="shard-name-not-utf8",
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/in", "--out", "{tmp}/out"], checkpoint_and_image_named_not_utf8,
        ["{tmp}/in/street_\\xff.png", "not valid UTF-8"], id="predict-input-name-not-utf8",
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", "{tmp}/in", "--out", "{tmp}/out", "--workers", "1"], checkpoint_and_image_named_not_utf8,
        ["{tmp}/in/street_\\xff.png", "not valid UTF-8"], id="predict-workers-input-name-not-utf8",  # before Ray starts
    ),
    pytest.param(
        ["predict", "{tmp}/exp/ckpt", os.fsdecode(b"{tmp}/in/street_\xff.png"), "--out", "{tmp}/out"], checkpoint_and_image_named_not_utf8,
        ["{tmp}/in/street_\\xff.png", "not valid UTF-8"], id="predict-input-file-name-not-utf8",
    ),
    pytest.param(SHARD, newline_in_name, [f"{{tmp}}/{IMAGES}/um_0\\n0001.png", "no mask"], id="shard-newline-in-name"),
    pytest.param(
        [*SHARD[:-1], "{tmp}/f/out"], file_as_parent, ["{tmp}/f/out", "cannot create the output folder", "{tmp}/f is a file"],
        id="shard-out-under-a-file",
    ),
    pytest.param(
        ["data", "synth", "--out", "{tmp}/f/out", "--count", "2"], file_as_parent,
        ["{tmp}/f/out", "cannot create the output folder", "{tmp}/f is a file"], id="synth-out-under-a-file",
    ),
    pytest.param(
        FOLDER_SHARD, folder_with(lambda root: (root / "classes.yaml").write_bytes(RANDOM_BYTES)),
        ["{tmp}/raw/classes.yaml", "not UTF-8"], id="shard-class-map-binary",
    ),
    pytest.param(
        FOLDER_SHARD, folder_with(lambda root: (root / "classes.yaml").write_bytes(UTF16)),
        ["{tmp}/raw/classes.yaml", "UTF-16"], id="shard-class-map-utf16",
    ),
    # config files
    pytest.param(["train", C], config_bytes(RANDOM_BYTES), ["{tmp}/c.yaml", "not UTF-8"], id="train-config-binary"),
    pytest.param(["tune", C], config_bytes(UTF16), ["{tmp}/c.yaml", "UTF-16"], id="tune-config-utf16"),
    pytest.param(["config", "show", C], config_bytes(RANDOM_BYTES), ["{tmp}/c.yaml", "not UTF-8"], id="config-show-binary"),
    pytest.param(
        ["config", "show", C, "--set", "data.size=100"], lambda t: config(t, "d"), ["data.size", "WIDTHxHEIGHT", "100"], id="config-show-size-a-number",
    ),
    pytest.param(
        ["config", "show", C, "--set", "data.size=0x64"], lambda t: config(t, "d"), ["data.size", "hexadecimal"], id="config-show-size-hexadecimal",
    ),
    pytest.param(
        ["train", C, "--resume"], experiment_config_bytes(RANDOM_BYTES), ["{tmp}/results/bad/", "config.yaml", "unreadable"],
        id="resume-experiment-config-binary",
    ),
    # manifests of sharded datasets
    pytest.param(
        EVALUATE, val_files(["{tmp}/other/val-00000.parquet"]),
        ["{tmp}/shards/manifest.json", "files.val", "{tmp}/other/val-00000.parquet", "not a relative path inside"], id="evaluate-manifest-absolute-path",
    ),
    pytest.param(
        EVALUATE, val_files(["../other/val-00000.parquet"]),
        ["{tmp}/shards/manifest.json", "files.val", "../other/val-00000.parquet", "not a relative path inside"], id="evaluate-manifest-dotdot",
    ),
    pytest.param(
        EVALUATE, checkpoint_and_manifest(shard_linked_outside),
        ["{tmp}/shards/manifest.json", "'outside.parquet' leads outside the dataset folder", "{tmp}/other"], id="evaluate-shard-linked-outside",
    ),
    pytest.param(EVALUATE, manifest_bytes(RANDOM_BYTES), ["{tmp}/shards/manifest.json", "not valid JSON"], id="evaluate-manifest-binary"),
    pytest.param(EVALUATE, manifest_bytes(b"[1, 2]"), ["{tmp}/shards/manifest.json", "expected a JSON object"], id="evaluate-manifest-a-list"),
    # permissions (root reads and writes everything, so these run only as another user)
    pytest.param(
        SHARD, unreadable(f"{IMAGES}/um_000001.png"), [f"{{tmp}}/{IMAGES}/um_000001.png", "Permission denied"],
        id="shard-image-unreadable", marks=NEEDS_PERMISSIONS,
    ),
    pytest.param(SHARD, unreadable(IMAGES), [f"{{tmp}}/{IMAGES}", "Permission denied"], id="shard-folder-unreadable", marks=NEEDS_PERMISSIONS),
    pytest.param(
        [*SHARD[:-1], "{tmp}/ro/out"], read_only_parent, ["{tmp}/ro/out", "cannot create the output folder", "Permission denied"],
        id="shard-out-parent-read-only", marks=NEEDS_PERMISSIONS,
    ),
    pytest.param(
        [*SHARD[:-1], "{tmp}/locked/out"], locked_parent, ["{tmp}/locked/out", "cannot use it as the output folder", "Permission denied"],
        id="shard-out-in-locked-folder", marks=NEEDS_PERMISSIONS,
    ),
    pytest.param(
        ["data", "synth", "--out", "{tmp}/ro/out", "--count", "2"], read_only_parent,
        ["{tmp}/ro/out", "cannot create the output folder", "Permission denied"], id="synth-out-parent-read-only", marks=NEEDS_PERMISSIONS,
    ),
    pytest.param(["train", C], unreadable_config, ["{tmp}/c.yaml", "cannot read the config", "Permission denied"], id="config-unreadable", marks=NEEDS_PERMISSIONS),
    pytest.param(
        FOLDER_SHARD, folder_with(lambda root: (root / "classes.yaml").chmod(0)),
        ["{tmp}/raw/classes.yaml", "Permission denied"], id="shard-class-map-unreadable", marks=NEEDS_PERMISSIONS,
    ),
]


@pytest.mark.parametrize("args, setup, fragments", CASES)
def test_hostile_file_is_one_line_exit_2_and_nothing_written(request, tmp_path, args, setup, fragments):
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments, needs_a_fresh_interpreter(request))


# ---------------------------------------------------------------- files that are small on disk, or not files

PREDICT = ["predict", "{tmp}/exp/ckpt", "{tmp}/street.png", "--out", "{tmp}/out"]
EVALUATE_SHARDS = ["evaluate", "{tmp}/exp/ckpt", "{tmp}/shards"]
# Time for a row's command, far more than any needs: a read that blocks on a FIFO fails the row, not the suite.
READ_TIMEOUT_S = 120


def street_png(path: Path) -> Path:
    Image.fromarray(np.full((16, 32, 3), 90, np.uint8)).save(path)
    return path


def checkpoint_and(make_input, name: str = "street.png"):
    """A checkpoint, and make_input(tmp / name)."""

    def setup(tmp: Path) -> None:
        checkpoint(tmp)
        make_input(tmp / name)

    return setup


def images_folder_with_fifo(tmp: Path) -> None:
    checkpoint(tmp)
    (tmp / "images").mkdir()
    street_png(tmp / "images/a.png")
    os.mkfifo(tmp / "images/b.png")


def kitti_sparse(relative: str):
    def setup(tmp: Path) -> None:
        kitti_folder(tmp)
        sparse_tail(tmp / relative)

    return setup


def checkpoint_file_as(name: str, change):
    """A checkpoint and an image to predict, the checkpoint's `name` changed by change(path)."""

    def setup(tmp: Path) -> None:
        path = checkpoint(tmp) / name
        street_png(tmp / "street.png")
        change(path)
        seal(path.parent)  # as a hand could: the file's own check, not complete.json's

    return setup


def fifo_instead(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def sparse_manifest(tmp: Path) -> None:
    checkpoint(tmp)
    sparse_tail(shards(tmp) / "manifest.json")


def config_with_sparse_manifest(tmp: Path) -> None:
    config(tmp)
    sparse_tail(tmp / "shards/manifest.json")


UNBOUNDED_READS = [
    # FIFOs: opened before anything checked they were files, they blocked for ever
    pytest.param(
        SHARD, kitti_plus("um_000009.png", os.mkfifo, "um_road_000009.png"),
        [f"{{tmp}}/{IMAGES}/um_000009.png", "a FIFO, not a regular file"], id="shard-image-fifo",
    ),
    pytest.param(SHARD, kitti_mask_as(os.mkfifo), [f"{{tmp}}/{MASKS}/um_road_000001.png", "a FIFO, not a regular file"], id="shard-mask-fifo"),
    pytest.param(PREDICT, checkpoint_and(os.mkfifo), ["{tmp}/street.png", "a FIFO, not a regular file"], id="predict-input-fifo"),
    pytest.param(
        [*PREDICT[:2], "{tmp}/images", *PREDICT[3:]], images_folder_with_fifo, ["{tmp}/images/b.png", "a FIFO, not a regular file"],
        id="predict-folder-with-fifo",
    ),
    pytest.param(
        ["best", "{tmp}/exp"], checkpoint_file_as("metrics.json", fifo_instead),
        ["{tmp}/exp/ckpt/metrics.json", "a FIFO, not a regular file"], id="best-metrics-fifo",
    ),
    # links to an endless device: read whole, they filled memory
    pytest.param(
        SHARD, kitti_plus("um_000009.png", lambda p: p.symlink_to("/dev/zero"), "um_road_000009.png"),
        [f"{{tmp}}/{IMAGES}/um_000009.png", "a character device, not a regular file"], id="shard-image-dev-zero",
    ),
    pytest.param(
        SHARD, kitti_mask_as(lambda p: p.symlink_to("/dev/zero")),
        [f"{{tmp}}/{MASKS}/um_road_000001.png", "a character device, not a regular file"], id="shard-mask-dev-zero",
    ),
    # 3 GiB files that take no space on disk: a small PNG or config followed by a hole
    pytest.param(
        SHARD, kitti_sparse(f"{IMAGES}/um_000001.png"),
        [f"{{tmp}}/{IMAGES}/um_000001.png", "3221225472 bytes, over the", "RAYTRAIN_MAX_PIXELS"], id="shard-image-sparse-3gib",
    ),
    pytest.param(
        SHARD, kitti_sparse(f"{MASKS}/um_road_000001.png"),
        [f"{{tmp}}/{MASKS}/um_road_000001.png", "3221225472 bytes, over the"], id="shard-mask-sparse-3gib",
    ),
    pytest.param(
        PREDICT, checkpoint_file_as("config.yaml", sparse_tail),
        ["{tmp}/exp/ckpt/config.yaml", "3221225472 bytes, over the"], id="predict-checkpoint-config-sparse-3gib",
    ),
    pytest.param(
        ["best", "{tmp}/exp"], checkpoint_file_as("config.yaml", sparse_tail),
        ["{tmp}/exp/ckpt/config.yaml", "3221225472 bytes, over the"], id="best-checkpoint-config-sparse-3gib",
    ),
    pytest.param(
        EVALUATE_SHARDS, sparse_manifest, ["{tmp}/shards/manifest.json", "3221225472 bytes, over the"], id="evaluate-manifest-sparse-3gib",
    ),
    pytest.param(
        ["train", C, "--dry-run"], config_with_sparse_manifest,
        ["{tmp}/shards/manifest.json", "3221225472 bytes, over the"], id="dry-run-manifest-sparse-3gib",
    ),
]


@pytest.mark.parametrize("args, setup, fragments", UNBOUNDED_READS)
def test_a_file_is_read_only_when_regular_and_within_its_kinds_limit(tmp_path, args, setup, fragments):
    """One line, in bounded time and memory (MEMORY_LIMIT: 1 GiB of data)."""
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments, memory_limit=MEMORY_LIMIT, timeout=READ_TIMEOUT_S)


def test_runs_lists_an_experiment_whose_checkpoint_has_a_fifo_for_metrics(tmp_path):
    finished_experiment(tmp_path)
    [experiment] = (tmp_path / "results/bad").iterdir()
    (experiment / "checkpoint_000001").mkdir()
    (experiment / "checkpoint_000001/model.pt").write_bytes(b"weights")
    os.mkfifo(experiment / "checkpoint_000001/metrics.json")
    run = run_raytrain(["runs", tmp_path / "results"], tmp_path, timeout=READ_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert str(experiment) in run.stdout and "Traceback" not in run.stderr
