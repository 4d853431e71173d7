"""A dataset folder -> Parquet shards plus manifest.json, validated once, written atomically.

Each row holds one sample: its id, source path, split, height, width, the image file's bytes as
they were on disk (PNG or JPEG, not re-encoded) and the mask as a class-index PNG (IGNORE_INDEX
where unknown); with --group-by also its group (a drive, a KITTI category), and whole groups
make up the val split. Every image and mask is decoded here once, so a corrupt file or a mismatched
mask fails now with its file named, not hours into training.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from raytrain.data import leftovers
from raytrain.data.formats import (
    FORMATS, IGNORE_INDEX, DatasetFormat, Sample, check_8bit, file_problem, get_format, open_checked, os_errors_named,
)
from raytrain.data.location import as_path, filesystem_of, join
from raytrain.errors import DataError

MANIFEST = "manifest.json"
# One Parquet file is one Ray Data read task: small files let every CPU decode (a 230-image KITTI
# train split in 256-row files was a single task on one CPU) and shuffle files at a fine grain.
ROWS_PER_SHARD = 32
SCHEMA_VERSION = 1
SPLITS = ("train", "val")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
    ]
)
GROUPED_SCHEMA = SCHEMA.append(pa.field("group", pa.string()))
# A group names metric keys (val_iou@<group>): Tune, TensorBoard and MLflow all take these characters.
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Per-group metrics are reported for at most this many groups of a split: every key is a Tune
# metric, a TensorBoard curve and an MLflow metric each epoch (docs/decisions.md).
MAX_GROUP_METRICS = 16


def split_of(sample_id: str, val_fraction: float, seed: int) -> str:
    """Deterministic split by id: adding or removing other samples never moves this one."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


@dataclass(frozen=True)
class GroupSplit:
    """Whole groups of samples to val: `group_by` the regex, `groups` each sample id's group."""

    group_by: str
    groups: dict[str, str]
    val_groups: tuple[str, ...]

    def split_of(self, sample_id: str) -> str:
        return "val" if self.groups[sample_id] in self.val_groups else "train"


def group_of(sample_id: str, pattern: re.Pattern) -> str | None:
    """The sample's group: the regex's first capture group if it has one, else what it matches."""
    found = pattern.search(sample_id)
    return (found.group(1 if pattern.groups else 0) or None) if found else None


def choose_val_groups(sizes: dict[str, int], val_fraction: float, seed: int) -> tuple[str, ...]:
    """A seeded choice of whole groups (at least one, never all) whose samples come closest to
    val_fraction of all. Groups are taken in an order drawn from (seed, name), so adding a group
    does not reorder the others."""
    order = sorted(sizes, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).digest())
    covered = list(itertools.accumulate(sizes[name] for name in order))
    target = val_fraction * covered[-1]
    count = min(range(1, len(order)), key=lambda k: abs(covered[k - 1] - target))
    return tuple(sorted(order[:count]))


def plan_group_split(ids: Sequence[str], group_by: str, val_groups: Sequence[str] | None,
                     val_fraction: float, seed: int) -> GroupSplit:
    """Every id's group by the regex `group_by`, and the groups that go to val: `val_groups`, or a
    seeded choice covering about val_fraction of the samples. Raises a one-line DataError naming
    the flag on a regex that does not compile or misses an id, an unknown group, or an empty split."""
    flag = f"--group-by {group_by!r}"
    try:
        pattern = re.compile(group_by)
    except re.error as err:
        raise DataError(f"{flag}: not a regular expression ({err})") from None
    groups = {sample_id: group_of(sample_id, pattern) for sample_id in ids}
    missed = [sample_id for sample_id, group in groups.items() if group is None]
    if len(missed) == len(ids):
        raise DataError(f"{flag}: matches none of the {len(ids)} sample ids (e.g. {ids[0]!r})")
    if missed:
        raise DataError(f"{flag}: does not match sample id {missed[0]!r} ({len(missed)} of {len(ids)} ids); every sample needs a group")
    for sample_id, group in groups.items():
        if not GROUP_NAME.fullmatch(group):
            raise DataError(f"{flag}: group {group!r} of sample {sample_id!r} is not a name of letters, digits, _, - and . "
                            "(it names metric keys)")
    sizes = dict(sorted(Counter(groups.values()).items()))
    chosen = _val_groups(flag, sizes, val_groups, val_fraction, seed)
    return GroupSplit(group_by, groups, chosen)


