"""The synthetic KITTI generator: deterministic, KITTI layout and colours, sane road fraction, atomic writes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raytrain.data.formats import IGNORE_INDEX, decode_kitti_gt, encode_kitti_gt
from raytrain.data.synthetic import render_scene, write_synthetic_kitti

SIZE = (96, 32)  # width, height


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_different_seed_different_bytes(tmp_path):
    a = _files(write_synthetic_kitti(tmp_path / "a", 4, seed=7, size=SIZE))
    b = _files(write_synthetic_kitti(tmp_path / "b", 4, seed=7, size=SIZE))
    c = _files(write_synthetic_kitti(tmp_path / "c", 4, seed=8, size=SIZE))
    assert len(a) == 8 and a == b
    assert a.keys() == c.keys()
    for name in a:  # every image and every ground truth changes with the seed
        assert a[name] != c[name], name


def test_scene_i_does_not_depend_on_count(tmp_path):
    few = _files(write_synthetic_kitti(tmp_path / "few", 2, seed=3, size=SIZE))
    more = _files(write_synthetic_kitti(tmp_path / "more", 4, seed=3, size=SIZE))
    assert few == {name: more[name] for name in few}


def test_kitti_layout_names_and_sizes(tmp_path):
    out = write_synthetic_kitti(tmp_path / "kitti", 3, seed=0, size=SIZE)
    assert out == tmp_path / "kitti"
    assert sorted(_files(out)) == [
        "training/gt_image_2/um_road_000000.png",
        "training/gt_image_2/um_road_000001.png",
        "training/gt_image_2/um_road_000002.png",
        "training/image_2/um_000000.png",
        "training/image_2/um_000001.png",
        "training/image_2/um_000002.png",
    ]
    for sub in ("image_2/um_000001.png", "gt_image_2/um_road_000001.png"):
        with Image.open(out / "training" / sub) as im:
            assert (im.mode, im.size) == ("RGB", SIZE)


def test_gt_uses_kitti_colours_and_decodes_to_the_rendered_road(tmp_path):
    out = write_synthetic_kitti(tmp_path / "kitti", 3, seed=5, size=SIZE)
    for i in range(3):
        gt = np.asarray(Image.open(out / f"training/gt_image_2/um_road_{i:06d}.png"))
        colours = {tuple(c) for c in gt.reshape(-1, 3)}
        assert colours == {(255, 0, 255), (255, 0, 0)}
        image, road = render_scene(np.random.default_rng([5, i]), *SIZE)
        assert image.shape == (SIZE[1], SIZE[0], 3) and image.dtype == np.uint8 and road.dtype == bool
        np.testing.assert_array_equal(decode_kitti_gt(gt), road.astype(np.uint8))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"training/image_2/um_{i:06d}.png")), image)


def test_kitti_colour_convention_both_ways():
    road = np.array([[True, False], [False, True]])
    rgb = encode_kitti_gt(road)
    assert rgb[0, 0].tolist() == [255, 0, 255] and rgb[0, 1].tolist() == [255, 0, 0]
    np.testing.assert_array_equal(decode_kitti_gt(rgb), [[1, 0], [0, 1]])
    hand = np.array([[[255, 0, 255], [255, 0, 0], [0, 0, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_kitti_gt(hand), [[1, 0, IGNORE_INDEX]])


def test_road_fraction_is_a_minority_but_never_empty():
    fractions = []
    for i in range(20):
        _, road = render_scene(np.random.default_rng([11, i]), *SIZE)
        assert 0 < road.sum() < road.size, i
        fractions.append(road.mean())
    assert 0.10 <= np.mean(fractions) <= 0.35, fractions


def test_cars_hide_road_but_shadows_keep_it(monkeypatch):
    """Watch the painters: car pixels on the road surface are not road; shadowed road stays road."""
    import raytrain.data.synthetic as synth

    seen = {}
    real_ground, real_shadows, real_cars = synth._ground, synth._shadows, synth._cars

    def ground(rng, img, road, *args):
        result = real_ground(rng, img, road, *args)
        seen["surface"] = result[0].copy()
        return result

    def shadows(rng, img, road):
        before = img.copy()
        real_shadows(rng, img, road)
        seen["shadowed"] = (img < before - 1).any(axis=2)

    def cars(rng, img, road, occluded):
        before = img.copy()
        real_cars(rng, img, road, occluded)
        seen["car"] = (img != before).any(axis=2) & occluded  # painted, not just darkened by a shadow

    monkeypatch.setattr(synth, "_ground", ground)
    monkeypatch.setattr(synth, "_shadows", shadows)
    monkeypatch.setattr(synth, "_cars", cars)
    hidden = shadowed = 0
    for i in range(20):
        _, road = synth.render_scene(np.random.default_rng([2, i]), *SIZE)
        assert not (road & seen["car"]).any()
        assert not (road & ~seen["surface"]).any()
        hidden += (seen["car"] & seen["surface"]).sum()
        shadowed += (road & seen["shadowed"]).sum()
    assert hidden > 0 and shadowed > 0


def test_write_is_atomic(tmp_path):
    out = write_synthetic_kitti(tmp_path / "kitti", 2, seed=0, size=SIZE)
    assert out.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["kitti"]  # no temporary sibling left over
    with pytest.raises(FileExistsError):
        write_synthetic_kitti(out, 2, seed=1, size=SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["kitti"]
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    write_synthetic_kitti(tmp_path / "empty", 1, size=SIZE)
    assert (tmp_path / "empty" / "training" / "image_2" / "um_000000.png").is_file()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import raytrain.data.synthetic as synth

    calls = []

    def failing(rng, width, height):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render_scene(rng, width, height)

    monkeypatch.setattr(synth, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        synth.write_synthetic_kitti(tmp_path / "kitti", 3, size=SIZE)
    assert list(tmp_path.iterdir()) == []
