"""Dataset formats on disk -> samples (image path, class-index mask).

Every reader turns its format's ground truth into one convention: a uint8 mask holding the class
index of each pixel, with IGNORE_INDEX where the label is unknown (outside KITTI's valid area,
CamVid's void). Shards, the pipeline, losses and metrics only ever see that convention.
"""
from __future__ import annotations

import fnmatch
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from raytrain.data.images import check_8bit, open_image
from raytrain.errors import DataError
from raytrain.storage.paths import as_path
from raytrain.storage.reading import file_problem

IGNORE_INDEX = 255

# KITTI road ground truth colours: blue > 0 marks road, red == 0 marks pixels outside the valid area.
KITTI_ROAD_RGB = (255, 0, 255)
KITTI_NON_ROAD_RGB = (255, 0, 0)
KITTI_INVALID_RGB = (0, 0, 0)


def encode_kitti_gt(road: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Boolean road mask (H, W) -> KITTI ground-truth RGB image (H, W, 3) uint8."""
    road = np.asarray(road, dtype=bool)
    rgb = np.empty(road.shape + (3,), dtype=np.uint8)
    rgb[...] = KITTI_NON_ROAD_RGB
    rgb[road] = KITTI_ROAD_RGB
    if valid is not None:
        rgb[~np.asarray(valid, dtype=bool)] = KITTI_INVALID_RGB
    return rgb


def decode_kitti_gt(rgb: np.ndarray) -> np.ndarray:
    """KITTI ground-truth RGB (H, W, 3) -> uint8 labels: 1 road, 0 not road, IGNORE_INDEX invalid."""
    rgb = np.asarray(rgb)
    labels = (rgb[..., 2] > 0).astype(np.uint8)
    labels[rgb[..., 0] == 0] = IGNORE_INDEX
    return labels


@contextmanager
def os_errors_named(fallback, what: str):
    """Turn an OSError into a one-line DataError naming the file it is about (else `fallback`)."""
    try:
        yield
    except OSError as err:
        path = err.filename if err.filename is not None else fallback
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        raise DataError(f"{path}: {what} ({file_problem(Path(path) if isinstance(path, str) else path, err)})") from None


def present(path) -> bool:
    """Whether anything is at `path`, a broken link included (it is then an error, not a missing file)."""
    return path.exists() or (isinstance(path, Path) and path.is_symlink())


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth, as found on disk."""

    id: str
    image_path: Path
    mask_path: Path | None
    split: str | None = None  # the dataset's own split, when it has one


@dataclass(frozen=True)
class DatasetFormat:
    """One on-disk layout. `classes`/`colors` describe the masks `load_mask` returns: one class means
    a binary mask (0 background, 1 the class), more mean class indices 0..C-1; IGNORE_INDEX is unknown.
    """

    name: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    list_samples: Callable[[Path], list[Sample]]
    load_mask: Callable[[Path], np.ndarray]  # -> uint8 class indices, IGNORE_INDEX where unknown
    # Formats whose classes are defined by the dataset itself (folder: its class map) resolve them
    # here from the dataset root and an optional class-map path, returning the bound format.
    resolve: Callable[[Path | None, Path | None], "DatasetFormat"] | None = None
    # Single-class targets that come from other ground-truth files of the same images (KITTI's ego
    # lane, `*_lane_*`): `with_classes([name])` returns that format instead of a binary view.
    alternatives: dict[str, "DatasetFormat"] = field(default_factory=dict)

    def with_classes(self, classes: Sequence[str] | None) -> "DatasetFormat":
        """This format with only `classes` as targets.

        None (or all classes, in this order) keeps the format as it is; one class gives a binary
        mask (that class 1, every other labelled class 0, unknown stays IGNORE_INDEX); all classes in
        another order renumbers them. Names match case-insensitively.
        """
        if classes is None:
            return self
        wanted = [str(name).strip().lower() for name in classes]
        if len(wanted) == 1 and wanted[0] in self.alternatives:
            return self.alternatives[wanted[0]]
        known = [name.lower() for name in self.classes]
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted or len(set(wanted)) != len(wanted):
            alternatives = "".join(f"; or {name} alone" for name in self.alternatives)
            raise DataError(
                f"classes {list(classes)} do not fit the {self.name} format "
                f"(its classes: {', '.join(self.classes) or 'none'}; give one class for a binary mask, "
                f"or all of them{alternatives})"
            )
        if wanted == known:
            return self
        if len(wanted) == 1:
            target = known.index(wanted[0])
            keep = (self.classes[target],)
            colors = (self.colors[target],)
            # Unknown raw values pass through unchanged (>= 2), so validation still reports them.
            lut = np.arange(256, dtype=np.uint8)
            lut[: len(known)] = 0
            lut[target] = 1
        elif len(wanted) == len(known):
            order = [known.index(name) for name in wanted]
            keep = tuple(self.classes[i] for i in order)
            colors = tuple(self.colors[i] for i in order)
            lut = np.arange(256, dtype=np.uint8)
            for new_index, old_index in enumerate(order):
                lut[old_index] = new_index
        else:
            raise DataError(
                f"classes {list(classes)}: give one class of {self.name} for a binary mask, or all of its "
                f"{len(known)} classes ({', '.join(self.classes)})"
            )
        load = self.load_mask
        return replace(self, classes=keep, colors=colors, load_mask=lambda path: lut[load(path)])


def _glob(folder: Path, pattern: str) -> list[Path]:
    # Not Path.glob: it answers an unreadable folder with no files, where this raises PermissionError.
    return [path for path in folder.iterdir() if fnmatch.fnmatchcase(path.name, pattern)]


def _kitti_lister(target: str) -> Callable[[Path], list[Sample]]:
    """Samples of the KITTI road layout with `target` ground truth: "road" or "lane" (ego lane)."""

    def list_samples(root: Path) -> list[Sample]:
        image_dir, gt_dir = root / "training" / "image_2", root / "training" / "gt_image_2"
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: not found (KITTI layout: training/image_2 and training/gt_image_2)")
        # Only some categories (um) have lane ground truth; images of the others are not lane samples.
        categories = None
        if target != "road":
            found = _glob(gt_dir, f"*_{target}_*.png") if gt_dir.is_dir() else []
            categories = {path.stem.rsplit(f"_{target}_", 1)[0] for path in found}
        samples = []
        for image_path in sorted(_glob(image_dir, "*.png")):
            # um_000000.png -> gt_image_2/um_road_000000.png (or um_lane_000000.png)
            category, _, number = image_path.stem.rpartition("_")
            if categories is not None and category not in categories:
                continue
            mask_path = gt_dir / f"{category}_{target}_{number}.png"
            samples.append(Sample(image_path.stem, image_path, mask_path if present(mask_path) else None))
        return samples

    return list_samples


def _load_kitti_mask(path: Path) -> np.ndarray:
    with open_image(path, what="mask") as gt:
        # Only what KITTI defines: anything else (grayscale, 16-bit, other colours) would decode as road.
        if gt.mode != "RGB":
            raise DataError(f"{path}: KITTI mask is Pillow mode {gt.mode}, expected 8-bit RGB in the KITTI colours")
        rgb = np.asarray(gt)
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    palette = [(r << 16) | (g << 8) | b for r, g, b in (KITTI_ROAD_RGB, KITTI_NON_ROAD_RGB, KITTI_INVALID_RGB)]
    unknown = ~np.isin(code, palette)
    if unknown.any():
        y, x = np.argwhere(unknown)[0]
        raise DataError(
            f"{path}: colour {list(map(int, rgb[y, x]))} at x={x}, y={y} is not a KITTI colour "
            f"(road {list(KITTI_ROAD_RGB)}, not road {list(KITTI_NON_ROAD_RGB)}, invalid {list(KITTI_INVALID_RGB)})"
        )
    return decode_kitti_gt(rgb)


# --- CamVid (SegNet's 11-class version) --------------------------------------------------------

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
CAMVID_VOID = 11
CAMVID_SPLITS = ("train", "val")  # the dataset's test split is never read
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _images(folder: Path) -> list[Path]:
    # Not only files: a folder or broken link named like an image is an error naming it when read,
    # not a sample silently left out.
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _list_camvid(root: Path) -> list[Sample]:
    if not any((root / split).is_dir() for split in CAMVID_SPLITS):
        raise DataError(f"{root}: no train/ or val/ folder (CamVid layout: train/, trainannot/, val/, valannot/)")
    samples = []
    for split in CAMVID_SPLITS:
        if not (root / split).is_dir():
            continue
        for image_path in _images(root / split):
            mask_path = root / f"{split}annot" / f"{image_path.stem}.png"
            samples.append(Sample(image_path.stem, image_path, mask_path if present(mask_path) else None, split))
    return samples


def _single_channel(path: Path) -> np.ndarray:
    with open_image(path, what="mask") as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{path}: mask is {mask.mode}, expected one channel of class indices")
        return np.asarray(mask)


def _load_camvid_mask(path: Path) -> np.ndarray:
    raw = _single_channel(path)
    if raw.max(initial=0) > 255:
        raise DataError(f"{path}: mask values above 255 are not classes of camvid")
    mask = raw.astype(np.uint8)
    mask[mask == CAMVID_VOID] = IGNORE_INDEX  # other values > 10 are left for validation to report
    return mask


# --- Generic folder: images/ + masks/ + classes.yaml --------------------------------------------

CLASS_MAP = "classes.yaml"


def _list_folder(root: Path) -> list[Sample]:
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: not found (folder layout: images/, masks/ and {CLASS_MAP})")
    samples = []
    for image_path in _images(image_dir):
        mask_path = mask_dir / f"{image_path.stem}.png"
        samples.append(Sample(image_path.stem, image_path, mask_path if present(mask_path) else None))
    return samples


def _unbound_folder_mask(path: Path) -> np.ndarray:
    raise DataError("folder: no class map loaded; use get_format('folder', root=...)")


def _color(value, where: str) -> tuple[int, int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value)):
        raise DataError(f"{where}: colour must be [r, g, b] with integers 0..255, got {value!r}")
    return tuple(value)


