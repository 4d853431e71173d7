"""Local paths and pyarrow filesystem URIs (s3://, gs://, file://, ...): every location raytrain reads or writes.

A plain path or a file:// URI stays a `pathlib.Path`, so local data behaves exactly as it always
did. Any other URI becomes a `RemotePath`: the few pathlib operations the format readers use,
served by the filesystem that `pyarrow.fs.FileSystem.from_uri` picks for it.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from raytrain.errors import DataError


def is_uri(location: "str | os.PathLike | RemotePath") -> bool:
    return isinstance(location, RemotePath) or "://" in os.fspath(location)


def filesystem_of(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, absolute path on it) for a local path or any URI pyarrow understands."""
    if isinstance(location, RemotePath):
        return location.filesystem, location.path
    text = os.fspath(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{text}: not a usable filesystem URI ({' '.join(str(err).split())})") from None


def as_path(location: str | os.PathLike) -> "Path | RemotePath":
    """A Path for local data (plain paths and file:// URIs), a RemotePath for any other URI."""
    if isinstance(location, (Path, RemotePath)):
        return location
    text = os.fspath(location)
    if not is_uri(text):
        return Path(text)
    filesystem, path = filesystem_of(text)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    return RemotePath(filesystem, path.rstrip("/"), f"{urlsplit(text).scheme}://")


def join(location: str | os.PathLike, name: str) -> str:
    """`name` inside the folder `location`, as the same kind of string (a URI keeps its options)."""
    text = os.fspath(location)
    if not is_uri(text):
        return str(Path(text).expanduser() / name)
    parts = urlsplit(text)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


class RemotePath:
    """A file or folder on a remote pyarrow filesystem, with the pathlib methods the readers use
    (its contents are read by storage.reading, within a bound)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, scheme: str):
        self.filesystem, self.path, self.scheme = filesystem, path, scheme

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(self.filesystem, f"{self.path}/{name}", self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other: "RemotePath") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    def _type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def iterdir(self):
        for info in self.filesystem.get_file_info(pafs.FileSelector(self.path)):
            yield RemotePath(self.filesystem, info.path, self.scheme)

    def glob(self, pattern: str):
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def expanduser(self) -> "RemotePath":
        return self

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.filesystem.create_dir(self.path, recursive=parents)  # object stores have no folders to collide with
