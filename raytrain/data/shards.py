"""A dataset folder -> Parquet shards plus manifest.json, validated once, written atomically.

Each row holds one sample: its id, source path, split, height, width, the image file's bytes as
they were on disk (PNG or JPEG, not re-encoded) and the mask as a class-index PNG (IGNORE_INDEX
where unknown); with --group-by also its group (a drive, a KITTI category), and whole groups
make up the val split. Every image and mask is decoded here once, so a corrupt file or a mismatched
mask fails now with its file named, not hours into training.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from raytrain.data.formats import FORMATS, IGNORE_INDEX, DatasetFormat, Sample, get_format, os_errors_named
from raytrain.data.images import MAX_PIXELS_ENV, check_8bit, max_image_bytes, open_image
from raytrain.data.manifest import MANIFEST, SCHEMA_VERSION, SPLITS, Manifest
from raytrain.data.splits import SplitRule, plan_group_split
from raytrain.errors import FRACTION, DataError
from raytrain.storage import leftovers
from raytrain.storage.atomic import write_errors_named
from raytrain.storage.paths import as_path, filesystem_of
from raytrain.storage.reading import read_bounded


# One Parquet file is one Ray Data read task: small files let every CPU decode (a 230-image KITTI
# train split in 256-row files was a single task on one CPU) and shuffle files at a fine grain.
ROWS_PER_SHARD = 32

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


def encode_mask(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _mask_values(fmt: DatasetFormat) -> int:
    """How many label values a mask holds: 0/1 for one class (binary), else one per class."""
    return max(len(fmt.classes), 2)


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
    image_bytes = read_bounded(sample.image_path, max_image_bytes(), "image", DataError, MAX_PIXELS_ENV)  # kept as they are
    with open_image(image_bytes, sample.image_path) as image:  # a full decode: damaged files fail now
        check_8bit(image, sample.image_path)
        width, height = image.size
    mask = fmt.load_mask(sample.mask_path)  # through open_image too: its errors name the mask
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
) -> Manifest:
    """Shard the dataset at `src` into `out`; return its manifest.

    `src` and `out` are local paths or any pyarrow filesystem URI (s3://, gs://, file://).
    Atomic: everything is written into a hidden sibling directory on the same filesystem that is
    moved to `out` only when complete (manifest.json last where a filesystem cannot move folders),
    so an interrupted run leaves no dataset that looks finished. Such a run's hidden directory is
    removed by the next run into the same `out` once its process is provably gone (see storage/leftovers.py).

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
        with write_errors_named(out):  # a full disk: one line naming out (a sample's read errors name the sample)
            written = _write(
                samples, dataset_format, filesystem, tmp, SplitRule(val_fraction, seed, grouping), rows_per_shard, skip_bad,
                on_skip or (lambda message: None), progress or (lambda done, total: None),
            )
            manifest = Manifest.model_validate({**written, "source": str(src_path)}).at(out)
            with filesystem.open_output_stream(f"{tmp}/{MANIFEST}") as stream:
                stream.write(manifest.to_json().encode())
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
    FRACTION.check("val_fraction", val_fraction, DataError)
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


def _write(samples, fmt, filesystem, tmp, split_rule: SplitRule, rows_per_shard, skip_bad, on_skip, progress) -> dict:
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
