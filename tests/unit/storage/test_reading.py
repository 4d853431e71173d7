"""storage/reading: a file is read whole only when it is a regular file within its kind's limit,
local or remote; anything else is one error naming the file, without blocking or filling memory."""
import os

import pytest

from raytrain.errors import CheckpointError, DataError
from raytrain.storage.paths import RemotePath
from raytrain.storage.reading import checked_size, read_bounded


def test_a_regular_file_within_its_limit_is_read_whole(tmp_path):
    (tmp_path / "a.json").write_bytes(b"{}" * 50)
    assert read_bounded(tmp_path / "a.json", 100, "record") == b"{}" * 50
    assert checked_size(tmp_path / "a.json", 100, "record") == 100


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"x.png: cannot read the image \(a FIFO, not a regular file\)$"):
        read_bounded(tmp_path / "x.png", 100, "image")
    with pytest.raises(DataError, match="a FIFO, not a regular file"):
        checked_size(tmp_path / "x.png", 100, "image")


def test_devices_and_folders_are_refused(tmp_path):
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"zero: cannot read the metrics \(a character device, not a regular file\)"):
        read_bounded(tmp_path / "zero", 100, "metrics", CheckpointError)
    with pytest.raises(DataError, match=r"cannot read the image \(a folder, not a file\)"):
        read_bounded(tmp_path, 100, "image")


def test_a_sparse_file_is_refused_from_its_size(tmp_path):
    with open(tmp_path / "c.yaml", "wb") as file:
        file.write(b"name: x\n")
        file.truncate(3 << 30)  # 3 GiB of hole: no block on disk
    with pytest.raises(DataError, match=r"c.yaml: 3221225472 bytes, over the config limit of 1024 bytes \(SOME_ENV\)$"):
        read_bounded(tmp_path / "c.yaml", 1024, "config", setting="SOME_ENV")


def test_missing_and_looping_files_are_named_in_words(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match="loop: cannot read the mask .symbolic link loop."):
        read_bounded(tmp_path / "loop", 100, "mask")
    with pytest.raises(DataError, match="dangling: cannot read the mask .broken symbolic link to .*gone"):
        read_bounded(tmp_path / "dangling", 100, "mask")


def test_a_file_on_s3_is_checked_from_its_listing_then_read(s3_server, s3_prefix):
    bucket_path = f"{s3_prefix.removeprefix('s3://')}/m.json"
    with s3_server.filesystem().open_output_stream(bucket_path) as out:
        out.write(b"x" * 10)
    remote = RemotePath(s3_server.filesystem(), bucket_path, "s3://")
    assert read_bounded(remote, 10, "manifest") == b"x" * 10
    with pytest.raises(DataError, match=rf"^{s3_prefix}/m.json: 10 bytes, over the manifest limit of 9 bytes"):
        read_bounded(remote, 9, "manifest")
    with pytest.raises(DataError, match=rf"^{s3_prefix}/none.json: cannot read the manifest .No such file or directory."):
        read_bounded(RemotePath(s3_server.filesystem(), bucket_path.replace("m.json", "none.json"), "s3://"), 9, "manifest")