def _val_groups(flag: str, sizes: dict[str, int], val_groups, val_fraction: float, seed: int) -> tuple[str, ...]:
    known = ", ".join(list(sizes)[:12]) + (", ..." if len(sizes) > 12 else "")
    if len(sizes) < 2:
        raise DataError(f"{flag}: one group ({known}) cannot be split into train and val; use a regex that finds several")
    if val_groups is None:
        if val_fraction <= 0:
            raise DataError(f"{flag} with --val-fraction 0 puts no group in val; give --val-groups or a --val-fraction above 0")
        return choose_val_groups(sizes, val_fraction, seed)
    chosen = tuple(sorted(set(val_groups)))
    if not chosen:
        raise DataError(f"--val-groups: no group given (groups of {flag}: {known})")
    unknown = [name for name in chosen if name not in sizes]
    if unknown:
        raise DataError(f"--val-groups {unknown[0]!r}: no such group (groups of {flag}: {known})")
    if len(chosen) == len(sizes):
        raise DataError(f"--val-groups {','.join(chosen)}: every group in val leaves no training samples")
    return chosen


def metric_groups(manifest: dict, split: str) -> list[str]:
    """The groups of `split` that get their own metrics: none for a dataset sharded without
    --group-by, nor beyond MAX_GROUP_METRICS groups."""
    groups = sorted(manifest.get("groups", {}).get(split, {}))
    return groups if len(groups) <= MAX_GROUP_METRICS else []


def group_indices(names, ids, groups: list[str]) -> np.ndarray:
    """Each row's group as its index into `groups` (the manifest's), int64."""
    index = {name: position for position, name in enumerate(groups)}
    unknown = [(sample_id, name) for sample_id, name in zip(ids, names) if name not in index]
    if unknown:
        raise DataError(f"sample {unknown[0][0]!r}: its group {unknown[0][1]!r} is not one of the manifest's {groups}")
    return np.array([index[name] for name in names], dtype=np.int64)


def encode_mask(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _mask_values(fmt: DatasetFormat) -> int:
    """How many label values a mask holds: 0/1 for one class (binary), else one per class."""
    return max(len(fmt.classes), 2)


def _reason(err: Exception) -> str:
    if isinstance(err, Image.UnidentifiedImageError):  # its text names an in-memory buffer, not the file
        return "not an image file Pillow can decode"
    return " ".join(str(err).split()) or type(err).__name__


def _check_name(path) -> None:
    try:  # ids and paths are stored as UTF-8 text: a name in another encoding has no faithful copy there
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{path}: file name is not valid UTF-8; rename the file") from None


def _read_sample(sample: Sample, fmt: DatasetFormat) -> tuple[dict, np.ndarray]:
    """Decode and check one sample; raise DataError naming the file on any problem."""
    for path in (sample.image_path, sample.mask_path):
        _check_name(path)
    if sample.mask_path is None:
        raise DataError(f"{sample.image_path}: image has no mask")
    try:
        image_bytes = sample.image_path.read_bytes()
    except OSError as err:
        raise DataError(f"{sample.image_path}: cannot read the image ({file_problem(sample.image_path, err)})") from None
    try:
        with open_checked(io.BytesIO(image_bytes), sample.image_path) as image:
            check_8bit(image, sample.image_path)
            image.load()  # a full decode: truncated files only fail here
            width, height = image.size
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{sample.image_path}: unreadable image ({_reason(err)})") from None
    try:
        mask = fmt.load_mask(sample.mask_path)
    except DataError:
        raise  # already names the file (e.g. mask colours that are not classes)
    except Exception as err:
        if isinstance(err, OSError) and err.errno is not None:  # the file system's, not Pillow's (errno None)
            raise DataError(f"{sample.mask_path}: cannot read the mask ({file_problem(sample.mask_path, err)})") from None
        raise DataError(f"{sample.mask_path}: unreadable mask ({_reason(err)})") from None
    if mask.shape != (height, width):
        raise DataError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}"
        )
    bad = np.setdiff1d(np.unique(mask), [*range(_mask_values(fmt)), IGNORE_INDEX])
    if bad.size:
        raise DataError(f"{sample.mask_path}: mask values {bad.tolist()} are not classes of {fmt.name}")
    row = {
        "id": sample.id,
        "source": str(sample.image_path),
        "height": height,
        "width": width,
        "image": image_bytes,
        "mask": encode_mask(mask),
    }
    return row, mask


