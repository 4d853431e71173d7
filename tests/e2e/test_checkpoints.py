"""Checkpoints found and loaded where they live: local folders and pyarrow URIs."""

import pyarrow.fs as pafs
import torch

import raytrain
from raytrain.checkpoints import MODEL_FILE, fetch_checkpoint, read_checkpoint
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
