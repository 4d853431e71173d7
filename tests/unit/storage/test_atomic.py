"""storage/atomic: a remote file appears whole or not at all; a temporary name reads back to its
final name; an exclusive create never replaces a file."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from raytrain.storage.atomic import create_exclusively, final_of_temporary, temporary_beside, write_atomically
from raytrain.storage.paths import RemotePath
from raytrain.errors import DataError


def test_a_remote_file_appears_whole_or_not_at_all(tmp_path):
    """A filesystem other than the local one (here a SubTreeFileSystem over a folder) takes the
    temporary-name-then-move path that s3:// and gs:// take."""
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    filesystem.create_dir("out")
    write_atomically(RemotePath(filesystem, "out/a_mask.png", "sub://"), b"whole")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_mask.png"]
    assert (tmp_path / "out" / "a_mask.png").read_bytes() == b"whole"
    (tmp_path / "out" / "taken").write_text("a file, not a folder")
    with pytest.raises(DataError, match=r"^sub://out/taken/b_mask.png: cannot write"):
        write_atomically(RemotePath(filesystem, "out/taken/b_mask.png", "sub://"), b"never")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_mask.png", "taken"]


def test_a_temporary_name_reads_back_to_its_final_name_and_nothing_else_does():
    for final in ("img00_mask.png", "prediction.json", "scene.tar.gz", "no_suffix"):
        temporary = temporary_beside(f"/out/{final}")
        folder, _, name = temporary.rpartition("/")
        assert folder == "/out" and name.startswith(".") and final_of_temporary(name) == final
    for other in (".not-ours", "img00_mask.png", ".img00_mask.png.x1y2z3.png", ".img00_mask.png.0123abcd.jpg"):
        assert final_of_temporary(other) is None


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_an_exclusive_create_writes_only_a_new_file(tmp_path, remote):
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    target = RemotePath(filesystem, "record.json", "sub://") if remote else tmp_path / "record.json"
    assert create_exclusively(target, b"first")
    assert not create_exclusively(target, b"second")
    (tmp_path / "a_folder").mkdir()
    assert not create_exclusively(RemotePath(filesystem, "a_folder", "sub://") if remote else tmp_path / "a_folder", b"third")
    assert sorted(os.listdir(tmp_path)) == ["a_folder", "record.json"]
    assert (tmp_path / "record.json").read_bytes() == b"first"
