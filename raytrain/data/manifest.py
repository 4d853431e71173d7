"""manifest.json, the typed description of a sharded dataset: its classes, split, shard files,
groups and pixel frequencies. Read once on the driver (`read_manifest`), checked there, and handed
to every worker and trial with the config, so a run asks storage for it once.

A manifest is untrusted input like any file: its shard files must be relative paths inside the
dataset folder, and its groups names of letters, digits, _, - and . (they name metric keys).
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.splits import GROUP_NAME
from raytrain.errors import DataError
from raytrain.storage.paths import filesystem_of, join
from raytrain.storage.reading import MANIFEST_BYTES, SHARD_BYTES, checked_size, read_bounded

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
SPLITS = ("train", "val")
# Per-group metrics are reported for at most this many groups of a split: every key is a Tune
# metric, a TensorBoard curve and an MLflow metric each epoch (docs/decisions.md).
MAX_GROUP_METRICS = 16


class ClassEntry(BaseModel):
    """One target class: its name, the value masks hold for it, its colour in overlays."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    id: int
    color: list[int]


class Manifest(BaseModel):
    """What `raytrain data shard` wrote, with the dataset folder it was read from (`location`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int
    format: str
    classes: list[ClassEntry]
    ignore_index: int = IGNORE_INDEX
    num_samples: dict[str, int]
    files: dict[str, list[str]]
    split: dict = {}  # how the split was made (val_fraction and seed, or group_by and val_groups)
    pixel_frequencies: dict[str, float]  # share of labelled pixels per class (binary: background and the class)
    skipped: list[str] = []  # one-line errors of the samples --skip-bad left out
    groups: dict[str, dict[str, int]] | None = None  # per split, group -> samples; absent without --group-by
    source: str | None = None  # the dataset folder it was sharded from
    _location: str = PrivateAttr("")

    @property
    def location(self) -> str:
        """The dataset folder (or URI) holding this manifest and its shards."""
        return self._location

    def at(self, location: str | os.PathLike) -> Manifest:
        """This manifest as read from `location`."""
        self._location = os.fspath(location)
        return self

    @property
    def class_names(self) -> list[str]:
        return [entry.name for entry in self.classes]

    def count(self, split: str) -> int:
        return self.num_samples.get(split, 0)

    def metric_groups(self, split: str) -> list[str]:
        """The groups of `split` that get their own metrics: none for a dataset sharded without
        --group-by, nor beyond MAX_GROUP_METRICS groups."""
        groups = sorted((self.groups or {}).get(split, {}))
        return groups if len(groups) <= MAX_GROUP_METRICS else []

    def class_weights(self, configured: list[float] | str | None) -> list[float] | None:
        """loss.class_weights as the loss takes them: the configured weights, or with
        "inverse_frequency" the inverse pixel frequencies (background first for one class), mean 1."""
        if configured != "inverse_frequency":
            return configured
        names = ["background", *self.class_names] if len(self.classes) == 1 else self.class_names
        inverse = [1.0 / max(self.pixel_frequencies[name], 1e-6) for name in names]
        return [w * len(inverse) / sum(inverse) for w in inverse]

    def shard_paths(self, split: str) -> list[str]:
        """The split's Parquet files: local paths for local data (file:// included), else URIs. A local
        one must be a regular file within SHARD_BYTES (an object store holds nothing else)."""
        dataset = self.location
        filesystem, root = filesystem_of(dataset)
        names = self.files[split]
        if not isinstance(filesystem, pafs.LocalFileSystem):
            return [join(dataset, name) for name in names]
        root_path = Path(root).resolve()
        paths = [(root_path / name).resolve() for name in names]
        for name, path in zip(names, paths):
            if not path.is_relative_to(root_path):  # a symbolic link inside that leads out
                raise DataError(f"{join(dataset, MANIFEST)}: files.{split} entry {name!r} leads outside the dataset folder, to {path}")
            checked_size(path, SHARD_BYTES, "shard")
        return [str(path) for path in paths]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2)


def read_manifest(dataset: str | os.PathLike) -> Manifest:
    """The manifest of a sharded dataset: a local folder or any pyarrow filesystem URI."""
    path = join(dataset, MANIFEST)
    filesystem, manifest_path = filesystem_of(path)
    if filesystem.get_file_info(manifest_path).type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no manifest; shard the data first with `raytrain data shard`")
    text = read_bounded(path, MANIFEST_BYTES, "manifest")
    try:
        data = json.loads(text)
    except ValueError as err:  # JSONDecodeError, and bytes that are not UTF-8 at all
        raise DataError(f"{path}: not valid JSON ({' '.join(str(err).split())})") from None
    _check_untrusted(data, path)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DataError(f"{path}: {where}: {'unknown key' if first['type'] == 'extra_forbidden' else first['msg']}") from None
    return manifest.at(dataset)


def _check_untrusted(manifest, path: str) -> None:
    """What a manifest must never make raytrain do, in words of its own: read files outside the
    dataset folder, or name metric keys with arbitrary text."""
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(split), list) for split in SPLITS):
        raise DataError(f"{path}: `files` must list the {' and '.join(SPLITS)} shard files")
    for split in SPLITS:
        for name in files[split]:
            if not _relative_inside(name):
                # A manifest must not make raytrain read files elsewhere (/etc/..., ../other-data).
                raise DataError(f"{path}: files.{split} entry {name!r} is not a relative path inside the dataset folder")
    _check_groups(manifest.get("groups"), path)


def _check_groups(groups, path: str) -> None:
    """`groups` (absent without --group-by): per split, group name -> sample count."""
    if groups is None:
        return
    well_formed = isinstance(groups, dict) and all(
        isinstance(groups.get(split), dict)
        and all(isinstance(name, str) and GROUP_NAME.fullmatch(name) and type(count) is int for name, count in groups[split].items())
        for split in SPLITS
    )
    if not well_formed:
        raise DataError(f"{path}: `groups` must map train and val to group names (letters, digits, _, -, .) and sample counts")


def _relative_inside(name) -> bool:
    if not isinstance(name, str) or not name.strip() or "\\" in name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and ":" not in parts[0] and not name.startswith("~")


def group_indices(names, ids, groups: list[str]) -> np.ndarray:
    """Each row's group as its index into `groups` (the manifest's metric groups), int64."""
    index = {name: position for position, name in enumerate(groups)}
    unknown = [(sample_id, name) for sample_id, name in zip(ids, names) if name not in index]
    if unknown:
        raise DataError(f"sample {unknown[0][0]!r}: its group {unknown[0][1]!r} is not one of the manifest's {groups}")
    return np.array([index[name] for name in names], dtype=np.int64)