def write_shards(
    src: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    rows_per_shard: int = ROWS_PER_SHARD,
    skip_bad: bool = False,
    classes: Sequence[str] | None = None,
    class_map: str | os.PathLike | None = None,
    on_skip: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    group_by: str | None = None,
    val_groups: Sequence[str] | None = None,
) -> dict:
    """Shard the dataset at `src` into `out`; return the manifest.

    `src` and `out` are local paths or any pyarrow filesystem URI (s3://, gs://, file://).
    Atomic: everything is written into a hidden sibling directory on the same filesystem that is
    moved to `out` only when complete (manifest.json last where a filesystem cannot move folders),
    so an interrupted run leaves no dataset that looks finished. Such a run's hidden directory is
    removed by the next run into the same `out` once its process is provably gone (see leftovers.py).

    `classes` picks the targets: None keeps all of the format's classes (class indices 0..C-1),
    one name gives a binary mask (that class 1, every other labelled class 0). `class_map` is the
    folder format's class map, when not `src`/classes.yaml.

    `group_by`, a regex on the sample id, gives every sample a group (the `group` column) and makes
    the split by whole groups: `val_groups`, or a seeded choice covering about `val_fraction` of the
    samples. It replaces a dataset's own split (CamVid's), which is kept without it.
    """
    src_path, dataset_format = _source(src, fmt, val_fraction, classes, class_map)
    filesystem, out_path = filesystem_of(out)
    out_path = out_path.rstrip("/")
    try:
        occupied = _has_files(filesystem, out_path)
    except OSError as err:  # a folder on the way that cannot be searched or listed
        raise DataError(f"{out}: cannot use it as the output folder ({os.strerror(err.errno) if err.errno else err})") from None
    if occupied:
        raise DataError(f"{out}: already exists; choose another --out or remove it")
    samples = _samples(src, src_path, dataset_format)
    if val_groups is not None and group_by is None:
        raise DataError("--val-groups needs --group-by, the regex that gives each sample its group")
    grouping = None if group_by is None else plan_group_split([s.id for s in samples], group_by, val_groups, val_fraction, seed)
    tmp = leftovers.make_temp_dir(filesystem, out_path, str(out))
    try:
        manifest = _write(
            samples, dataset_format, filesystem, tmp, _Split(val_fraction, seed, grouping), rows_per_shard, skip_bad,
            on_skip or (lambda message: None), progress or (lambda done, total: None),
        )
        manifest["source"] = str(src_path)
        with filesystem.open_output_stream(f"{tmp}/{MANIFEST}") as stream:
            stream.write(json.dumps(manifest, indent=2).encode())
        leftovers.unmark(filesystem, tmp)
        _publish(filesystem, tmp, out_path, str(out))
    finally:
        if filesystem.get_file_info(tmp).type != pafs.FileType.NotFound:
            filesystem.delete_dir(tmp)
    return manifest


