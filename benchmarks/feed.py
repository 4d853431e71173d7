"""What the data side delivers to a training loop, per data CPU: the old path against the new one.

    python benchmarks/feed.py [--images 360] [--sizes 1248x384,480x360] [--cpus N] [--repeats 3]

It makes its own synthetic KITTI-layout PNG shards at each size (files of --images/8 rows: the train
split has 7, fewer than a GPU node's CPUs only where --cpus is large). A consumer that only touches each batch reads
the train split through Ray Data on `--cpus` logical CPUs:
- old_path: decode, resize and the numpy augmentation (the code the device-side augmentation
  replaced, kept here as OLD_AUGMENT's reference) inside the Ray Data tasks, one task per file;
- first_epoch: the new path streamed: Ray Data decodes and resizes only, every CPU busy;
- cached: the same split decoded once into the object store, read in a new block order each epoch.
Figures are images/s divided by --cpus, median and range over --repeats epochs after one warm-up
pass of each. Besides:
- decode_floor_images_per_s: PIL's PNG decode alone, in this process, one image after another;
- augment_ms_per_image_cpu: the default augmentation on one CPU thread, median and range over 10
  batches of 8 on the CPU device: raytrain's batched torch (into the previous batch's buffers, as
  the training loop runs it, and into new tensors), the old numpy path, and kornia's
  augmentation module when it is installed (the same operations: RandomAffine zoom and translate,
  hflip, ColorJitter); and, as the yardstick, a plain uint8 -> float (N, 3, H, W) conversion of
  the same batch, no augmentation.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import NOISE_NOTE, emit, header, log, scratch_dir, spread

import numpy as np
import pyarrow.parquet as pq
import torch

from raytrain.config import parse_size
from raytrain.data.formats import IGNORE_INDEX
from raytrain.data.images import read_rgb
from raytrain.data.manifest import read_manifest
from raytrain.data.shards import write_shards
from raytrain.data.synthetic import write_synthetic_kitti
from raytrain.data.transforms import decode_sample, resize
from raytrain.training.augment import Augment, AugmentBuffers, augment_batch, batch_params, sample_rng
from raytrain.training.loop import ToTensors

BATCH = 8
FILES = 8
AUGMENT_REPEATS = 10  # batches timed per augmentation path: cheap, and its spread is wide


# --- the old path: numpy augmentation inside the Ray Data task (raytrain before issue 27) ---------
# Defined in this script, so Ray ships these functions to its workers by value.


def old_augment(image, mask, size, augment: Augment, rng):
    from PIL import Image, ImageFilter

    width, height = size
    factor = rng.uniform(*augment.scale)
    scaled = (max(1, round(width * factor)), max(1, round(height * factor)))
    image, mask = resize(image, mask, scaled)
    pad_h, pad_w = max(0, height - scaled[1]), max(0, width - scaled[0])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    top = rng.integers(0, image.shape[0] - height + 1)
    left = rng.integers(0, image.shape[1] - width + 1)
    image, mask = image[top : top + height, left : left + width], mask[top : top + height, left : left + width]
    if rng.random() < augment.hflip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    brightness, contrast, saturation = (float(f) for f in rng.uniform(1 - augment.color_jitter, 1 + augment.color_jitter, size=3))
    pixels = image.astype(np.float32)
    gray = pixels.mean(axis=2, keepdims=True)
    gray *= contrast * brightness * (1 - saturation)
    gray += (1 - contrast) * brightness * float(pixels.mean())
    pixels *= contrast * brightness * saturation
    pixels += gray
    image = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    if augment.blur > 0 and rng.random() < augment.blur:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(rng.uniform(*augment.blur_sigma)))))
    if augment.noise > 0:
        deviation = float(rng.uniform(0, augment.noise)) * 255
        pixels = image.astype(np.float32) + rng.normal(0, deviation, size=image.shape).astype(np.float32)
        image = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def old_block(block: dict, size, augment: Augment):
    for start in range(0, len(block["id"]), 16):
        pairs = []
        for sample_id, image, mask in zip(*(block[k][start : start + 16] for k in ("id", "image", "mask"))):
            pairs.append(old_augment(*decode_sample(image, mask, size), size, augment, sample_rng(0, 0, sample_id)))
        yield {"id": block["id"][start : start + 16], "image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs])}


# --- measuring ------------------------------------------------------------------------------------


def touch(dataset) -> float:
    """Images/s of one pass that only touches each batch."""
    started, images, checksum = time.perf_counter(), 0, 0
    for batch in dataset.iter_torch_batches(batch_size=BATCH, collate_fn=ToTensors(), prefetch_batches=2):
        checksum += int(batch["image"][:, 0, 0, 0].sum())
        images += len(batch["image"])
    return images / (time.perf_counter() - started)


def decode_floor(paths: list[str]) -> float:
    images = pq.read_table(paths, columns=["image"])["image"].to_pylist()
    started = time.perf_counter()
    for data in images:
        read_rgb(data, "shard row")
    return len(images) / (time.perf_counter() - started)


def augment_costs(size, repeats: int) -> dict:
    """ms per image of the default augmentation, one thread, batches of BATCH."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    width, height = size
    images = rng.integers(0, 256, (BATCH, height, width, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (BATCH, height, width), dtype=np.uint8)
    augment = Augment()
    ids = [f"s{i}" for i in range(BATCH)]

    buffers = AugmentBuffers()

    def torch_path():  # as the training loop runs it: each batch into the previous batch's buffers
        params = torch.from_numpy(batch_params(augment, size, ids, seed=0, epoch=0))
        augment_batch(torch.from_numpy(images), torch.from_numpy(masks), params, buffers)

    def torch_new_tensors():
        params = torch.from_numpy(batch_params(augment, size, ids, seed=0, epoch=0))
        augment_batch(torch.from_numpy(images), torch.from_numpy(masks), params)

    def numpy_path():
        for image, mask, sample_id in zip(images, masks, ids):
            old_augment(image, mask, size, augment, sample_rng(0, 0, sample_id))

    def float_only():  # no augmentation: what every path pays to make a float batch from uint8
        torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()

    paths = {"torch_batched": torch_path, "torch_batched_new_tensors": torch_new_tensors, "numpy_old": numpy_path,
             "float_conversion_only": float_only}
    try:
        import kornia.augmentation as K

        pipeline = K.AugmentationSequential(
            K.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=augment.scale, p=1.0),
            K.RandomHorizontalFlip(p=augment.hflip),
            K.ColorJitter(augment.color_jitter, augment.color_jitter, augment.color_jitter, p=1.0),
            data_keys=["input", "mask"],
        )

        def kornia_path():
            pipeline(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(masks)[:, None].float())

        paths["kornia"] = kornia_path
    except ImportError:
        log("kornia not installed: its row is left out")
    costs = {}
    for name, run in paths.items():
        run()  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) / BATCH * 1000)
        costs[name] = spread([round(t, 2) for t in times])
    torch.set_num_threads(os.cpu_count() or 1)
    return costs


