"""A disk that fills up: every command that writes answers with one line naming where, exit code 2,
and leaves nothing half-written; a checkpoint that a full disk cut short is never taken for one.

The full disk is real: a small tmpfs mounted for the test (the `small_disk` fixture; the rows skip
where mounting is not allowed), which fails writes with ENOSPC as a full disk does. The inputs live
on the ordinary disk, only the output on the small one. Train on a full disk, which needs Ray, is in
tests/e2e/test_full_disk.py.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from tests.helpers import assert_one_line_error, checkpoint, run_cli, snapshot

NO_SPACE = "No space left on device"
EXPORT = ["export", "{tmp}/exp/ckpt", "--out", "{tmp}/disk/model.out"]
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))


def scenes(tmp: Path) -> None:
    """16 synthetic scenes at 64x32 on the ordinary disk: about 90 kB once sharded."""
    from raytrain.data.synthetic import write_synthetic_kitti

    write_synthetic_kitti(tmp / "raw", 16, seed=0, size=(64, 32))


CASES = [
    # 40 scenes at 384x128 are about 4 MB: the disk fills after a few
    pytest.param(["data", "synth", "--out", "{tmp}/disk/scenes", "--count", "40", "--size", "384x128"], None, "256k",
                 ["{tmp}/disk/scenes", NO_SPACE], id="synth"),
    pytest.param(["data", "shard", "{tmp}/raw", "--format", "kitti", "--out", "{tmp}/disk/shards"], scenes, "32k",
                 ["{tmp}/disk/shards", NO_SPACE], id="shard"),
    # the tiny checkpoint's exports: 24 kB (TorchScript), 52 kB (torch.export), 31 kB (ONNX)
    pytest.param(EXPORT, checkpoint, "16k", ["{tmp}/disk/model.out", NO_SPACE], id="export-torchscript"),
    pytest.param([*EXPORT, "--format", "torch.export"], checkpoint, "16k", ["{tmp}/disk/model.out", NO_SPACE],
                 id="export-torch-export"),
    pytest.param([*EXPORT, "--format", "onnx"], checkpoint, "16k", ["{tmp}/disk/model.out", NO_SPACE], id="export-onnx",
                 marks=pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra")),
]


@pytest.mark.parametrize("args, setup, size, fragments", CASES)
def test_a_full_disk_is_one_line_exit_2_and_nothing_left(tmp_path, small_disk, args, setup, size, fragments):
    if setup is not None:
        setup(tmp_path)
    disk = small_disk(tmp_path / "disk", size)
    before = snapshot(tmp_path)
    run = run_cli([a.format(tmp=tmp_path) for a in args], tmp_path, timeout=300)
    assert_one_line_error(run, fragments, tmp_path)
    assert list(disk.iterdir()) == []  # no temporary file or folder left on the full disk
    unchanged = {path: stat for path, stat in snapshot(tmp_path).items() if path != "disk"}
    assert unchanged == {path: stat for path, stat in before.items() if path != "disk"}
# ---------------------------------------------------------------- a checkpoint that a full disk cut short


def big_checkpoint(folder: Path, val_iou: float) -> Path:
    """A real checkpoint of about 1.4 MB (a U-Net of 16 base channels: 470 kB of weights, twice that of
    Adam's state), as the training loop saves it."""
    from raytrain.checkpoints import save_checkpoint
    from raytrain.config import load_config
    from raytrain.models import create_model

    config = load_config({"data": {"path": str(folder), "size": "64x32"}, "model": {"name": "unet", "base_channels": 16, "depth": 2}})
    torch.manual_seed(0)
    model = create_model("unet", base_channels=16, depth=2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 3, 32, 64)).sum().backward()
    optimizer.step()  # Adam's state: two tensors the size of each parameter
    return save_checkpoint(folder, model, optimizer, None, 1, config, {"val_iou": val_iou})


def copy_until_full(source: Path, destination: str, last: str) -> None:
    """Copy the checkpoint file by file as an upload does (pyarrow's copy_files, which Ray Train
    uses), `last` last, onto a disk too small for it: the copy stops short where the disk is full."""
    names = sorted(p.name for p in source.iterdir() if p.name != last) + [last]
    local = pafs.LocalFileSystem()
    local.create_dir(destination)
    with pytest.raises(OSError, match=NO_SPACE):
        for name in names:
            pafs.copy_files(str(source / name), f"{destination}/{name}", source_filesystem=local, destination_filesystem=local)


