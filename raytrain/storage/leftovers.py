"""Hidden temp folders for atomic writes, and the removal of those an interrupted run left behind.

A temp folder sits beside its target as `.NAME.tmp-HOST-PID-RANDOM` and holds a marker file with
the same host and pid (and the process's start time, where /proc has it). Ctrl-C and SIGTERM
remove it on the way out; SIGKILL or a power cut cannot. The next write to the same target removes
a leftover only when it can prove it is one: the marker is raytrain's, names this host, and that
process is gone (or the pid now belongs to a process started later). Everything else there stays,
and a note says where it is.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import uuid
import warnings
from pathlib import Path

import pyarrow.fs as pafs

from raytrain.errors import DataError

MARKER = ".raytrain-temp.json"
MARKER_KIND = "raytrain temp folder"


class LeftoverWarning(UserWarning):
    """A note about a temp folder of an earlier run: removed, or left because it may still be in use."""


def _host() -> str:
    # No "-" in it, so the name splits back into host, pid and random part.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), where Linux says."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)", which may hold spaces
    return fields[19] if len(fields) > 19 else None


def make_temp_dir(filesystem: pafs.FileSystem, target: str, shown: str) -> str:
    """A new temp folder beside `target` (after removing provable leftovers of earlier runs)."""
    parent, name = posixpath.split(target)
    try:
        remove_leftovers(filesystem, parent, name)
        pid = os.getpid()
        tmp = f"{parent}/.{name}.tmp-{_host()}-{pid}-{uuid.uuid4().hex[:8]}"
        filesystem.create_dir(tmp)
        marker = {"kind": MARKER_KIND, "host": _host(), "pid": pid, "start": _start_time(pid)}
        with filesystem.open_output_stream(f"{tmp}/{MARKER}") as stream:
            stream.write(json.dumps(marker).encode())
    except OSError as err:
        raise DataError(f"{shown}: cannot create the output folder ({_blocker(filesystem, parent, err)})") from None
    return tmp


def unmark(filesystem: pafs.FileSystem, tmp: str) -> None:
    """Remove the marker before `tmp` is published, so the finished folder holds only its data."""
    filesystem.delete_file(f"{tmp}/{MARKER}")


def _blocker(filesystem: pafs.FileSystem, parent: str, err: OSError) -> str:
    """Why a folder cannot be made in `parent`: a file where a folder must be, or the OS's reason."""
    path = parent
    while path and path != posixpath.dirname(path):
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.File:
            return f"{path} is a file, not a folder"
        if kind == pafs.FileType.Directory:
            break
        path = posixpath.dirname(path)
    return os.strerror(err.errno) if err.errno else " ".join(str(err).split())


def remove_leftovers(filesystem: pafs.FileSystem, parent: str, name: str) -> None:
    """Remove the temp folders for `parent/name` that crashed runs on this host left; note the rest."""
    prefix = f".{name}.tmp-"
    for info in filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
        if not info.base_name.startswith(prefix):
            continue
        owner = _owner(filesystem, info, prefix)
        if owner is not None and owner["host"] == _host() and not _running(owner["pid"], owner["start"]):
            try:
                filesystem.delete_dir(info.path)
            except OSError as err:
                warnings.warn(f"{info.path}: left by an interrupted run, could not remove it ({err.strerror or err})", LeftoverWarning)
                continue
            warnings.warn(f"removed {info.path}, left by an interrupted run (pid {owner['pid']})", LeftoverWarning)
        elif owner is not None:
            where = "on this host" if owner["host"] == _host() else f"on host {owner['host']}"
            warnings.warn(f"{info.path}: left alone, its run (pid {owner['pid']} {where}) may still be writing", LeftoverWarning)
        else:
            warnings.warn(f"{info.path}: left alone, not a temp folder raytrain can prove is its own", LeftoverWarning)


def _owner(filesystem: pafs.FileSystem, info: pafs.FileInfo, prefix: str) -> dict | None:
    """The host, pid and start time a temp folder's marker records, when its name carries the same."""
    if info.type != pafs.FileType.Directory:
        return None
    try:
        with filesystem.open_input_stream(f"{info.path}/{MARKER}") as stream:
            marker = json.loads(stream.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        return None
    host, pid, start = marker.get("host"), marker.get("pid"), marker.get("start")
    if not (isinstance(host, str) and type(pid) is int and pid > 0 and (start is None or isinstance(start, str))):
        return None
    if not info.base_name.startswith(f"{prefix}{host}-{pid}-"):
        return None
    return {"host": host, "pid": pid, "start": start}


def _running(pid: int, start: str | None) -> bool:
    """Whether process `pid` still runs: when unsure (another user's process, no /proc), yes."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _start_time(pid)
    return start is None or now is None or now == start  # a later start: the pid was reused
