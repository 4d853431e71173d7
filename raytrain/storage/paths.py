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


def is_remote(location: "str | os.PathLike | RemotePath") -> bool:
    """Whether `location` lies on a filesystem other than the local one (a file:// URI does not),
    known without a request to it."""
    if isinstance(location, RemotePath):
        return True
    text = os.fspath(location)
    if not is_uri(text):
        return False
    return urlsplit(text).scheme.lower() not in ("file", "local")


def filesystem_of(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, absolute path on it) for a local path or any URI pyarrow understands."""
    if isinstance(location, RemotePath):
        return location.filesystem, location.path
    text = os.fspath(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{text}: not a usable filesystem URI ({' '.join(str(err).split())})") from None
    if isinstance(filesystem, pafs.S3FileSystem):
        filesystem = _with_bounded_retries(filesystem)
    if isinstance(filesystem, _BUCKET_STORES):
        _check_bucket(filesystem, path.partition("/")[0], text)
    return filesystem, path


# pyarrow's filesystem type names and the URI schemes that name them again.
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}


def uri_of(filesystem: pafs.FileSystem | None, path: str) -> str:
    """The location a user names for `path` on `filesystem`: Ray's results and checkpoints give
    a path on their filesystem (bucket/key, no s3://). The URI's options, such as an endpoint,
    are not in Ray's paths; the standard variables (AWS_ENDPOINT_URL) carry them."""
    scheme = _SCHEMES.get(getattr(filesystem, "type_name", "local"))
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def location_of(item) -> str:
    """The location a user names for `item`: a path or URI as it is; or one of Ray's results with
    its `filesystem` (raytrain.train's Result by its `path`, raytrain.tune's ResultGrid by its
    `experiment_path`, a Checkpoint by its `path`), whose paths lack the scheme there (uri_of)."""
    filesystem = getattr(item, "filesystem", None)
    for attribute in ("experiment_path", "path"):
        path = getattr(item, attribute, None)
        if filesystem is not None and isinstance(path, str):
            return uri_of(filesystem, path)
    return os.fspath(item)


def _with_bounded_retries(filesystem: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 filesystem with pyarrow's own default retries (the SDK's standard mode: 3
    attempts): from_uri leaves the SDK's legacy default of 10 backed-off attempts, so an endpoint
    that accepts connections and never answers held a command 100 s instead of about 10."""
    rebuild, (options,) = filesystem.__reduce__()  # the pickle protocol: its options, as a dict
    return rebuild({**options, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)})


# Object stores whose paths start with a bucket: pyarrow's wheels may be built without GCS.
_BUCKET_STORES = tuple(getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem") if hasattr(pafs, name))
_reachable_buckets: set[tuple[str, str]] = set()


def _check_bucket(filesystem: pafs.FileSystem, bucket: str, uri: str) -> None:
    """One request per bucket and process, on first use: a missing bucket, a refused key or an
    endpoint that does not answer (after the SDK's bounded retries) is one DataError naming the
    bucket here, not an OSError from whichever call of pyarrow meets it first. Needs permission to
    list the bucket (HeadBucket), which raytrain needs anyway to find shards and checkpoints."""
    parts = urlsplit(uri)
    key = (f"{parts.scheme}://{bucket}?{parts.query}", os.environ.get("AWS_ENDPOINT_URL", ""))
    if key in _reachable_buckets:
        return
    try:
        found = filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{_without_query(uri)}: cannot reach the bucket {bucket!r} ({' '.join(str(err).split())})") from None
    if not found:
        raise DataError(f"{_without_query(uri)}: the bucket {bucket!r} does not exist")
    _reachable_buckets.add(key)


def _without_query(uri: str) -> str:
    """The URI as a user names the place: its options (an endpoint, a region) are no part of it."""
    return urlunsplit(urlsplit(uri)._replace(query=""))


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
