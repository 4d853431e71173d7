"""A disk that fills up: every command that writes answers with one line naming where, exit code 2,
and leaves nothing half-written; a checkpoint that a full disk cut short is never taken for one.

The full disk is real: a small tmpfs mounted for the test (the `small_disk` fixture; the rows skip
where mounting is not allowed), which fails writes with ENOSPC as a full disk does. The inputs live
on the ordinary disk, only the output on the small one. Train on a full disk, which needs Ray, is in
tests/e2e/test_full_disk.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
