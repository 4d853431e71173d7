"""Opening and decoding images. Files a user hands over (datasets to shard, images to predict or
serve) open through `open_checked`: the pixel limit (RAYTRAIN_MAX_PIXELS) read from the header
before anything is decoded, 8 bits per channel, and any failure a one-line DataError naming the
file. `decode_image` and `decode_mask` decode the bytes of shard rows.
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

from raytrain.errors import DataError, limit_from_env
from raytrain.storage.paths import RemotePath

MAX_PIXELS_ENV = "RAYTRAIN_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000  # road images are a few megapixels; a small PNG can claim gigabytes


def max_pixels() -> int:
    return limit_from_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "pixels", DataError)


def open_checked(source, path) -> Image.Image:
    """Image.open (which reads only the header) with raytrain's pixel limit checked before any decode.

    Pillow's own bomb check warns on stderr from 89 megapixels and raises past 179: our limit
    replaces the warning, and its error becomes the same one-line DataError.
    """
    limit = max_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as err:
            found = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{found.group(1)} pixels" if found else "too many pixels"
            raise DataError(f"{path}: image of {size} is over the limit of {limit} pixels ({MAX_PIXELS_ENV})") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise DataError(f"{path}: image is {width}x{height}, over the limit of {limit} pixels ({MAX_PIXELS_ENV})")
    return image


def open_image(path: Path) -> Image.Image:
    """Open an image file, local or on a remote filesystem (a RemotePath), within the pixel limit."""
    return open_checked(io.BytesIO(path.read_bytes()), path)


# Pillow modes with 8 bits per channel: a 16-bit or float image converted to RGB clips to white.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


def check_8bit(image: Image.Image, path: Path, what: str = "image") -> None:
    if image.mode not in EIGHT_BIT_MODES:
        raise DataError(f"{path}: {what} is Pillow mode {image.mode} (16-bit or float), expected 8 bits per channel")


def read_rgb(source, name=None, formats: Sequence[str] | None = None) -> np.ndarray:
    """An 8-bit image (a path, a RemotePath or a binary file object) as an RGB array (H, W, 3), checked
    against the pixel limit before it is decoded; a one-line DataError naming it (or `name`) otherwise.
    formats: the Pillow formats accepted (e.g. PNG, JPEG); default any that Pillow reads."""
    name = source if name is None else name
    try:
        with contextlib.ExitStack() as opened:
            if isinstance(source, RemotePath):  # closed here: Pillow leaves a stream it was given open
                source = opened.enter_context(source.filesystem.open_input_file(source.path))
            image = opened.enter_context(open_checked(source, name))
            if formats is not None and image.format not in formats:
                raise DataError(f"{name}: a {image.format} image, expected {' or '.join(formats)}")
            check_8bit(image, name)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{name}: not a readable image ({err.__class__.__name__})") from None


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as mask:
        return np.asarray(mask)