def per_size(size, images: int, cpus: int, repeats: int, scratch: Path) -> dict:
    from raytrain.config import load_config
    from raytrain.data.pipeline import FIRST_EPOCH, build_datasets, cached_epoch, read_shards

    where = scratch / f"{size[0]}x{size[1]}"
    log(f"making {images} synthetic scenes {size[0]}x{size[1]} ...")
    raw = write_synthetic_kitti(where / "kitti", images, seed=0, size=size)
    write_shards(raw, "kitti", where / "shards", val_fraction=0.2, rows_per_shard=max(1, -(-images // FILES)))
    manifest = read_manifest(where / "shards")
    config = load_config({"data": {"path": str(where / "shards"), "size": list(size)}})
    old = read_shards(manifest.shard_paths("train"), shuffle=True, seed=0).map_batches(
        old_block, fn_kwargs={"size": size, "augment": Augment()}, batch_size=None)
    streamed = build_datasets(config, manifest, cpus=cpus, cache=False)["train"]
    cached = cached_epoch(build_datasets(config, manifest, cpus=cpus, cache=True)[FIRST_EPOCH], seed=0, epoch=1)  # a later epoch
    runs = {"old_path": [], "first_epoch": [], "cached": []}
    for dataset in (old, streamed, cached):
        touch(dataset)  # warm-up: Ray's worker processes and imports, not the feed
    for repeat in range(repeats):
        for name, dataset in (("old_path", old), ("first_epoch", streamed), ("cached", cached)):
            rate = touch(dataset) / cpus
            runs[name].append(round(rate, 1))
            log(f"  {size[0]}x{size[1]} repeat {repeat + 1}: {name} {rate:.1f} images/s per CPU")
    del cached  # the cache goes with its last reference
    return {
        "runs": runs,
        "decode_floor": spread([round(decode_floor(manifest.shard_paths("train")), 1) for _ in range(repeats)]),
        "augment": augment_costs(size, AUGMENT_REPEATS),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=360, help="synthetic scenes per size, 80%% train: 288, KITTI road's 289")
    parser.add_argument("--sizes", default="1248x384,480x360", help="WIDTHxHEIGHT, comma-separated")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's logical CPUs: the data CPUs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from raytrain.launch.session import ensure_ray

    ensure_ray(args.cpus)
    scratch = scratch_dir("feed")
    results = {}
    for text in args.sizes.split(","):
        size = parse_size(text)
        results[f"{size[0]}x{size[1]}"] = per_size(size, args.images, args.cpus, args.repeats, scratch)
    emit({
        **header("feed"),
        "setup": {"images": args.images, "files_per_split": FILES, "data_cpus": args.cpus, "batch_size": BATCH,
                  "repeats": args.repeats, "consumer": "touches one pixel of each batch"},
        "old_path_images_per_s_per_cpu": {size: spread(r["runs"]["old_path"]) for size, r in results.items()},
        "first_epoch_images_per_s_per_cpu": {size: spread(r["runs"]["first_epoch"]) for size, r in results.items()},
        "cached_images_per_s_per_cpu": {size: spread(r["runs"]["cached"]) for size, r in results.items()},
        "decode_floor_images_per_s": {size: r["decode_floor"] for size, r in results.items()},
        "augment_ms_per_image_cpu": {size: r["augment"] for size, r in results.items()},
        "goals": {"first_epoch_images_per_s_per_cpu_1248x384": 100, "cached_images_per_s_per_cpu": 1000,
                  "augment_ms_per_image_cpu_1248x384": 5},
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
