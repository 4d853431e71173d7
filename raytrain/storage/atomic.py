"""Whole-or-nothing writes: one policy for every file raytrain writes, local or remote.

The data goes to a hidden temporary name beside the final one (`temporary_beside`), which is then
renamed (local: os.replace) or moved (an object store's move is a server-side copy). So the final
name never holds a partial file, and a killed run leaves only hidden temporaries, which
`final_of_temporary` recognises. A failure removes the temporary and is a one-line DataError.
`create_exclusively` is the one other way: a new file that must not replace one, for a claim.

`write_errors_named` is the same one-line error for what writes a folder of files (shards,
synthetic scenes, a checkpoint's upload): a full disk or quota names the target, never a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path, PurePosixPath
import pyarrow as pa

from raytrain.errors import DataError
from raytrain.storage.paths import RemotePath, as_path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # an OSError's errno when the disk or the user's quota is full

_TEMPORARY = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{8}(?P<suffix>\.[^.]*)?")


def temporary_beside(final: str) -> str:
    """A new hidden name beside `final` (a local path or a filesystem path) to write it under before
    the rename: `.<name>.<8 hex digits><suffix>`, which `final_of_temporary` reads back."""
    folder, _, name = final.rpartition("/")
    return f"{folder}/.{name}.{uuid.uuid4().hex[:8]}{PurePosixPath(name).suffix}"


def final_of_temporary(name: str) -> str | None:
    """The file name a temporary_beside() name was written for; None for any other name."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or (match["suffix"] or "") != PurePosixPath(match["final"]).suffix:
        return None
    return match["final"]


def write_atomically(target: str | os.PathLike | RemotePath, data: bytes):
    """`data` as the file `target` (a local path or any URI), whole or not at all; returns the
    target as a Path or RemotePath. A local file gets the permissions open() would give it."""
    path = as_path(target)
    if isinstance(path, RemotePath):
        return _write_remote(path, data)
    return _write_local(path.expanduser(), data)


def create_exclusively(target: str | os.PathLike | RemotePath, data: bytes) -> bool:
    """`data` as the new file `target`; False, writing nothing, where a file or folder of that name
    exists. Locally one exclusive create (O_CREAT | O_EXCL, atomic on local disks and NFS): of
    writers racing for one name exactly one gets True, and the others may see the file empty for
    the moment its bytes take. Object stores offer no exclusive create through pyarrow: there it is
    a check, then write_atomically."""
    path = as_path(target)
    if isinstance(path, RemotePath):
        if path.exists():
            return False
        write_atomically(path, data)
        return True
    path = path.expanduser()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except FileExistsError:
        return False
    except OSError as err:
        raise cannot_write(path, err) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(err, OSError):
            raise cannot_write(path, err) from None
        raise
    return True


def cannot_write(target, err: OSError) -> DataError:
    """The one-line error for an OSError while writing `target`: the OS's reason (No space left on
    device, Disk quota exceeded, Read-only file system), which pyarrow's errors carry too."""
    reason = os.strerror(err.errno) if err.errno else " ".join(str(err).split()) or type(err).__name__
    return DataError(f"{target}: cannot write ({reason})")


@contextlib.contextmanager
def write_errors_named(target):
    """An OSError inside, from writing `target` (a file or folder, shown as given), as cannot_write's
    one-line error."""
    try:
        yield
    except OSError as err:
        raise cannot_write(target, err) from None


def _write_local(path: Path, data: bytes) -> Path:
    tmp = temporary_beside(str(path))
    with write_errors_named(path):
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            Path(tmp).write_bytes(data)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def _write_remote(path: RemotePath, data: bytes) -> RemotePath:
    temporary = temporary_beside(path.path)
    try:
        with path.filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        path.filesystem.move(temporary, path.path)
    except BaseException as err:
        with contextlib.suppress(pa.ArrowException, OSError):
            path.filesystem.delete_file(temporary)
        if isinstance(err, (pa.ArrowException, OSError)):
            raise DataError(f"{path}: cannot write ({' '.join(str(err).split())})") from None
        raise
    return path


def _umask() -> int:
    """The process's umask; /proc reads it without the brief os.umask() change other threads could see."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