def experiment_with_a_cut_short_checkpoint(tmp: Path, small_disk, last: str, size: str, whole: bool = True) -> Path:
    """tmp/exp, on a disk of `size`: checkpoint `whole` (val_iou 0.5) unless not `whole`, and `cut`
    (val_iou 0.9), whose copy filled the disk while writing `last` (its other files whole, `last` short)."""
    source = big_checkpoint(tmp / "source", 0.9)
    experiment = small_disk(tmp / "exp", size)
    if whole:
        checkpoint(tmp, "whole")  # helpers.checkpoint writes into tmp/exp
    copy_until_full(source, str(experiment / "cut"), last)
    assert (experiment / "cut" / last).stat().st_size < (source / last).stat().st_size
    return experiment


# Sizes: the other files fit, `last` does not (train_state.pt 940 kB, model.pt 470 kB).
@pytest.mark.parametrize("last, size", [("train_state.pt", "1m"), ("model.pt", "1200k")], ids=["train-state-short", "weights-short"])
def test_best_never_picks_a_checkpoint_that_a_full_disk_cut_short(tmp_path, small_disk, last, size):
    experiment = experiment_with_a_cut_short_checkpoint(tmp_path, small_disk, last, size)
    run = run_cli(["best", experiment, "--json"], tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["path"] == str(experiment / "whole")
    [note] = run.stderr.splitlines()
    assert note.startswith(f"raytrain: note: skipped {experiment / 'cut' / last}"), run.stderr


def test_a_cut_short_checkpoint_alone_is_no_best_one_line_exit_2(tmp_path, small_disk):
    experiment = experiment_with_a_cut_short_checkpoint(tmp_path, small_disk, "train_state.pt", "1m", whole=False)
    run = run_cli(["best", experiment], tmp_path, timeout=120)
    assert_one_line_error(run, [f"{experiment}: no checkpoint reports 'val_iou'", str(experiment / "cut" / "train_state.pt")], tmp_path)


def test_loading_a_cut_short_checkpoint_is_one_line_naming_the_short_file(tmp_path, small_disk):
    experiment = experiment_with_a_cut_short_checkpoint(tmp_path, small_disk, "model.pt", "1200k")
    run = run_cli(["export", experiment / "cut", "--out", tmp_path / "model.ts"], tmp_path, timeout=120)
    assert_one_line_error(run, [f"{experiment / 'cut' / 'model.pt'}: incomplete checkpoint"], tmp_path)
    assert not (tmp_path / "model.ts").exists()


def test_report_on_a_full_disk_is_one_line_naming_its_folder(tmp_path, small_disk, tiny_shards):
    """The report is written whole beside its folder, then moved in: a full disk leaves the folder as
    it was, a previous report intact, and no hidden staging folder."""
    from raytrain.checkpoints import save_checkpoint
    from raytrain.models import create_model
    from tests.helpers import tiny_config

    config = tiny_config(tiny_shards, tmp_path, name="run")
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=1, **config.model.kwargs())
    for epoch, iou in ((1, 0.3), (2, 0.4)):
        save_checkpoint(tmp_path / "run" / f"checkpoint_{epoch}", model, torch.optim.Adam(model.parameters()), None,
                        epoch, config, {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_f1": iou, "val_iou": iou})
    disk = small_disk(tmp_path / "disk", "16k")  # about 4 plots of 20 kB and the overlays
    (disk / "report").mkdir()
    (disk / "report" / "index.html").write_text("the last report")
    run = run_cli(["report", tmp_path / "run", "--out", disk / "report"], tmp_path, timeout=300)
    assert_one_line_error(run, [f"{disk / 'report'}: cannot write", NO_SPACE], tmp_path)
    assert sorted(path.name for path in disk.iterdir()) == ["report"]
    assert [(path.name, path.read_text()) for path in (disk / "report").iterdir()] == [("index.html", "the last report")]
