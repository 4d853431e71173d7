"""The one image decoder, for every image raytrain reads: dataset files to shard, shard rows (Ray
Data's decode tasks, evaluate, report), images to predict, request bodies to serve.

A file is read only when it is a regular file within max_image_bytes() (storage.reading); the pixel
limit (RAYTRAIN_MAX_PIXELS) is checked from the header before anything is decoded; and whatever
Pillow raises on a damaged image (OSError, ValueError, SyntaxError, ...) is the same one-line
DataError naming the image.
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from raytrain.errors import DataError, first_line, limit_from_env
from raytrain.storage.reading import read_bounded

MAX_PIXELS_ENV = "RAYTRAIN_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000  # road images are a few megapixels; a small PNG can claim gigabytes
# An encoded 8-bit image holds at most 4 bytes a pixel (RGBA, stored) and some headers and chunks.
BYTES_PER_PIXEL = 4
IMAGE_HEADROOM = 1 << 20


def max_pixels() -> int:
    return limit_from_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "pixels", DataError)


def max_image_bytes() -> int:
    """The most bytes an image file (or a request body to serve) may have, from the pixel limit."""
    return BYTES_PER_PIXEL * max_pixels() + IMAGE_HEADROOM


@contextlib.contextmanager
def _pillow_errors(name, what: str):
    """Any failure of Pillow's on a damaged image as one DataError naming it."""
    try:
        yield
    except (DataError, MemoryError):
        raise
    except Image.DecompressionBombError as err:  # past twice Pillow's own limit, before ours is checked
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise DataError(f"{name}: {what} of {size} is over the limit of {max_pixels()} pixels ({MAX_PIXELS_ENV})") from None
    except Exception as err:  # noqa: BLE001 - a damaged image fails in many ways; all are the same one-line error
        reason = type(err).__name__ if isinstance(err, UnidentifiedImageError) else first_line(err)  # its text names a buffer
        raise DataError(f"{name}: not a readable {what} ({reason})") from None


def open_image(source, name=None, formats: Sequence[str] | None = None, what: str = "image") -> Image.Image:
    """An image, decoded, from its encoded bytes or a file (a path or a RemotePath): the pixel limit
    checked from the header first; a one-line DataError naming it (or `name`) otherwise.
    formats: the Pillow formats accepted (e.g. PNG, JPEG); default any that Pillow reads.
    what: "image" or "mask", as the errors call it."""
    name = source if name is None else name
    data = source if isinstance(source, bytes) else read_bounded(source, max_image_bytes(), what, DataError, MAX_PIXELS_ENV)
    limit = max_pixels()
    with _pillow_errors(name, what), warnings.catch_warnings():
        # Pillow's own bomb check warns on stderr from 89 megapixels: our limit replaces the warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        try:
            width, height = image.size
            if width * height > limit:
                raise DataError(f"{name}: {what} is {width}x{height}, over the limit of {limit} pixels ({MAX_PIXELS_ENV})")
            if formats is not None and image.format not in formats:
                raise DataError(f"{name}: a {image.format} image, expected {' or '.join(formats)}")
            image.load()  # the whole decode, here: a truncated or damaged file fails now, not later
        except BaseException:
            image.close()
            raise
    return image


# Pillow modes with 8 bits per channel: a 16-bit or float image converted to RGB clips to white.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


def check_8bit(image: Image.Image, path: Path, what: str = "image") -> None:
    if image.mode not in EIGHT_BIT_MODES:
        raise DataError(f"{path}: {what} is Pillow mode {image.mode} (16-bit or float), expected 8 bits per channel")


def read_rgb(source, name=None, formats: Sequence[str] | None = None) -> np.ndarray:
    """An 8-bit image (encoded bytes, a path or a RemotePath) as an RGB array (H, W, 3), through
    open_image; a one-line DataError naming it (or `name`) otherwise."""
    name = source if name is None else name
    with open_image(source, name, formats) as image, _pillow_errors(name, "image"):
        check_8bit(image, name)
        # convert() copies even an RGB image
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def read_labels(source, name=None) -> np.ndarray:
    """A mask of class indices as shards store it (one 8-bit channel) as a uint8 array (H, W)."""
    name = source if name is None else name
    with open_image(source, name, what="mask") as mask, _pillow_errors(name, "mask"):
        if mask.mode not in ("L", "P"):
            raise DataError(f"{name}: mask is Pillow mode {mask.mode}, expected one 8-bit channel of class indices")
        return np.asarray(mask)
