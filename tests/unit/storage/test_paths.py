"""storage/paths: plain paths and file:// URIs stay pathlib Paths; other URIs become RemotePaths."""
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raytrain.errors import DataError
from raytrain.storage.paths import RemotePath, as_path, filesystem_of, is_remote, is_uri, join, location_of, uri_of


def test_is_uri():
    assert is_uri("s3://bucket/key") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri(Path("relative/x"))


def test_is_remote_asks_no_store(tmp_path):
    # An endpoint that nothing answers on: is_remote must not need it.
    assert is_remote("s3://bucket/key?endpoint_override=127.0.0.1:9&scheme=http")
    assert not is_remote(f"file://{tmp_path}") and not is_remote(tmp_path) and not is_remote("relative/x")
    assert is_remote(RemotePath(pafs.LocalFileSystem(), str(tmp_path), "mock://"))


def test_local_paths_and_file_uris_are_paths(tmp_path):
    assert as_path(str(tmp_path)) == tmp_path and isinstance(as_path(str(tmp_path)), Path)
    assert as_path(f"file://{tmp_path}") == tmp_path
    filesystem, path = filesystem_of("relative/x")
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(Path("relative/x").absolute())


def test_join_keeps_the_kind_of_location(tmp_path):
    assert join(str(tmp_path), "a.json") == str(tmp_path / "a.json")
    assert join("s3://bucket/folder/?region=x", "a.json") == "s3://bucket/folder/a.json?region=x"


def test_a_remote_path_walks_a_filesystem_like_pathlib(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "scene.png").write_bytes(b"png bytes")
    root = RemotePath(pafs.LocalFileSystem(), str(tmp_path), "mock://")
    image = root / "folder" / "scene.png"
    assert str(image) == f"mock://{tmp_path}/folder/scene.png"
    assert (image.name, image.stem, image.suffix) == ("scene.png", "scene", ".png")
    assert image.is_file() and not image.is_dir() and (root / "folder").is_dir() and not (root / "nothing").exists()
    assert list((root / "folder").iterdir()) == [image]


def test_an_unusable_uri_is_a_data_error_naming_it():
    with pytest.raises(DataError, match="nope://x: not a usable filesystem URI"):
        filesystem_of("nope://x")


def test_uri_of_names_again_what_ray_gives_as_a_path_on_its_filesystem(tmp_path):
    s3, key = pafs.FileSystem.from_uri("s3://bucket/results/exp?region=us-east-1&endpoint_override=127.0.0.1:9")
    assert key == "bucket/results/exp"  # what Ray's Result.path and ResultGrid.experiment_path hold
    assert uri_of(s3, key) == "s3://bucket/results/exp"
    assert uri_of(pafs.LocalFileSystem(), str(tmp_path)) == str(tmp_path)
    assert uri_of(None, str(tmp_path)) == str(tmp_path)


def test_location_of_names_rays_results_by_their_uri_and_a_path_as_it_is(tmp_path):
    from ray.train import Checkpoint, Result

    s3, key = pafs.FileSystem.from_uri("s3://bucket/results/exp?region=us-east-1&endpoint_override=127.0.0.1:9")
    checkpoint = Checkpoint(f"{key}/checkpoint_1", filesystem=s3)
    result = Result(metrics={}, checkpoint=checkpoint, error=None, path=key, _storage_filesystem=s3)
    assert location_of(result) == "s3://bucket/results/exp"  # raytrain.train's, on S3
    assert location_of(checkpoint) == "s3://bucket/results/exp/checkpoint_1"
    local = Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path), _storage_filesystem=pafs.LocalFileSystem())
    assert location_of(local) == location_of(tmp_path) == location_of(str(tmp_path)) == str(tmp_path)
    assert location_of("s3://bucket/x") == "s3://bucket/x"
