"""Reading files within a bound: one rule for every file raytrain reads (images, masks, YAML, JSON,
shards, checkpoints), local or at a URI. A file is read only once it is known to be a regular file
of at most the limit of its kind: a FIFO would block for ever, and a link to /dev/zero or a sparse
file of gigabytes (a few bytes on disk) would fill memory. Any problem is one line naming the file.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raytrain.errors import DataError, RaytrainError
from raytrain.storage.paths import RemotePath, as_path

# The most bytes a file of each kind may hold. Images: data.images.max_image_bytes(); weights:
# checkpoints.checkpoint_file_limit(), both from limits a user can set.
CONFIG_BYTES = 1 << 20  # YAML: configs, class maps, the config.yaml of a checkpoint or an experiment
RECORD_BYTES = 1 << 20  # raytrain's JSON records: metrics.json, classes.json, experiment.json, Tune's params.json
MANIFEST_BYTES = 64 << 20  # manifest.json: a line per shard file, group and skipped sample
RESULTS_BYTES = 256 << 20  # Ray Tune's result.json: a line of metrics per reported epoch
SHARD_BYTES = 4 << 30  # a Parquet shard: data shard's 32 rows of encoded images and masks
_CHUNK = 1 << 24  # a read asks for at most this much at once: os.read allocates what it is asked for

_NOT_REGULAR = {
    stat.S_IFDIR: "a folder, not a file",
    stat.S_IFIFO: "a FIFO, not a regular file",
    stat.S_IFCHR: "a character device, not a regular file",
    stat.S_IFBLK: "a block device, not a regular file",
    stat.S_IFSOCK: "a socket, not a regular file",
}


def file_problem(path, err: OSError) -> str:
    """Why `path` could not be read, in words, for what a folder really holds: broken links, link
    loops, folders named like files; else the system's reason (Permission denied)."""
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    if err.errno == errno.EISDIR:
        return "a folder, not a file"
    if err.errno == errno.ENOENT and isinstance(path, Path) and path.is_symlink():
        return f"broken symbolic link to {os.readlink(path)}"
    return err.strerror or " ".join(str(err).split()) or type(err).__name__


def read_bounded(location: str | os.PathLike | RemotePath, limit: int, kind: str,
                 error: type[RaytrainError] = DataError, setting: str | None = None) -> bytes:
    """The bytes of the file at `location` (a local path, a RemotePath or a URI), read only once it is
    known to be a regular file of at most `limit` bytes. Anything else is `error` naming the file
    and saying what it is instead, that it is over the `kind`'s limit (set by `setting`, where a
    user can set it), or why it could not be read."""
    path = as_path(location)
    if isinstance(path, RemotePath):
        return _read_remote(path, limit, kind, error, setting)
    path = path.expanduser()
    try:
        # O_NONBLOCK: a FIFO opens without waiting for a writer, so fstat can refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise error(f"{location}: cannot read the {kind} ({file_problem(path, err)})") from None
    try:
        status = os.fstat(fd)
        _check(location, status.st_mode, status.st_size, limit, kind, error, setting)
        data = _read_to(lambda n: os.read(fd, n), limit)
    except OSError as err:
        raise error(f"{location}: cannot read the {kind} ({file_problem(path, err)})") from None
    finally:
        os.close(fd)
    _check(location, stat.S_IFREG, len(data), limit, kind, error, setting)
    return data


def _read_to(read, limit: int) -> bytes:
    """Everything `read(n)` gives, up to limit + 1 bytes: a file that grows while read is refused too."""
    chunks = []
    _stream_to(read, chunks.append, limit)
    return b"".join(chunks)


def _stream_to(read, write, limit: int) -> int:
    """What `read(n)` gives, handed to `write` chunk by chunk, up to limit + 1 bytes; the bytes moved."""
    size = 0
    while size <= limit:
        chunk = read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            break
        write(chunk)
        size += len(chunk)
    return size


def checked_size(location: str | os.PathLike | RemotePath, limit: int, kind: str,
                 error: type[RaytrainError] = DataError, setting: str | None = None) -> int:
    """The size of the regular file at `location`, at most `limit` bytes, else `error` as for
    read_bounded: for files that another library reads (torch's weights, pyarrow's shards)."""
    path = as_path(location)
    shown = path if isinstance(path, RemotePath) else location  # a URI without its options
    try:
        if isinstance(path, RemotePath):
            info = path.filesystem.get_file_info(path.path)
            mode, size = _remote_mode(info), info.size or 0
        else:
            status = path.expanduser().stat()
            mode, size = status.st_mode, status.st_size
    except (OSError, pa.ArrowException) as err:
        reason = file_problem(path, err) if isinstance(err, OSError) else " ".join(str(err).split())
        raise error(f"{shown}: cannot read the {kind} ({reason})") from None
    _check(shown, mode, size, limit, kind, error, setting)
    return size


def copy_bounded(path: RemotePath, destination: Path, limit: int, kind: str,
                 error: type[RaytrainError] = DataError, setting: str | None = None) -> None:
    """The remote file `path` copied to the local file `destination` within `limit` bytes, streamed
    as read_bounded reads it: for a file that another library reads from disk (torch's memory map),
    never held in memory whole. A read fails as read_bounded's; a write (a full disk) with its OSError."""
    checked_size(path, limit, kind, error, setting)

    def unreadable(err: Exception) -> RaytrainError:
        return error(f"{path}: cannot read the {kind} ({' '.join(str(err).split())})")

    def read(count: int) -> bytes:
        try:
            return stream.read(count)
        except (OSError, pa.ArrowException) as err:
            raise unreadable(err) from None

    with open(destination, "wb") as copy:
        try:
            stream = path.filesystem.open_input_stream(path.path)
        except (OSError, pa.ArrowException) as err:
            raise unreadable(err) from None
        with stream:
            size = _stream_to(read, copy.write, limit)
    _check(path, stat.S_IFREG, size, limit, kind, error, setting)


def _check(location, mode: int, size: int, limit: int, kind: str, error, setting: str | None) -> None:
    if not stat.S_ISREG(mode):
        what = _NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise error(f"{location}: cannot read the {kind} ({what})")
    if size > limit:
        raise error(f"{location}: {size} bytes, over the {kind} limit of {limit} bytes{f' ({setting})' if setting else ''}")


def _remote_mode(info: pafs.FileInfo) -> int:
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")
    return {pafs.FileType.File: stat.S_IFREG, pafs.FileType.Directory: stat.S_IFDIR}.get(info.type, 0)


def _read_remote(path: RemotePath, limit: int, kind: str, error, setting: str | None) -> bytes:
    checked_size(path, limit, kind, error, setting)
    try:
        with path.filesystem.open_input_stream(path.path) as stream:
            data = _read_to(stream.read, limit)
    except (OSError, pa.ArrowException) as err:
        raise error(f"{path}: cannot read the {kind} ({' '.join(str(err).split())})") from None
    _check(path, stat.S_IFREG, len(data), limit, kind, error, setting)
    return data
