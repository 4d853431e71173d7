"""Checkpoints found and loaded where they live: local folders and pyarrow URIs."""

import os

import pyarrow.fs as pafs
import pytest
import torch

import raytrain
from raytrain.checkpoints import MODEL_FILE, fetch_checkpoint, read_checkpoint
from raytrain.errors import CheckpointError
from tests.helpers import run_cli


def test_best_checkpoint_is_the_same_through_a_uri(trained_run):
    _, result = trained_run
    experiment = result.path
    local = raytrain.best_checkpoint(experiment)
    through_uri = raytrain.best_checkpoint(f"file://{experiment}")
    assert through_uri.path == local.path and through_uri.metrics == local.metrics
    run = run_cli(["best", f"file://{experiment}"], timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(local.path)


def test_a_remote_checkpoint_is_fetched_once_whole_and_loads(trained_run, tmp_path):
    """The copy s3:// and gs:// take, run here through pyarrow's local filesystem."""
    _, result = trained_run
    source = result.checkpoint.path
    copy = fetch_checkpoint(pafs.LocalFileSystem(), source, tmp_path / "cache")
    assert copy.name == source.rstrip("/").rsplit("/", 1)[-1] and (copy / MODEL_FILE).is_file()
    assert not list((tmp_path / "cache").rglob(".*partial"))
    modified = (copy / MODEL_FILE).stat().st_mtime_ns
    assert fetch_checkpoint(pafs.LocalFileSystem(), source, tmp_path / "cache") == copy  # cached, not copied again
    assert (copy / MODEL_FILE).stat().st_mtime_ns == modified

    original, fetched = raytrain.load_model(source), raytrain.load_model(read_checkpoint(copy))
    batch = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(fetched.module(batch), original.module(batch))


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
