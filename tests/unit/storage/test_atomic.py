"""storage/atomic: a file on S3 (the test server) appears whole or not at all; a temporary name reads back to its
final name; an exclusive create never replaces a file."""

from __future__ import annotations

import os

import pytest

from raytrain.storage.atomic import create_exclusively, final_of_temporary, temporary_beside, write_atomically
from raytrain.storage.paths import RemotePath
from raytrain.errors import DataError


def on_s3(s3_server, uri: str) -> RemotePath:
    """uri on the test's S3-protocol server, as raytrain's storage paths name it."""
    return RemotePath(s3_server.filesystem(), uri.removeprefix("s3://"), "s3://")


def test_a_file_on_s3_appears_whole_or_not_at_all(s3_server, s3_prefix):
    """An object store has no rename: the temporary name's object is moved (copied) to the final
    one, and only the final one is left."""
    written = write_atomically(on_s3(s3_server, f"{s3_prefix}/out/a_mask.png"), b"whole")
    assert str(written) == f"{s3_prefix}/out/a_mask.png"
    assert s3_server.keys(s3_prefix) == ["out/a_mask.png"]
    assert s3_server.filesystem().open_input_stream(f"{s3_prefix.removeprefix('s3://')}/out/a_mask.png").read() == b"whole"
    missing = f"s3://no-bucket-{s3_prefix.rpartition('-')[2]}/out/b_mask.png"
    with pytest.raises(DataError, match=rf"^{missing}: cannot write .*bucket does not exist"):
        write_atomically(on_s3(s3_server, missing), b"never")
    assert s3_server.keys(s3_prefix) == ["out/a_mask.png"]


def test_a_temporary_name_reads_back_to_its_final_name_and_nothing_else_does():
    for final in ("img00_mask.png", "prediction.json", "scene.tar.gz", "no_suffix"):
        temporary = temporary_beside(f"/out/{final}")
        folder, _, name = temporary.rpartition("/")
        assert folder == "/out" and name.startswith(".") and final_of_temporary(name) == final
    for other in (".not-ours", "img00_mask.png", ".img00_mask.png.x1y2z3.png", ".img00_mask.png.0123abcd.jpg"):
        assert final_of_temporary(other) is None


def test_an_exclusive_create_writes_only_a_new_file(tmp_path):
    target = tmp_path / "record.json"
    assert create_exclusively(target, b"first")
    assert not create_exclusively(target, b"second")
    (tmp_path / "a_folder").mkdir()
    assert not create_exclusively(tmp_path / "a_folder", b"third")
    assert sorted(os.listdir(tmp_path)) == ["a_folder", "record.json"]
    assert target.read_bytes() == b"first"


def test_an_exclusive_create_on_s3_writes_only_a_new_object(s3_server, s3_prefix):
    target = on_s3(s3_server, f"{s3_prefix}/record.json")
    assert create_exclusively(target, b"first")
    assert not create_exclusively(target, b"second")
    write_atomically(on_s3(s3_server, f"{s3_prefix}/a_folder/inside.json"), b"{}")
    assert not create_exclusively(on_s3(s3_server, f"{s3_prefix}/a_folder"), b"third")  # a prefix with objects
    assert s3_server.keys(s3_prefix) == ["a_folder/inside.json", "record.json"]
    assert s3_server.filesystem().open_input_stream(target.path).read() == b"first"