def _source(src, fmt: str, val_fraction: float, classes, class_map) -> tuple[Path, DatasetFormat]:
    """The dataset folder and its format (bound to its class map), checked before anything is written."""
    if fmt not in FORMATS:
        get_format(fmt)  # raises: unknown format
    # 0 is allowed from Python (all samples train; tests and CamVid, whose splits are its own, use it).
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction {val_fraction!r}: expected a number from 0 up to (not including) 1")
    src_path = as_path(src)
    # An unreadable folder, a link loop or a file where a folder belongs: one line naming it.
    with os_errors_named(src, "cannot read the dataset"):
        if not src_path.is_dir():
            raise DataError(f"{src}: dataset folder not found")
        dataset_format = get_format(fmt, classes, root=src_path, class_map=class_map)
    return src_path, dataset_format


def _samples(src, src_path: Path, dataset_format: DatasetFormat) -> list[Sample]:
    with os_errors_named(src, "cannot read the dataset"):
        samples = dataset_format.list_samples(src_path)
    if not samples:
        raise DataError(f"{src}: no samples found in the {dataset_format.name} layout")
    seen: dict[str, Sample] = {}
    for sample in samples:
        if sample.id in seen:  # one id, two files (a.png and a.jpg): one would silently be trained twice
            raise DataError(f"{seen[sample.id].image_path} and {sample.image_path}: two images of sample {sample.id!r}; keep one")
        seen[sample.id] = sample
    return samples


def _publish(filesystem: pafs.FileSystem, tmp: str, out: str, shown: str) -> None:
    """Move the finished `tmp` folder to `out` without ever deleting anything there.

    One rename where the filesystem can (local, HDFS): POSIX renames a folder onto an empty one and
    refuses a non-empty one, so a file that appeared in `out` while sharding survives. Object stores
    cannot move folders: there each file moves, manifest.json last, into an `out` still empty.
    """
    try:
        filesystem.move(tmp, out)
        return
    except (NotImplementedError, OSError):
        if _has_files(filesystem, out):
            raise DataError(f"{shown}: files appeared in it while sharding; left them alone and published nothing") from None
        if filesystem.get_file_info(out).type == pafs.FileType.NotFound and isinstance(filesystem, pafs.LocalFileSystem):
            raise  # a local rename onto nothing failed: a real I/O problem, not a folder move it cannot do
    names = sorted(info.base_name for info in filesystem.get_file_info(pafs.FileSelector(tmp)))
    names.sort(key=lambda name: name == MANIFEST)
    filesystem.create_dir(out)
    for name in names:
        filesystem.move(f"{tmp}/{name}", f"{out}/{name}")


def _has_files(filesystem: pafs.FileSystem, path: str) -> bool:
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        return bool(filesystem.get_file_info(pafs.FileSelector(path)))
    return kind != pafs.FileType.NotFound


@dataclass(frozen=True)
class _Split:
    """How samples are split: by id (val_fraction, seed), by a dataset's own split, or by whole groups."""

    val_fraction: float
    seed: int
    grouping: GroupSplit | None

    def of(self, sample: Sample) -> str:
        if self.grouping:
            return self.grouping.split_of(sample.id)
        return sample.split or split_of(sample.id, self.val_fraction, self.seed)

    def describe(self) -> dict:
        described = {"val_fraction": self.val_fraction, "seed": self.seed}
        if self.grouping:
            described.update(group_by=self.grouping.group_by, val_groups=list(self.grouping.val_groups))
        return described