def _read_class_map(path: Path) -> dict:
    from raytrain.storage.safe_yaml import load_yaml_file

    if not path.is_file():
        raise DataError(f"{path}: class map not found (folder format needs {CLASS_MAP} or class_map=)")
    data = load_yaml_file(path, DataError, "class map")
    entries = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: expected `classes:` with a list of {{name, color}} or {{name, index}} entries")
    return data


def _resolve_folder(root: Path | None, class_map: Path | None) -> DatasetFormat:
    if class_map is None:
        if root is None:
            raise DataError("folder: needs the dataset root or a class_map path")
        class_map = root / CLASS_MAP
    path = as_path(class_map).expanduser()
    data = _read_class_map(path)
    entries = data["classes"]
    names = [str(e.get("name", "")).strip() for e in entries]
    if not all(names) or len({n.lower() for n in names}) != len(names):
        raise DataError(f"{path}: every class needs a unique `name`")
    if len(names) > 254:
        raise DataError(f"{path}: at most 254 classes, got {len(names)}")
    # Indices when every class has one (a `color` then only names its display colour), else palette colours.
    if all("index" in e for e in entries):
        return _index_folder(path, data, names)
    if not all("color" in e for e in entries):
        raise DataError(f"{path}: give every class a `color` (RGB masks) or every class an `index` (index masks)")
    return _color_folder(path, data, names)


