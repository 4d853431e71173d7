"""Decode, resize and augment keep image and mask pixel-aligned; validation is not augmented."""
import io

import numpy as np
from PIL import Image

from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.transforms import Augment, transform_batch, transform_sample


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


def test_augmented_image_and_mask_stay_aligned():
    image, mask = pattern()
    rng = np.random.default_rng(0)
    augment = Augment(hflip=0.5, scale=(0.6, 1.6), color_jitter=0.0)
    for _ in range(30):
        out_image, out_mask = transform_sample(encode(image), encode(mask), (32, 16), augment, rng)
        assert out_image.shape == (16, 32, 3) and out_mask.shape == (16, 32)
        # Away from class boundaries (where bilinear blends), the image says which class each pixel is.
        confident = (np.abs(out_image[..., 0].astype(int) - 125) > 100) & (np.abs(out_image[..., 1].astype(int) - 125) > 100)
        road_in_image = out_image[..., 0] > 125
        labelled = out_mask != IGNORE_INDEX
        both = confident & labelled & (out_image[..., 1] < 125)
        assert both.sum() > 0
        assert np.array_equal(road_in_image[both], out_mask[both] == 1)
        assert set(np.unique(out_mask)) <= {0, 1, IGNORE_INDEX}  # nearest: labels never blended


def test_validation_is_resized_not_augmented():
    image, mask = pattern()
    batch = {"id": np.array(["a", "b"]), "image": np.array([encode(image)] * 2, dtype=object), "mask": np.array([encode(mask)] * 2, dtype=object)}
    first = transform_batch(batch, (24, 12))
    second = transform_batch(batch, (24, 12))
    assert first["image"].shape == (2, 12, 24, 3) and first["image"].dtype == np.uint8
    assert np.array_equal(first["image"], second["image"]) and np.array_equal(first["mask"], second["mask"])
    expected = np.asarray(Image.fromarray(mask).resize((24, 12), Image.NEAREST))
    assert np.array_equal(first["mask"][0], expected)
