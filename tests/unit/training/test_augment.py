"""Device-side augmentation (raytrain.training.augment) against independent references: numpy
slicing for flip, crop and pad; torchvision for blur; the three jitter steps one by one; noise by
its statistics. On the CPU device, the one CI has; the GPU runs the same code."""
import numpy as np
import torch
import torchvision.transforms.functional as TF

from raytrain.data.formats import IGNORE_INDEX
from raytrain.training.augment import (
    BLUR_SIGMA, BRIGHTNESS, CONTRAST, FLIP, LEFT, NOISE_SEED, NOISE_STD, PARAMS, SATURATION, TOP, ZOOM,
    Augment, augment_batch, augment_of, batch_params, draw_params, sample_rng,
)

H, W = 24, 40
COLUMNS = {"zoom": ZOOM, "top": TOP, "left": LEFT, "flip": FLIP, "brightness": BRIGHTNESS, "contrast": CONTRAST,
           "saturation": SATURATION, "blur_sigma": BLUR_SIGMA, "noise_std": NOISE_STD, "noise_seed": NOISE_SEED}


def batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    masks = rng.choice(np.array([0, 1, 2, IGNORE_INDEX], dtype=np.uint8), (n, H, W))
    return torch.from_numpy(images), torch.from_numpy(masks)