def _color_folder(path: Path, data: dict, names: list[str]) -> DatasetFormat:
    """The folder format for RGB masks: each class is one colour of the class map."""
    colors = tuple(_color(e["color"], f"{path}: class {n}") for e, n in zip(data["classes"], names))
    ignore = data.get("ignore_color")
    ignore = _color(ignore, f"{path}: ignore_color") if ignore is not None else None
    if len(set(colors)) != len(colors) or ignore in colors:
        raise DataError(f"{path}: class colours (and ignore_color) must all differ")
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colors], dtype=np.int64)
    order = np.argsort(codes)
    ignore_code = None if ignore is None else (ignore[0] << 16) | (ignore[1] << 8) | ignore[2]

    def load_mask(mask_path: Path) -> np.ndarray:
        with open_image(mask_path, what="mask") as mask:
            check_8bit(mask, mask_path, "mask")
            rgb = np.asarray(mask.convert("RGB")).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(code.shape, IGNORE_INDEX, dtype=np.uint8)
        pos = np.clip(np.searchsorted(codes, code, sorter=order), 0, len(codes) - 1)
        found = codes[order][pos] == code
        out[found] = order[pos[found]]
        unknown = ~found if ignore_code is None else ~found & (code != ignore_code)
        if unknown.any():
            bad = [[(c >> 16) & 255, (c >> 8) & 255, c & 255] for c in np.unique(code[unknown])[:5].tolist()]
            raise DataError(f"{mask_path}: mask colours {bad} are not classes of folder (class map {path})")
        return out

    return replace(FOLDER, classes=tuple(names), colors=colors, load_mask=load_mask, resolve=None)


