"""Procedural synthetic road scenes in the KITTI road layout: the package's embedded default data.

Each scene is a dashcam view painted back to front with vectorised numpy: sky, skyline, ground
(grass, verge, curbs, sidewalks), a perspective road with curves, hills, varying width and lane
markings, cast shadows, building facades, cars, then lighting and sensor noise. Everything varies per
image from a generator seeded with (seed, index), so files are deterministic and image i does not
depend on how many are written. The ground truth is the *visible* road: cars and facades that hide
it are not road; shadows on it are road (only darker).
"""
from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from raytrain.storage import leftovers
from raytrain.storage.atomic import write_errors_named
from raytrain.data.formats import encode_kitti_gt, os_errors_named

F32 = np.float32


def _smooth_noise(rng: np.random.Generator, h: int, w: int, gh: int, gw: int) -> np.ndarray:
    """Low-frequency noise (h, w), std about 1: a (gh+1, gw+1) random grid, upsampled separably."""
    grid = rng.standard_normal((gh + 1, gw + 1), dtype=F32)

    def weights(n, g):  # (n, g + 1) linear interpolation matrix
        pos = np.linspace(0, g, n, dtype=F32)[:, None]
        return np.maximum(0, 1 - np.abs(pos - np.arange(g + 1, dtype=F32)))

    return weights(h, gh) @ grid @ weights(w, gw).T


