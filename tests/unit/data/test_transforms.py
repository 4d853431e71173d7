"""Decode and resize (all a Ray Data task does to an image): image bilinear, mask nearest, image and
mask pixel-aligned. Augmentation is the training device's: tests/unit/training/test_augment.py."""
import io

import numpy as np
import pytest
from PIL import Image

from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.pipeline import decode_block
from raytrain.data.transforms import decode_batch, decode_sample, resize
from raytrain.errors import DataError
from tests.helpers import broken_png, png_header


def encode(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pattern(width=48, height=24):
    """A mask of vertical class stripes, and an image whose red channel encodes the same classes."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 3 : 2 * width // 3] = 1
    mask[: height // 4] = IGNORE_INDEX
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.where(mask == 1, 250, 0)
    image[..., 1] = np.where(mask == IGNORE_INDEX, 250, 0)
    return image, mask


def test_a_batch_is_decoded_and_resized_the_same_every_time():
    image, mask = pattern()
    batch = {"id": np.array(["a", "b"]), "image": np.array([encode(image)] * 2, dtype=object), "mask": np.array([encode(mask)] * 2, dtype=object)}
    first = decode_batch(batch, (24, 12))
    second = decode_batch(batch, (24, 12))
    assert first["image"].shape == (2, 12, 24, 3) and first["image"].dtype == np.uint8
    assert first["mask"].shape == (2, 12, 24) and first["mask"].dtype == np.uint8
    assert list(first["id"]) == ["a", "b"]
    assert np.array_equal(first["image"], second["image"]) and np.array_equal(first["mask"], second["mask"])
    expected = np.asarray(Image.fromarray(mask).resize((24, 12), Image.NEAREST))
    assert np.array_equal(first["mask"][0], expected)


def test_resize_keeps_labels_unblended_and_aligned():
    image, mask = pattern()
    out_image, out_mask = decode_sample(encode(image), encode(mask), (32, 16))
    assert set(np.unique(out_mask)) <= {0, 1, IGNORE_INDEX}  # nearest: labels never blended
    confident = (np.abs(out_image[..., 0].astype(int) - 125) > 100) & (out_image[..., 1] < 125) & (out_mask != IGNORE_INDEX)
    assert confident.sum() > 0
    assert np.array_equal(out_image[..., 0][confident] > 125, out_mask[confident] == 1)


def test_resize_to_the_same_size_returns_the_arrays_themselves():
    image, mask = pattern()
    out_image, out_mask = resize(image, mask, (48, 24))
    assert out_image is image and out_mask is mask


def block_with(column: str, data: bytes) -> dict:
    """Two shard rows, a and b, whose `column` in row b is `data`."""
    image, mask = pattern()
    block = {"id": np.array(["a", "b"]), "image": np.array([encode(image)] * 2, dtype=object), "mask": np.array([encode(mask)] * 2, dtype=object)}
    block[column][1] = data
    return block


@pytest.mark.parametrize("column", ["image", "mask"])
def test_a_bomb_in_a_shard_row_is_refused_from_its_header_naming_the_row(tmp_path, column):
    """What each Ray Data decode task runs: a 10-gigapixel header is refused before any decode."""
    png_header(tmp_path / "bomb.png", 100000, 100000)
    with pytest.raises(DataError, match=rf"^/data/shards: sample 'b': {column} of 10000000000 pixels is over the limit"):
        list(decode_block(block_with(column, (tmp_path / "bomb.png").read_bytes()), (24, 12), dataset="/data/shards"))


@pytest.mark.parametrize("damage", ["truncated-gama", "junk-chunk"])
def test_a_damaged_png_in_a_shard_row_is_a_data_error_naming_the_row(damage):
    with pytest.raises(DataError, match=r"^/data/shards: sample 'b': not a readable image"):
        list(decode_block(block_with("image", broken_png(damage)), (24, 12), dataset="/data/shards"))