def _index_folder(path: Path, data: dict, names: list[str]) -> DatasetFormat:
    """The folder format for index masks: each class is one pixel value of the class map."""
    entries = data["classes"]
    indices = [e["index"] for e in entries]
    ignore_index = data.get("ignore_index")
    if not all(isinstance(i, int) and 0 <= i <= 255 for i in [*indices, *([ignore_index] if ignore_index is not None else [])]):
        raise DataError(f"{path}: class indices and ignore_index must be integers 0..255")
    if len(set(indices)) != len(indices) or ignore_index in indices:
        raise DataError(f"{path}: class indices (and ignore_index) must all differ")
    # Classes are numbered in index order, so a map with indices 0..C-1 keeps the file's values.
    ranked = sorted(range(len(entries)), key=lambda i: indices[i])
    names = [names[i] for i in ranked]
    colors = tuple(
        _color(entries[i]["color"], f"{path}: class {names[k]}") if "color" in entries[i] else _default_color(k)
        for k, i in enumerate(ranked)
    )
    lut = np.full(256, -1, dtype=np.int64)
    for new_index, i in enumerate(ranked):
        lut[indices[i]] = new_index
    if ignore_index is not None:
        lut[ignore_index] = IGNORE_INDEX

    def load_index_mask(mask_path: Path) -> np.ndarray:
        raw = _single_channel(mask_path).astype(np.int64)
        if raw.max(initial=0) > 255:
            raise DataError(f"{mask_path}: mask values {np.unique(raw[raw > 255])[:5].tolist()} are not classes of folder")
        mapped = lut[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0])[:10].tolist()
            raise DataError(f"{mask_path}: mask values {bad} are not classes of folder (class map {path})")
        return mapped.astype(np.uint8)

    return replace(FOLDER, classes=tuple(names), colors=colors, load_mask=load_index_mask, resolve=None)


def _default_color(index: int) -> tuple[int, int, int]:
    """A stable, distinct colour for classes given by index only (used in the manifest)."""
    # Pascal VOC's bit-interleaved palette.
    r = g = b = 0
    cid = index + 1
    for shift in range(7, -1, -1):
        r |= ((cid >> 0) & 1) << shift
        g |= ((cid >> 1) & 1) << shift
        b |= ((cid >> 2) & 1) << shift
        cid >>= 3
    return (r, g, b)


FOLDER = DatasetFormat("folder", (), (), _list_folder, _unbound_folder_mask, resolve=_resolve_folder)

FORMATS: dict[str, DatasetFormat] = {
    "kitti": DatasetFormat(
        "kitti", ("road",), (KITTI_ROAD_RGB,), _kitti_lister("road"), _load_kitti_mask,
        # The ego-lane masks use the road masks' colours: magenta lane, red not lane, black invalid.
        alternatives={"lane": DatasetFormat("kitti", ("lane",), (KITTI_ROAD_RGB,), _kitti_lister("lane"), _load_kitti_mask)},
    ),
    "camvid": DatasetFormat("camvid", CAMVID_CLASSES, CAMVID_COLORS, _list_camvid, _load_camvid_mask),
    "folder": FOLDER,
}


def get_format(
    name: str,
    classes: Sequence[str] | None = None,
    *,
    root: str | os.PathLike | None = None,
    class_map: str | os.PathLike | None = None,
) -> DatasetFormat:
    """The format `name`, bound to the dataset at `root` where its classes come from the data
    (folder), restricted to `classes` (one name: a binary mask; None: all classes)."""
    if name not in FORMATS:
        raise DataError(f"unknown dataset format {name!r} (known: {', '.join(FORMATS)})")
    fmt = FORMATS[name]
    if fmt.resolve is not None:
        fmt = fmt.resolve(None if root is None else as_path(root), None if class_map is None else as_path(class_map))
    elif class_map is not None:
        raise DataError(f"class_map applies to the folder format, not {name}")
    return fmt.with_classes(classes)