def _write(samples, fmt, filesystem, tmp, split_rule: _Split, rows_per_shard, skip_bad, on_skip, progress) -> dict:
    pixel_counts = np.zeros(_mask_values(fmt), dtype=np.int64)
    buffers: dict[str, list[dict]] = {split: [] for split in SPLITS}
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    counts = {split: 0 for split in SPLITS}
    group_counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    skipped = []
    grouping = split_rule.grouping
    schema = GROUPED_SCHEMA if grouping else SCHEMA

    def flush(split: str) -> None:
        name = f"{split}-{len(files[split]):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(buffers[split], schema=schema), f"{tmp}/{name}", filesystem=filesystem)
        files[split].append(name)
        buffers[split].clear()

    for done, sample in enumerate(samples, start=1):
        try:
            row, mask = _read_sample(sample, fmt)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
            on_skip(str(err))
            continue
        split = row["split"] = split_rule.of(sample)
        if grouping:
            group = row["group"] = grouping.groups[sample.id]
            group_counts[split][group] = group_counts[split].get(group, 0) + 1
        pixel_counts += np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=len(pixel_counts))
        buffers[split].append(row)
        counts[split] += 1
        if len(buffers[split]) >= rows_per_shard:
            flush(split)
        progress(done, len(samples))
    for split in SPLITS:
        if buffers[split]:
            flush(split)
    _check_split(fmt, counts, split_rule.val_fraction, own_splits=not grouping and any(sample.split for sample in samples))
    manifest = _manifest(fmt, counts, files, split_rule.describe(), pixel_counts, skipped)
    if grouping:
        manifest["groups"] = {split: dict(sorted(group_counts[split].items())) for split in SPLITS}
    return manifest


def _check_split(fmt: DatasetFormat, counts: dict[str, int], val_fraction: float, own_splits: bool) -> None:
    if counts["train"] == 0:
        raise DataError(f"{fmt.name}: no training samples left after the split (val_fraction={val_fraction})")
    # Only a split made here by val_fraction; a dataset's own splits (CamVid) are what they are.
    if counts["val"] == 0 and val_fraction > 0 and not own_splits:
        raise DataError(
            f"{fmt.name}: 0 val samples after the split (val_fraction={val_fraction}, {counts['train']} samples); "
            "raise --val-fraction or add samples"
        )


def _manifest(fmt: DatasetFormat, counts, files, split: dict, pixel_counts: np.ndarray, skipped: list[str]) -> dict:
    num_classes = len(fmt.classes)
    names = ["background", *fmt.classes] if num_classes == 1 else list(fmt.classes)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": fmt.name,
        "classes": [
            # A binary mask stores the one class as 1 (0 is background).
            {"name": name, "id": index + (num_classes == 1), "color": list(color)}
            for index, (name, color) in enumerate(zip(fmt.classes, fmt.colors))
        ],
        "ignore_index": IGNORE_INDEX,
        "num_samples": counts,
        "files": files,
        "split": split,
        "pixel_frequencies": {name: float(c) / max(1, int(pixel_counts.sum())) for name, c in zip(names, pixel_counts)},
        "skipped": skipped,
    }


def read_manifest(dataset: str | os.PathLike) -> dict:
    """The manifest of a sharded dataset: a local folder or any pyarrow filesystem URI."""
    path = join(dataset, MANIFEST)
    filesystem, manifest_path = filesystem_of(path)
    if filesystem.get_file_info(manifest_path).type != pafs.FileType.File:
        raise DataError(f"{path}: no manifest; shard the data first with `raytrain data shard`")
    try:
        with filesystem.open_input_stream(manifest_path) as stream:
            manifest = json.loads(stream.read())
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({file_problem(as_path(path), err)})") from None
    except ValueError as err:  # JSONDecodeError, and bytes that are not UTF-8 at all
        raise DataError(f"{path}: not valid JSON ({' '.join(str(err).split())})") from None
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
    return manifest


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


def shard_paths(dataset: str | os.PathLike, split: str) -> list[str]:
    """The split's Parquet files: local paths for local data (file:// included), else URIs."""
    manifest = read_manifest(dataset)
    filesystem, root = filesystem_of(dataset)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return [join(dataset, name) for name in manifest["files"][split]]
    root_path = Path(root).resolve()
    paths = [(root_path / name).resolve() for name in manifest["files"][split]]
    for name, path in zip(manifest["files"][split], paths):
        if not path.is_relative_to(root_path):  # a symbolic link inside that leads out
            raise DataError(f"{join(dataset, MANIFEST)}: files.{split} entry {name!r} leads outside the dataset folder, to {path}")
    return [str(path) for path in paths]