def _bilinear(grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sample `grid` at fractional coordinates (a, b), wrapping around, so it tiles any plane."""
    gh, gw = grid.shape
    a0, b0 = np.floor(a), np.floor(b)
    fa, fb = (a - a0).astype(F32), (b - b0).astype(F32)
    i0, j0 = a0.astype(np.int64) % gh, b0.astype(np.int64) % gw
    i1, j1 = (i0 + 1) % gh, (j0 + 1) % gw
    top = grid[i0, j0] * (1 - fb) + grid[i0, j1] * fb
    bottom = grid[i1, j0] * (1 - fb) + grid[i1, j1] * fb
    return top * (1 - fa) + bottom * fa


@dataclass
class _Road:
    """Perspective road. Depth parameter t: 0 at the vanishing point, 1 at the bottom row; a thing
    of height h camera heights at depth t spans h * t * scale pixels (pinhole camera, flat ground)."""
    vp_y: float
    row0: int  # first ground row: the ground line, or below the vanishing point when that is lower
    scale: float  # pixels per camera height at t = 1
    half0: float  # road half-width in pixels at t = 1
    lanes: int
    center: Callable[[np.ndarray], np.ndarray]  # t -> x of the road's centre line
    t: np.ndarray  # (H, 1) depth of each row (<= 0 above the vanishing point)
    u: np.ndarray  # (H, W) lateral position in road half-widths, 0 on the centre line
    w: np.ndarray  # (H, 1) road half-width in those units (about 1; varies along the road)
    wmax: float  # the widest w, so things beside the road clear it everywhere


def _road_geometry(rng, width: int, height: int, ground_top: float) -> _Road:
    """Hills (vanishing point off the ground line), curves, width, lanes; u for every pixel."""
    # Vanishing point above the ground line: the road goes over a crest; below it: into a dip.
    vp_y = ground_top + height * rng.uniform(-0.08, 0.05)
    row0 = min(int(np.ceil(max(ground_top, vp_y + 1.0) - 0.5)), height - 1)
    x_near = width * (0.5 + rng.uniform(-0.12, 0.12))  # where the camera drives in its lane
    x_far = width * rng.uniform(0.35, 0.65)
    bend = width * rng.uniform(-0.5, 0.5) * (rng.random() < 0.75)

    def center(t):  # curves bend hardest far away, where (1 - t) is large
        return x_near * t + x_far * (1 - t) + bend * (1 - np.minimum(t, 1)) ** 3

    scale = height - vp_y
    half0 = width * rng.uniform(0.28, 0.5)
    lanes = int(np.clip(round(2 * half0 / scale * 1.65 / 3.5), 2, 4))  # camera 1.65 m, lanes 3.5 m
    amp, freq, phase = rng.uniform(0, 0.15), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
    t = ((np.arange(height, dtype=F32) + 0.5 - vp_y) / scale)[:, None]
    ts = np.maximum(t, 1e-3)
    w = 1 + amp * np.sin(freq / np.maximum(ts, 0.15) + phase)  # width changes along the road
    u = (np.arange(width, dtype=F32)[None, :] + 0.5 - center(ts)) / (half0 * ts)
    return _Road(vp_y, row0, scale, half0, lanes, center, t, u.astype(F32), w.astype(F32), 1 + amp)


def _sky(rng, img, ground_top, row0):
    """Blue or overcast sky, paler towards the horizon (haze), with soft clouds. Returns the haze."""
    width = img.shape[1]
    clear = rng.random() < 0.7
    zenith = rng.uniform([60, 110, 180], [140, 170, 235]) if clear else np.full(3, rng.uniform(150, 210))
    haze = (zenith + rng.uniform(40, 80)).astype(F32)
    v = np.minimum(np.arange(row0, dtype=F32) / max(ground_top, 1), 1)[:, None, None]
    clouds = 0.6 * np.clip(_smooth_noise(rng, row0, width, 3, 6) - rng.uniform(0, 1.2), 0, 1)[..., None]
    img[:row0] = (zenith * (1 - v) + haze * v) * (1 - clouds) + 235 * clouds  # the ground covers the rest
    return haze


def _skyline(rng, img, ground_top, row0, haze):
    """Distant buildings (blocks of random height) or a tree line, fading into the haze."""
    height, width = img.shape[:2]
    x = np.arange(width)
    if rng.random() < 0.6:
        edges = np.cumsum(rng.uniform(0.04, 0.15, 40) * width)
        block = np.searchsorted(edges, x)
        tall = rng.uniform(0.03, 0.3, 41)[block] * height
        colour = rng.uniform(70, 190, (41, 3))[block]
    else:
        tall = (0.1 + 0.05 * _smooth_noise(rng, 1, width, 1, 12)[0]) * height * rng.uniform(0.3, 1.5)
        colour = np.broadcast_to(rng.uniform([30, 50, 25], [70, 100, 55]), (width, 3))
    rows = np.arange(height)[:, None]
    mask = (rows >= ground_top - tall[None, :]) & (rows < row0)  # down to the ground, even in a dip
    mix = rng.uniform(0.2, 0.6)  # aerial perspective
    img[mask] = (colour * (1 - mix) + haze * mix)[np.nonzero(mask)[1]]


def _ground(rng, img, road: _Road, fine, coarse):
    """Grass, sidewalks (urban) or gravel verges, curbs and asphalt, chosen by lateral position u.
    Returns the road surface mask, whether the scene is urban, and each side's outer edge in u."""
    a = np.abs(road.u[road.row0:]) - road.w[road.row0:]  # distance beyond the road edge, half-widths
    left = road.u[road.row0:] < 0
    urban = rng.random() < 0.7
    curbs = rng.uniform(0.03, 0.08, 2) * urban
    walks = rng.uniform(0.2, 0.7, 2) if urban else rng.uniform(0.05, 0.3, 2)
    curb, walk = np.where(left, *curbs), np.where(left, *walks)
    material = 1 + (a < curb + walk) + (a < curb) + (a < 0)  # 1 grass, 2 sidewalk, 3 curb, 4 road
    colours = np.array([
        (0, 0, 0),
        rng.uniform([55, 85, 30], [100, 135, 60]),  # grass
        rng.uniform(*([[140, 135, 125], [195, 190, 175]] if urban else [[110, 95, 70], [160, 140, 110]])),
        np.full(3, rng.uniform(170, 215)),  # curb stone
        rng.uniform(65, 115) + rng.uniform(-6, 6, 3),  # asphalt, slightly tinted
    ], F32)
    fine_amp = np.array([0, 18, 8, 6, rng.uniform(4, 10)], F32)  # grass is the roughest
    coarse_amp = np.array([0, 14, 6, 3, rng.uniform(3, 10)], F32)  # asphalt patches and repairs
    z = 1 / road.t[road.row0:]
    joints = (np.modf(z * rng.uniform(1, 3))[0] < 0.12) * urban  # sidewalk slab joints
    tex = fine_amp[material] * fine[road.row0:] + coarse_amp[material] * coarse[road.row0:]
    tex -= 25 * joints * (material == 2)
    img[road.row0:] = colours[material] + tex[..., None]
    on_road = np.zeros(road.u.shape, bool)
    on_road[road.row0:] = material == 4
    return on_road, urban, road.wmax + curbs + walks


def _markings(rng, img, road: _Road, on_road):
    """Lane dividers (dashed or solid) and edge lines, anti-aliased by their pixel coverage."""
    half_px = road.half0 * np.maximum(road.t, 1e-3)
    lw = rng.uniform(0.025, 0.045) * 2 / road.lanes  # line half-width in road half-widths
    z = 1 / np.maximum(road.t, 1e-3)
    dash = np.modf(z * rng.uniform(0.3, 0.8) + rng.uniform(0, 1))[0] < rng.uniform(0.3, 0.6)
    paint = np.zeros(road.u.shape, bool)
    for k in range(1, road.lanes):
        divider = np.abs(road.u + road.w - 2 * road.w * k / road.lanes) < lw
        solid = k * 2 == road.lanes and rng.random() < 0.4
        paint |= divider & (solid | dash)
    if rng.random() < 0.7:
        paint |= np.abs(np.abs(road.u) - (road.w - 2.5 * lw)) < lw
    if rng.random() < 0.1:
        return  # worn-out or unmarked road
    cover = np.clip(2 * lw * half_px, 0, 1) * rng.uniform(0.6, 1.0)  # thin far lines fade out
    alpha = (paint & on_road) * cover
    img[:] = img * (1 - alpha[..., None]) + rng.uniform(200, 240) * alpha[..., None]


def _shadows(rng, img, road: _Road):
    """Tree shadows (noise blobs laid on the ground plane, so they shrink with distance) and the
    shadow of a row of buildings on one side; both darken and slightly blue the ground."""
    u = road.u[road.row0:]
    z = 1 / road.t[road.row0:]
    shade = np.zeros(u.shape, F32)
    if rng.random() < 0.6:
        lateral = u * (road.half0 / road.scale)  # camera heights from the centre line
        grid = rng.standard_normal((16, 16), dtype=F32)
        blobs = _bilinear(grid, z * rng.uniform(0.4, 1.2), lateral * rng.uniform(0.2, 0.6))
        shade = np.clip((blobs - rng.uniform(0, 1)) * 3, 0, 1)
    if rng.random() < 0.4:  # jagged edge: one shadow length per building along the road
        lengths = rng.uniform(0.3, 1.6, 16)[(z * rng.uniform(0.5, 1)).astype(int) % 16]
        shade = np.maximum(shade, rng.choice([-1.0, 1.0]) * u > road.wmax + rng.uniform(0.2, 0.6) - lengths)
    dark = 1 - (1 - rng.uniform(0.4, 0.7)) * shade
    img[road.row0:, :, :2] *= dark[..., None]
    img[road.row0:, :, 2] *= dark ** 0.85  # skylight makes shadows a little blue


def _facades(rng, img, road: _Road, urban, outer, occluded):
    """Building walls along either side, vanishing with the road; they hide the road behind them."""
    height, width = img.shape[:2]
    x = np.arange(width, dtype=F32) + 0.5
    rows = np.arange(height, dtype=F32)[:, None] + 0.5
    ts = np.linspace(0.01, 8, 400, dtype=F32)
    for sign, edge in zip((-1.0, 1.0), outer):
        if rng.random() > (0.6 if urban else 0.1):
            continue
        offset = edge + rng.uniform(0.05, 1.0)
        xb = road.center(ts) + sign * offset * road.half0 * ts  # wall foot at each depth
        if sign < 0:  # invert x(t) per column; the accumulate keeps it monotonic on sharp bends
            tc = np.interp(x, np.minimum.accumulate(xb)[::-1], ts[::-1], left=ts[-1], right=np.nan)
        else:
            tc = np.interp(x, np.maximum.accumulate(xb), ts, left=np.nan, right=ts[-1])
        z = np.nan_to_num(1 / tc)
        n = 32
        building = (z * rng.uniform(0.15, 0.5) + rng.uniform(0, n)).astype(int) % n
        tall = rng.uniform(3, 12, n) * (rng.random(n) > 0.15)  # camera heights; 0 leaves a gap
        v = (road.vp_y + tc * road.scale - rows) / (tc * road.scale)  # camera heights above the foot
        wall = (v >= 0) & (v < tall[building]) & ~np.isnan(tc)
        windows = (np.modf(v / 1.8)[0] > 0.35) & (np.modf(z * rng.uniform(1, 2))[0] > 0.45) & (v > 1.5)
        colour = (rng.uniform(90, 200, n)[:, None] + rng.uniform(-25, 25, (n, 3)))[building]  # muted tints
        colour *= rng.uniform(0.7, 1.0)  # facades facing away from the sun are darker
        glass = rng.uniform([30, 40, 50], [80, 90, 110])
        img[wall] = np.where(windows[wall][:, None], glass, colour[np.nonzero(wall)[1]])
        occluded |= wall


def _rect(img, x0, y0, x1, y1, colour=None, factor=None, mask=None):
    """Fill or darken a clipped axis-aligned rectangle; optionally mark it in `mask`."""
    height, width = img.shape[:2]
    x0, x1 = max(int(round(x0)), 0), min(int(round(x1)), width)
    y0, y1 = max(int(round(y0)), 0), min(int(round(y1)), height)
    if x0 >= x1 or y0 >= y1:
        return
    if colour is not None:
        img[y0:y1, x0:x1] = colour
    if factor is not None:
        img[y0:y1, x0:x1] *= factor
    if mask is not None:
        mask[y0:y1, x0:x1] = True


def _cars(rng, img, road: _Road, occluded):
    """Cars on the road, far to near, each with a contact shadow (which stays road)."""
    count = rng.choice([0, 1, 1, 2, 2, 3])
    for t in np.sort(rng.uniform(0.12, 0.95, count)):
        lane = rng.integers(road.lanes)
        u = -1 + (2 * lane + 1) / road.lanes + rng.uniform(-0.1, 0.1)
        s = t * road.scale
        cw, ch = s * rng.uniform(1.0, 1.2), s * rng.uniform(0.8, 1.05)  # about 1.8 m by 1.5 m
        xc, yb = float(road.center(np.float32(t))) + u * road.half0 * t, road.vp_y + s
        x0, x1 = xc - cw / 2, xc + cw / 2
        shift = rng.uniform(-0.3, 0.3) * cw
        _rect(img, x0 - 0.05 * cw + shift, yb - 0.1 * ch, x1 + 0.05 * cw + shift, yb + 0.06 * ch, factor=0.45)
        body = rng.uniform(20, 220, 3)
        _rect(img, x0, yb - 0.62 * ch, x1, yb, colour=body * 0.3, mask=occluded)  # under-body
        _rect(img, x0, yb - 0.62 * ch, x1, yb - 0.15 * ch, colour=body)
        _rect(img, x0 + 0.12 * cw, yb - ch, x1 - 0.12 * cw, yb - 0.6 * ch, colour=body * 0.85, mask=occluded)
        _rect(img, x0 + 0.18 * cw, yb - 0.92 * ch, x1 - 0.18 * cw, yb - 0.66 * ch, colour=(40, 45, 55))
        for lx in (x0 + 0.04 * cw, x1 - 0.2 * cw):  # tail lights
            _rect(img, lx, yb - 0.5 * ch, lx + 0.16 * cw, yb - 0.4 * ch, colour=(190, 30, 30))
        _rect(img, xc - 0.12 * cw, yb - 0.32 * ch, xc + 0.12 * cw, yb - 0.22 * ch, colour=(220, 220, 210))
        for wx in (x0, x1 - 0.2 * cw):  # wheels
            _rect(img, wx, yb - 0.2 * ch, wx + 0.2 * cw, yb, colour=(25, 25, 25))


def _lighting(rng, img):
    """Exposure, white balance, cloud shade drifting over the scene, vignetting and a sun glare."""
    height, width = img.shape[:2]
    gain = rng.uniform(0.6, 1.3) * (1 + rng.uniform(-0.08, 0.08, 3)).astype(F32)
    y = np.linspace(-1, 1, height, dtype=F32)[:, None]
    x = np.linspace(-1, 1, width, dtype=F32)[None, :]
    shade = 1 + rng.uniform(0, 0.2) * _smooth_noise(rng, height, width, 2, 4)
    vignette = 1 - rng.uniform(0, 0.3) * (x ** 2 * 0.6 + y ** 2 * 0.4)
    sun_x, sun_y, spread = rng.uniform(-1, 1), rng.uniform(-1.2, -0.3), rng.uniform(0.1, 0.5)
    glare = rng.uniform(0, 90) * np.exp(-((x - sun_x) ** 2 + (y - sun_y) ** 2) / spread)
    img *= (shade * vignette)[..., None] * gain
    img += glare[..., None]


def _sensor(rng, img) -> np.ndarray:
    """Gaussian sensor noise on linear values, 8-bit quantisation, then a gamma curve (as a table)."""
    noise = rng.standard_normal(img.shape, dtype=F32)
    noise *= rng.uniform(1, 6)
    img += noise + 0.5  # + 0.5: round, not truncate, below
    linear = np.clip(img, 0, 255, out=img).astype(np.uint8)
    curve = np.round(255 * (np.arange(256) / 255) ** rng.uniform(0.8, 1.25)).astype(np.uint8)
    return curve[linear]


def render_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (image (H, W, 3) uint8 RGB, road (H, W) bool)."""
    img = np.empty((height, width, 3), F32)
    ground_top = height * rng.uniform(0.35, 0.5)
    road = _road_geometry(rng, width, height, ground_top)
    haze = _sky(rng, img, ground_top, road.row0)
    _skyline(rng, img, ground_top, road.row0, haze)
    fine = rng.standard_normal((height, width), dtype=F32)
    coarse = _smooth_noise(rng, height, width, 4, 10)
    on_road, urban, outer = _ground(rng, img, road, fine, coarse)
    _markings(rng, img, road, on_road)
    _shadows(rng, img, road)
    occluded = np.zeros((height, width), bool)
    _facades(rng, img, road, urban, outer, occluded)
    _cars(rng, img, road, occluded)
    _lighting(rng, img)
    return _sensor(rng, img), on_road & ~occluded


def write_synthetic_kitti(
    out: str | os.PathLike, count: int, seed: int = 0, size: tuple[int, int] = (384, 128)
) -> pathlib.Path:
    """Write `count` scenes in the KITTI road layout under `out`; size is (width, height). Returns out.
    Atomic: writes into a temporary sibling directory, then renames it to `out`, so an interrupted run
    never leaves a folder that looks complete. Raises FileExistsError if `out` already exists and is non-empty.
    Scene i is drawn from np.random.default_rng([seed, i]), so it does not depend on count."""
    out = pathlib.Path(out)
    with os_errors_named(out, "cannot use it as the output folder"):
        occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied:
        raise FileExistsError(f"{out} already exists and is not empty")
    # A temp folder the next run can prove is its own, and remove, should this one be killed.
    tmp = pathlib.Path(leftovers.make_temp_dir(pafs.LocalFileSystem(), str(out.absolute()), str(out)))
    try:
        with write_errors_named(out):  # a full disk: one line naming out
            images, gts = tmp / "training" / "image_2", tmp / "training" / "gt_image_2"
            images.mkdir(parents=True)
            gts.mkdir(parents=True)
            width, height = size
            for i in range(count):
                image, road = render_scene(np.random.default_rng([seed, i]), width, height)
                Image.fromarray(image).save(images / f"um_{i:06d}.png", compress_level=1)
                Image.fromarray(encode_kitti_gt(road)).save(gts / f"um_road_{i:06d}.png", compress_level=1)
            leftovers.unmark(pafs.LocalFileSystem(), str(tmp))
            if out.exists():
                out.rmdir()  # empty (checked above); rename cannot replace it portably
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
