"""checkpoints: a fetch copies only what loading needs, and refuses a file over its limit; a run's
checkpoints by epoch leave out those cut off mid-copy; a damaged one restores nothing; an upload is
whole or absent."""

import os

import pyarrow.fs as pafs
import pytest

import raytrain
from raytrain.checkpoints import checkpoints_by_epoch, fetch_checkpoint, restore_train_state
from raytrain.errors import CheckpointError, RaytrainError


def test_a_fetch_copies_only_what_loading_needs(tmp_path):
    from tests.helpers import checkpoint

    source = checkpoint(tmp_path)
    assert (source / "train_state.pt").is_file()
    copy = fetch_checkpoint(pafs.LocalFileSystem(), str(source), tmp_path / "cache")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in source.iterdir() if p.name != "train_state.pt")
    raytrain.load_model(copy)


@pytest.mark.parametrize("name,size", [("model.pt", 9 * 10**9), ("config.yaml", 2 * 2**20)])
def test_a_fetch_refuses_a_file_over_its_limit_before_copying_a_byte(tmp_path, name, size):
    from tests.helpers import checkpoint

    source = checkpoint(tmp_path)
    os.truncate(source / name, size)  # sparse: costs no disk here, and would cost the download there
    with pytest.raises(CheckpointError, match=rf"{source}/{name}: {size} bytes, over the limit of \d+ for a checkpoint's {name}"):
        fetch_checkpoint(pafs.LocalFileSystem(), str(source), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_a_runs_checkpoints_by_epoch_are_the_whole_ones_latest_first(tmp_path):
    import json
    import shutil

    from tests.helpers import checkpoint

    run = tmp_path / "exp"
    for epoch in (1, 2, 3, 4):
        folder = checkpoint(tmp_path, f"checkpoint_{epoch}", metrics={"epoch": epoch, "val_iou": 0.5})
        assert json.loads((folder / "metrics.json").read_text())["epoch"] == epoch
    (run / "checkpoint_3" / "train_state.pt").unlink()  # a copy cut off before its last file
    (run / "checkpoint_4" / "metrics.json").write_text('{"epoch": 4')  # ... or in the middle of one
    shutil.copytree(run / "checkpoint_2", run / "not_a_checkpoint" / "nested")  # only the run's own level counts
    found = checkpoints_by_epoch(pafs.LocalFileSystem(), str(run))
    assert [(epoch, path) for epoch, path, _ in found] == [(2, str(run / "checkpoint_2")), (1, str(run / "checkpoint_1"))]
    assert found[0][2] == {"epoch": 2, "val_iou": 0.5}
    assert checkpoints_by_epoch(pafs.LocalFileSystem(), str(tmp_path / "nowhere")) == []


def test_a_damaged_training_state_restores_nothing(tmp_path):
    import torch

    from raytrain.models import create_model
    from tests.helpers import checkpoint

    saved = checkpoint(tmp_path)
    (saved / "train_state.pt").write_bytes((saved / "train_state.pt").read_bytes()[:100])
    model = create_model("simple", depth=1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^{saved}/train_state.pt: cannot resume from it"):
        restore_train_state(saved, model, torch.optim.Adam(model.parameters()))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    (saved / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=rf"^{saved}/model.pt: cannot read the weights"):
        restore_train_state(saved, model, torch.optim.Adam(model.parameters()))


def test_an_upload_is_whole_with_complete_json_or_leaves_nothing(tmp_path, small_disk):
    from raytrain.checkpoints import check_complete, upload_checkpoint
    from tests.helpers import checkpoint

    source, local = checkpoint(tmp_path), pafs.LocalFileSystem()
    upload_checkpoint(source, local, str(tmp_path / "storage" / "whole"))
    check_complete(tmp_path / "storage" / "whole")
    disk = small_disk(tmp_path / "disk", "8k")  # the checkpoint is about 16 kB
    with pytest.raises(RaytrainError, match=rf"^{disk}/cut: cannot write \(No space left on device\)$"):
        upload_checkpoint(source, local, str(disk / "cut"))
    assert list(disk.iterdir()) == []


def test_a_fetch_into_a_full_disk_is_one_line_naming_the_cache_and_leaves_nothing(tmp_path, small_disk):
    from tests.helpers import checkpoint

    source = checkpoint(tmp_path)
    cache = small_disk(tmp_path / "cache", "8k")  # the checkpoint is about 16 kB
    with pytest.raises(RaytrainError, match=rf"^{cache}: cannot write \(No space left on device\)$"):
        fetch_checkpoint(pafs.LocalFileSystem(), str(source), cache)
    assert [path for path in cache.rglob("*") if path.is_file()] == []