def params(n=3, **columns):
    """A parameter table that does nothing, but for the columns given (one value, or one per sample)."""
    table = np.zeros((n, PARAMS))
    table[:, [ZOOM, BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    for column, value in columns.items():
        table[:, COLUMNS[column]] = value
    return torch.from_numpy(table)


def as_hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def test_nothing_to_do_returns_the_images_as_floats():
    images, masks = batch()
    out, out_masks = augment_batch(images, masks, params())
    assert out.shape == (3, 3, H, W) and out.dtype == torch.float32
    assert np.array_equal(as_hwc(out), images.numpy().astype(np.float32))
    assert torch.equal(out_masks, masks)


def test_flip_is_exact_and_only_where_drawn():
    images, masks = batch()
    out, out_masks = augment_batch(images, masks, params(flip=[1, 0, 1]))
    for i, flipped in enumerate([True, False, True]):
        expected_image, expected_mask = images[i].numpy(), masks[i].numpy()
        if flipped:
            expected_image, expected_mask = expected_image[:, ::-1], expected_mask[:, ::-1]
        assert np.array_equal(as_hwc(out)[i], expected_image.astype(np.float32))
        assert np.array_equal(out_masks[i].numpy(), expected_mask)


def test_crop_of_a_zoom_by_two_is_exact_on_masks_and_on_flat_images():
    """At zoom 2 nearest neighbour repeats each pixel twice; an image made of 2x2 flat squares stays
    exact under bilinear too. The crop window (top, left) is numpy's slice of the zoomed canvas."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (1, H // 2, W // 2, 3), dtype=np.uint8)
    images = torch.from_numpy(small.repeat(2, axis=1).repeat(2, axis=2))
    masks = torch.from_numpy(rng.integers(0, 3, (1, H, W), dtype=np.uint8))
    top, left = 5, 9
    out, out_masks = augment_batch(images, masks, params(1, zoom=2.0, top=top, left=left))
    zoomed_mask = masks[0].numpy().repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(out_masks[0].numpy(), zoomed_mask[top : top + H, left : left + W])
    zoomed = images[0].numpy().repeat(2, axis=0).repeat(2, axis=1)[top : top + H, left : left + W]
    interior = (slice(1, -1), slice(1, -1))  # one pixel in: bilinear mixes each square's neighbour there
    flat = zoomed.astype(np.float32)
    # Pixels whose 2x2 source square and its neighbours agree read exactly that square's value.
    same = (zoomed[1:-1, 1:-1] == zoomed[:-2, 1:-1]).all(-1) & (zoomed[1:-1, 1:-1] == zoomed[2:, 1:-1]).all(-1)
    same &= (zoomed[1:-1, 1:-1] == zoomed[1:-1, :-2]).all(-1) & (zoomed[1:-1, 1:-1] == zoomed[1:-1, 2:]).all(-1)
    assert np.array_equal(as_hwc(out)[0][interior][same], flat[interior][same])


def test_pad_after_a_zoom_out_is_zero_and_ignore_at_the_right_and_bottom():
    images, masks = batch(1)
    out, out_masks = augment_batch(images, masks, params(1, zoom=0.5))
    scaled_h, scaled_w = round(H * 0.5), round(W * 0.5)
    assert (as_hwc(out)[0][scaled_h:] == 0).all() and (as_hwc(out)[0][:, scaled_w:] == 0).all()
    assert (out_masks[0].numpy()[scaled_h:] == IGNORE_INDEX).all()
    assert (out_masks[0].numpy()[:, scaled_w:] == IGNORE_INDEX).all()
    # Inside: nearest neighbour of a halving reads every other pixel (the second of each pair).
    assert np.array_equal(out_masks[0].numpy()[:scaled_h, :scaled_w], masks[0].numpy()[1::2, 1::2])


def test_zoom_matches_a_bilinear_resize_within_a_grey_level():
    images, masks = batch(1)
    zoom = 1.5
    out, _ = augment_batch(images, masks, params(1, zoom=zoom))
    size = [round(H * zoom), round(W * zoom)]
    reference = TF.resize(images.permute(0, 3, 1, 2).float(), size, antialias=False)[..., :H, :W]
    assert (out - reference).abs().max() <= 1.001  # the CPU resizes uint8: rounded, fixed-point weights


def test_masks_keep_their_class_set_and_the_ignore_index():
    images, masks = batch(6)
    augment = Augment(hflip=0.5, scale=(0.5, 2.0), color_jitter=0.4, blur=1.0, noise=0.1)
    table = torch.from_numpy(batch_params(augment, (W, H), [f"s{i}" for i in range(6)], seed=3, epoch=1))
    _, out_masks = augment_batch(images, masks, table)
    assert set(out_masks.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    assert out_masks.dtype == torch.uint8


def reference_jitter(image: np.ndarray, brightness, contrast, saturation) -> np.ndarray:
    """The three steps one after another, as their definitions read (gray: the channel mean)."""
    pixels = image.astype(np.float64) * brightness
    gray = pixels.mean(axis=2, keepdims=True)
    pixels = gray + saturation * (pixels - gray)
    pixels = pixels.mean() + contrast * (pixels - pixels.mean())
    return np.clip(pixels, 0, 255)


def test_jitter_is_within_a_grey_level_of_the_three_steps():
    images, masks = batch()
    factors = {"brightness": [1.2, 0.8, 1.0], "contrast": [0.9, 1.3, 1.1], "saturation": [1.1, 0.7, 0.0]}
    out, out_masks = augment_batch(images, masks, params(**factors))
    for i in range(3):
        expected = reference_jitter(images[i].numpy(), *(factors[k][i] for k in ("brightness", "contrast", "saturation")))
        assert np.abs(as_hwc(out)[i] - expected).max() <= 1.0
    assert torch.equal(out_masks, masks)


def test_blur_is_within_a_grey_level_of_torchvision_and_only_where_drawn():
    images, masks = batch()
    sigmas = [1.0, 0.0, 2.0]
    out, _ = augment_batch(images, masks, params(blur_sigma=sigmas))
    for i, sigma in enumerate(sigmas):
        image = images[i].permute(2, 0, 1).float()
        if sigma:
            size = 2 * int(np.ceil(3 * sigma)) + 1
            image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
        assert (out[i] - image).abs().max() <= 1.0, i


def test_noise_has_the_drawn_deviation_and_depends_on_its_seed():
    grey = torch.full((2, 64, 96, 3), 128, dtype=torch.uint8)
    masks = torch.zeros((2, 64, 96), dtype=torch.uint8)
    out, _ = augment_batch(grey, masks, params(2, noise_std=[10.0, 0.0], noise_seed=[5, 5]))
    noise = out[0] - 128
    assert abs(float(noise.mean())) < 0.5 and abs(float(noise.std()) - 10.0) < 0.5
    assert torch.equal(out[1], torch.full_like(out[1], 128))
    again, _ = augment_batch(grey, masks, params(2, noise_std=[10.0, 0.0], noise_seed=[5, 5]))
    other, _ = augment_batch(grey, masks, params(2, noise_std=[10.0, 0.0], noise_seed=[6, 5]))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_parameters_come_from_seed_epoch_and_id_only():
    augment = Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3, blur=0.5, noise=0.05)
    ids = ["a", "b", "c"]
    whole = batch_params(augment, (W, H), ids, seed=7, epoch=3)
    part = batch_params(augment, (W, H), ["c", "a"], seed=7, epoch=3)
    assert np.array_equal(part, whole[[2, 0]])
    assert not np.array_equal(whole, batch_params(augment, (W, H), ids, seed=7, epoch=4))
    assert not np.array_equal(whole, batch_params(augment, (W, H), ids, seed=8, epoch=3))
    fresh = [batch_params(augment, (W, H), ids, seed=None, epoch=3) for _ in range(2)]
    assert not np.array_equal(*fresh)


def test_crop_windows_stay_inside_the_zoomed_canvas():
    augment = Augment(hflip=0.0, scale=(0.5, 2.0), color_jitter=0.0)
    for i in range(200):
        row = draw_params(augment, (W, H), sample_rng(0, 0, i))
        canvas_h, canvas_w = max(round(H * row[ZOOM]), H), max(round(W * row[ZOOM]), W)
        assert 0 <= row[TOP] <= canvas_h - H and 0 <= row[LEFT] <= canvas_w - W


def test_switched_off_parts_draw_nothing():
    """Blur and noise draw from the stream only when on: a config without them keeps its parameters."""
    plain = draw_params(Augment(), (W, H), sample_rng(1, 0, "x"))
    with_noise = draw_params(Augment(noise=0.1), (W, H), sample_rng(1, 0, "x"))
    assert np.array_equal(plain[:BLUR_SIGMA], with_noise[:BLUR_SIGMA])
    assert plain[NOISE_STD] == 0 and with_noise[NOISE_STD] > 0


def test_augment_of_reads_the_config():
    from raytrain.config import Config

    config = Config.model_validate({"name": "x", "data": {"path": "/d", "blur": 0.3, "blur_sigma": [1.0, 2.0], "noise": 0.05}})
    assert augment_of(config.data) == Augment(hflip=0.5, scale=(0.8, 1.25), color_jitter=0.2, blur=0.3,
                                              blur_sigma=(1.0, 2.0), noise=0.05)
    assert augment_of(config.with_overrides({"data.augment": False}).data) is None


def test_output_is_one_float_plane_per_channel_whatever_was_drawn():
    images, masks = batch()
    for table in (params(), params(flip=1), params(zoom=1.3, top=2, left=3, brightness=1.1)):
        out, _ = augment_batch(images, masks, table)
        assert out.dtype == torch.float32 and out.shape == (3, 3, H, W) and out.is_contiguous()


def block_pattern(seed, width=80, height=40, block=16):
    """Random class blocks (asymmetric, so a flip shows), a band of IGNORE_INDEX, and an image that
    encodes each pixel's class: red 1, green 0, blue unknown."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 2, (height // 8, width // 16 + 1)), np.ones((8, block)))[:height, :width].astype(np.uint8)
    mask[:, -block:] = IGNORE_INDEX
    colours = np.zeros((256, 3), np.uint8)
    colours[0], colours[1], colours[IGNORE_INDEX] = (20, 230, 20), (230, 20, 20), (20, 20, 230)
    return colours[mask], mask


def test_flip_zoom_crop_and_jitter_keep_every_pixel_aligned():
    """The image's colour says each pixel's class; after the augmentation the mask must agree with
    it everywhere but where bilinear blends two labels (within 2 pixels of a label border)."""
    augment = Augment(hflip=0.5, scale=(0.7, 1.5), color_jitter=0.3)
    pairs = [block_pattern(seed) for seed in range(40)]
    images = torch.from_numpy(np.stack([image for image, _ in pairs]))
    masks = torch.from_numpy(np.stack([mask for _, mask in pairs]))
    table = torch.from_numpy(batch_params(augment, (80, 40), [f"s{i}" for i in range(40)], seed=1, epoch=0))
    out_images, out_masks = augment_batch(images, masks, table)
    changed, checked = 0, []
    for i in range(40):
        out_image, out_mask = as_hwc(out_images)[i], out_masks[i].numpy()
        changed += not np.array_equal(out_mask, masks[i].numpy())
        r, g, b = (out_image[..., c] for c in range(3))
        image_class = np.select([(r - g > 60) & (r - b > 60), (g - r > 60) & (g - b > 60), (b - r > 60) & (b - g > 60)],
                                [1, 0, IGNORE_INDEX], -1)
        decided = image_class >= 0
        padded_mask = np.pad(out_mask, 2, mode="edge")
        border = np.zeros(out_mask.shape, bool)
        for dy in range(5):
            for dx in range(5):
                border |= padded_mask[dy : dy + 40, dx : dx + 80] != out_mask
        border[:2] = border[-2:] = border[:, :2] = border[:, -2:] = True  # labels beyond the crop are unseen
        inside = decided & ~border
        checked.append(inside.mean())
        assert np.array_equal(out_mask[inside], image_class[inside].astype(np.uint8)), i
        padding = (out_image.max(axis=2) < 60) & (out_mask == IGNORE_INDEX)  # a zoom-out's padding
        assert np.all(decided | border | padding), i
    assert changed >= 30
    assert np.mean(checked) > 0.4  # most pixels are checked: the test has teeth


def test_buffers_give_the_same_batch_and_are_written_again_by_the_next_of_its_shape():
    """The training loop's buffers: every pixel is written again (the pads too), so a batch into
    the previous batch's buffers equals the batch into new tensors."""
    from raytrain.training.augment import AugmentBuffers

    drawn = torch.from_numpy(batch_params(Augment(blur=0.5, noise=0.03), (W, H), ["a", "b", "c"], seed=1, epoch=0))
    zoom_out = params(zoom=0.5)  # pads the right and bottom: what an earlier batch left there must go
    buffers = AugmentBuffers()
    first, first_masks = augment_batch(*batch(seed=1), drawn, buffers)
    storage = first.data_ptr(), first_masks.data_ptr()
    for images, masks, table in ((*batch(seed=2), zoom_out), (*batch(seed=3), drawn)):
        expected, expected_masks = augment_batch(images, masks, table)
        out, out_masks = augment_batch(images, masks, table, buffers)
        assert (out.data_ptr(), out_masks.data_ptr()) == storage
        assert torch.equal(out, expected) and torch.equal(out_masks, expected_masks)
    smaller, _ = augment_batch(*batch(n=2), params(n=2), buffers)  # an epoch's last, shorter batch
    assert smaller.shape == (2, 3, H, W)
