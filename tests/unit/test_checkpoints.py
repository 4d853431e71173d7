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


# ---------------------------------------------------------------- encoder weights from a file


def small_encoder_config(tmp_path, weights, **dotted):
    from tests.helpers import SMALL_ENCODER, tiny_config

    return tiny_config(tmp_path, tmp_path / "results", **SMALL_ENCODER, **{"model.encoder_weights": str(weights), **dotted})


def whole_smp_model(path):
    """torch.save of a whole smp model's state dict (encoder.*, decoder.*, segmentation_head.*) at depth 5."""
    import segmentation_models_pytorch as smp
    import torch

    torch.save(smp.Unet("resnet18", encoder_weights=None).state_dict(), path)
    return {name.removeprefix("encoder."): tensor for name, tensor in torch.load(path, weights_only=True).items()}


def torchvision_resnet(path):
    """torchvision's ResNet-18 as its own files hold it: the classifier fc.* too."""
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), path)
    return torch.load(path, weights_only=True)


def deeper_encoder(path):
    """The encoder saved at depth 5 (layer1 to layer4), for a model of depth 2."""
    import torch

    from tests.helpers import encoder_weights

    return torch.load(encoder_weights(path, depth=5), weights_only=True)


@pytest.mark.parametrize("write", [whole_smp_model, torchvision_resnet, deeper_encoder])
def test_encoder_weights_from_the_files_smp_torchvision_and_a_deeper_model_save(tmp_path, write):
    """Beside the encoder's own state dict: the encoder.* part of a whole model's, a classifier the
    encoder drops, stages a shallower depth pruned. Every tensor the encoder holds is the file's."""
    import torch

    from raytrain.checkpoints import initial_model

    source = write(tmp_path / "weights.pt")
    model, _ = initial_model(small_encoder_config(tmp_path, tmp_path / "weights.pt"))
    own = model.encoder.state_dict()
    assert own and all(torch.equal(tensor, source[name]) for name, tensor in own.items() if not name.endswith("num_batches_tracked"))


def test_an_encoder_weights_file_of_another_sha256_than_the_config_pins_is_refused(tmp_path):
    from raytrain.checkpoints import initial_model
    from raytrain.errors import ConfigError
    from tests.helpers import encoder_weights

    file = encoder_weights(tmp_path / "resnet18.pt")
    _, recorded = initial_model(small_encoder_config(tmp_path, file))
    pinned = recorded.model.encoder_weights_sha256
    assert initial_model(recorded)[1] == recorded  # the same file: the same config
    encoder_weights(file, seed=2)
    with pytest.raises(ConfigError, match=f"^model.encoder_weights: {file}: its SHA-256 is [0-9a-f]{{64}}, not model.encoder_weights_sha256's {pinned}"):
        initial_model(recorded)


def test_encoder_weights_from_s3_record_the_sha256_of_the_file(tmp_path, s3_prefix, s3_server, monkeypatch):
    """Read from the bucket through pyarrow's S3 filesystem, as preflight and every worker read it,
    and recorded with the digest of the bytes uploaded."""
    import hashlib

    import torch

    from raytrain.checkpoints import initial_model
    from raytrain.storage.paths import filesystem_of
    from tests.helpers import encoder_weights

    for name, value in s3_server.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    file = encoder_weights(tmp_path / "resnet18.pt")
    uri = f"{s3_prefix}/weights/resnet18.pt"
    filesystem, path = filesystem_of(uri)
    with filesystem.open_output_stream(path) as upload:
        upload.write(file.read_bytes())
    model, config = initial_model(small_encoder_config(tmp_path, uri))
    assert config.model.encoder_weights == uri
    assert config.model.encoder_weights_sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert all(torch.equal(model.encoder.state_dict()[name], tensor) for name, tensor in torch.load(file, weights_only=True).items())
