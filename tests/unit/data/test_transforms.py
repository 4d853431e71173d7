"""Decode, resize and augment keep image and mask pixel-aligned; validation is not augmented."""
import io

import numpy as np
from PIL import Image

from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.transforms import Augment, gaussian_blur, transform_batch, transform_sample


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


def block_pattern(seed, width=96, height=48, block=16):
    """Random class blocks (asymmetric, so a flip of only one of the pair shows), a band of
    IGNORE_INDEX, and an image that encodes each pixel's class: red 1, green 0, blue unknown."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 2, (height // block, width // block)), np.ones((block, block))).astype(np.uint8)
    mask[:, -block:] = IGNORE_INDEX
    colours = np.zeros((256, 3), np.uint8)
    colours[0], colours[1], colours[IGNORE_INDEX] = (20, 230, 20), (230, 20, 20), (20, 20, 230)
    return colours[mask], mask


def test_flip_scale_crop_and_jitter_keep_every_pixel_aligned():
    augment = Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3)
    rng = np.random.default_rng(1)
    flipped_or_zoomed, checked = 0, []
    for seed in range(40):
        image, mask = block_pattern(seed)
        out_image, out_mask = transform_sample(encode(image), encode(mask), (80, 40), augment, rng)
        assert out_image.shape == (40, 80, 3) and out_image.dtype == np.uint8 and out_mask.shape == (40, 80)
        plain = np.asarray(Image.fromarray(mask).resize((80, 40), Image.NEAREST))
        flipped_or_zoomed += not np.array_equal(out_mask, plain)
        # Jitter is the same affine map on every channel of a pixel (factor > 0), so the order of
        # the channels survives it; only pixels that bilinear blended at a border are undecided.
        r, g, b = (out_image[..., c].astype(int) for c in range(3))
        image_class = np.select([(r - g > 60) & (r - b > 60), (g - r > 60) & (g - b > 60), (b - r > 60) & (b - g > 60)],
                                [1, 0, IGNORE_INDEX], -1)
        decided = image_class >= 0
        # A border pixel: one within 2 pixels of another label in the mask. Bilinear (image; its
        # support widens when zooming out) and nearest (mask) may disagree there, and nowhere else.
        padded_mask = np.pad(out_mask, 2, mode="edge")
        border = np.zeros(out_mask.shape, bool)
        for dy in range(5):
            for dx in range(5):
                border |= padded_mask[dy : dy + 40, dx : dx + 80] != out_mask
        border[:2] = border[-2:] = border[:, :2] = border[:, -2:] = True  # labels beyond the crop are unseen
        inside = decided & ~border
        assert inside.mean() > 0.15
        checked.append(inside.mean())
        assert np.array_equal(out_mask[inside], image_class[inside].astype(np.uint8))
        # Undecided pixels are border pixels, or the zero padding (IGNORE_INDEX) of a zoom-out.
        padding = (out_image.max(axis=2) < 60) & (out_mask == IGNORE_INDEX)
        assert np.all(decided | border | padding)
    assert flipped_or_zoomed >= 30
    assert np.mean(checked) > 0.4  # most pixels are checked: the test has teeth


def encoded_batch(ids, seed=0):
    images, masks = zip(*(block_pattern(seed + n) for n in range(len(ids))))
    return {"id": np.array(ids), "image": np.array([encode(i) for i in images], dtype=object),
            "mask": np.array([encode(m) for m in masks], dtype=object)}


def by_id(batch):
    return {str(i): (image, mask) for i, image, mask in zip(batch["id"], batch["image"], batch["mask"])}


def test_seeded_augmentation_depends_on_seed_epoch_and_id_only():
    """Not on which task or batch a sample lands in, nor on its neighbours: only (seed, epoch, id)."""
    augment = Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3)
    whole = encoded_batch(["a", "b", "c", "d"])
    out = by_id(transform_batch(whole, (80, 40), augment, seed=7, epoch=3))
    # The same samples split differently and reordered.
    parts = [{k: v[[3, 1]] for k, v in whole.items()}, {k: v[[2, 0]] for k, v in whole.items()}]
    for part in parts:
        for key, (image, mask) in by_id(transform_batch(part, (80, 40), augment, seed=7, epoch=3)).items():
            assert np.array_equal(image, out[key][0]) and np.array_equal(mask, out[key][1]), key
    for other in ({"seed": 7, "epoch": 4}, {"seed": 8, "epoch": 3}):
        changed = by_id(transform_batch(whole, (80, 40), augment, **other))
        assert all(not np.array_equal(changed[key][0], out[key][0]) for key in out), other


def test_unseeded_batches_and_validation_still_work_without_a_seed():
    augment = Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3)
    batch = encoded_batch(["a", "b"])
    assert transform_batch(batch, (80, 40), augment)["image"].shape == (2, 40, 80, 3)
    # Validation (no augment) ignores seed and epoch.
    plain = transform_batch(batch, (80, 40))
    assert np.array_equal(plain["image"], transform_batch(batch, (80, 40), seed=1, epoch=5)["image"])


PLAIN = {"hflip": 0.0, "scale": (1.0, 1.0), "color_jitter": 0.0}


def test_blur_softens_the_image_and_leaves_the_mask_alone():
    image, mask = block_pattern(3)
    plain_image, plain_mask = transform_sample(encode(image), encode(mask), (80, 40), None, None)
    blurred, blurred_mask = transform_sample(encode(image), encode(mask), (80, 40), Augment(**PLAIN, blur=1.0), np.random.default_rng(0))
    assert np.array_equal(blurred_mask, plain_mask)
    # A blur keeps the mean and spreads each edge over a few pixels: smaller squared steps between neighbours.
    steps = lambda a: (np.diff(a.astype(int), axis=1) ** 2).sum()  # noqa: E731
    assert steps(blurred) < 0.8 * steps(plain_image)
    assert abs(blurred.astype(float).mean() - plain_image.astype(float).mean()) < 2
    # Its deviation is drawn from blur_sigma: a wider range blurs more.
    wider, _ = transform_sample(encode(image), encode(mask), (80, 40), Augment(**PLAIN, blur=1.0, blur_sigma=(3.0, 3.0)),
                                np.random.default_rng(0))
    assert steps(wider) < 0.8 * steps(blurred)
    assert np.array_equal(wider, gaussian_blur(plain_image, 3.0))


def test_blur_is_applied_with_its_probability():
    image, mask = block_pattern(4)
    plain_image, _ = transform_sample(encode(image), encode(mask), (80, 40), None, None)
    rng = np.random.default_rng(0)
    outs = [transform_sample(encode(image), encode(mask), (80, 40), Augment(**PLAIN, blur=0.3), rng)[0] for _ in range(100)]
    blurred = sum(not np.array_equal(out, plain_image) for out in outs)
    assert 15 <= blurred <= 45


def test_noise_has_the_drawn_deviation_and_leaves_the_mask_alone():
    image = np.full((40, 80, 3), 128, np.uint8)
    mask = np.ones((40, 80), np.uint8)
    rng = np.random.default_rng(0)
    deviations = []
    for _ in range(50):
        noisy, noisy_mask = transform_sample(encode(image), encode(mask), (80, 40), Augment(**PLAIN, noise=0.1), rng)
        assert np.array_equal(noisy_mask, mask)
        deviations.append((noisy.astype(float) - 128).std())
    # Each image's deviation is uniform in [0, 0.1 x 255]: none beyond it, and they spread over it.
    assert max(deviations) <= 0.1 * 255 * 1.1 and min(deviations) < 5 and max(deviations) > 20


def test_seeded_blur_and_noise_depend_on_seed_epoch_and_id_only():
    augment = Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3, blur=0.5, noise=0.05)
    whole = encoded_batch(["a", "b", "c", "d"])
    out = by_id(transform_batch(whole, (80, 40), augment, seed=7, epoch=3))
    part = by_id(transform_batch({k: v[[2, 0]] for k, v in whole.items()}, (80, 40), augment, seed=7, epoch=3))
    assert all(np.array_equal(part[key][0], out[key][0]) for key in part)
    later = by_id(transform_batch(whole, (80, 40), augment, seed=7, epoch=4))
    assert all(not np.array_equal(later[key][0], out[key][0]) for key in out)


def test_blur_and_noise_off_keep_the_random_stream_of_configs_without_them():
    """blur 0 and noise 0 draw nothing: the augmentation of older configs is unchanged."""
    image, mask = block_pattern(5)
    old, new = np.random.default_rng(9), np.random.default_rng(9)
    transform_sample(encode(image), encode(mask), (80, 40), Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3), old)
    transform_sample(encode(image), encode(mask), (80, 40), Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3,
                                                                     blur=0.0, noise=0.0, blur_sigma=(2.0, 3.0)), new)
    assert old.random() == new.random()


def test_config_blur_and_noise_reach_the_pipelines_augmentation(tmp_path):
    from raytrain.config import load_config
    from raytrain.data.pipeline import augment_of

    config = load_config({"data": {"path": str(tmp_path), "blur": 0.3, "blur_sigma": [1, 2], "noise": 0.05}})
    assert augment_of(config) == Augment(hflip=0.5, scale=(0.8, 1.25), color_jitter=0.2, blur=0.3, blur_sigma=(1.0, 2.0), noise=0.05)
    assert augment_of(config.with_overrides({"data.augment": False})) is None
