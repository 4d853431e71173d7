"""What the tests share: child processes for the CLI, the files and runs they build, and the checks
of the one-line error promise. Tests and conftest.py import from here, never from each other.

Child processes: `run_cli` forks each call from a server process that has imported torch and
raytrain once (multiprocessing's forkserver with preload): every call is still its own process,
with its own exit code, standard streams, working directory and environment, but skips the seconds a
fresh interpreter spends importing torch. `run_cli_fresh` is `python -m raytrain.cli` itself; the
rows that need a fresh interpreter use it (dropped capabilities, starting Ray, signals), and
unit/cli/test_bad_input.py checks that both give the same answers. `forkserver()` is the same server for
torch.multiprocessing (start_method="forkserver"): its DDP workers skip the imports too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import io
import json
import logging
import multiprocessing
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raytrain import experiments
from raytrain.data.formats import IGNORE_INDEX


REPO = Path(__file__).resolve().parents[1]
# ../shared beside the repository holds CamVid for development; it is never part of the project.
REAL_CAMVID = Path(os.environ.get("RAYTRAIN_CAMVID", REPO.parent / "shared/datasets/camvid"))

# ---------------------------------------------------------------- child processes

# Not Ray: the CLI sets Ray's logging variables before Ray is first imported.
PRELOAD = [
    "torch", "torchvision", "segmentation_models_pytorch", "pyarrow.parquet", "PIL.Image", "pydantic", "yaml",
    "raytrain.cli", "raytrain.api", "raytrain.inference.files", "raytrain.inference.evaluation", "raytrain.inference.exporting",
    "raytrain.preflight", "raytrain.data.shards",
    "pytest",  # each child re-runs the parent's __main__, pytest's: 0.1 s a call when pytest is not loaded
]
_context = None


def forkserver():
    """multiprocessing's forkserver context, its server preloaded with PRELOAD."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def cli_environment() -> dict[str, str]:
    # A local cluster of --num-cpus, never the test session's shared one.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _data_size() -> int:
    """This process's data (heap and private writable mappings: what RLIMIT_DATA counts), in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))


def _child(args: list[str], cwd: str, env: dict[str, str], umask: int | None, memory_limit: int | None,
           stdout: str, stderr: str) -> None:
    if memory_limit is not None:  # on top of what the server's imports hold: what the command itself allocates
        limit = _data_size() + memory_limit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    os.chdir(cwd)
    if umask is not None:
        os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    from raytrain.cli import main

    sys.exit(main(args))


def start_cli(args: list, stdout: Path, stderr: Path, cwd: Path | str | None = None, env: dict[str, str] | None = None,
              umask: int | None = None, memory_limit: int | None = None):
    """`raytrain ARGS` started in a forked child process (a multiprocessing Process), writing its
    stdout and stderr to those files; run_cli waits for it."""
    stdout.touch()
    stderr.touch()
    process = forkserver().Process(
        target=_child, args=([str(a) for a in args], str(cwd or os.getcwd()), env or cli_environment(), umask, memory_limit,
                             str(stdout), str(stderr)),
    )
    process.start()
    return process


def run_cli(args: list, cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: float = 600, umask: int | None = None, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """`raytrain ARGS` in a forked child process; stdout and stderr as text, like subprocess.run.
    memory_limit: the bytes of data the command may allocate (RLIMIT_DATA over what the imports hold)."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="raytrain-cli-") as streams:
        stdout, stderr = Path(streams, "stdout"), Path(streams, "stderr")
        process = start_cli(args, stdout, stderr, cwd, env, umask, memory_limit)
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["raytrain", *args], timeout)
        return subprocess.CompletedProcess(
            ["raytrain", *args], process.exitcode,
            stdout.read_text(), stderr.read_text(),
        )


def run_cli_fresh(args: list, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                  timeout: float = 600, prefix: list[str] = (), preexec_fn=None) -> subprocess.CompletedProcess:
    """`python -m raytrain.cli ARGS` in a fresh interpreter, optionally under a prefix command."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "raytrain.cli", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env=env or cli_environment(), preexec_fn=preexec_fn,
    )


# ---------------------------------------------------------------- small tools


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running S3-protocol server: its endpoint, its bucket, a key it accepts, and the environment
    through which a command reaches it (the standard AWS variables, as on a cluster)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        return {**cli_environment(), "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        """The bucket's filesystem for the test itself to look at what a command left."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region="us-east-1",
                                 endpoint_override=self.endpoint)

    def keys(self, uri: str) -> list[str]:
        """Every object below the s3:// URI, as paths relative to it."""
        import pyarrow.fs as pafs

        root = uri.removeprefix("s3://").rstrip("/")
        found = self.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(info.path.removeprefix(root + "/") for info in found if info.type == pafs.FileType.File)

    def texts(self, uri: str, pattern: str) -> dict[str, str]:
        """{key relative to the s3:// URI: text} of the objects below it whose keys match `pattern`.
        An object replaced or removed between its listing and its read (a running search rewrites
        its state) is left out: a poll reads it next time."""
        texts = {}
        for key in fnmatch.filter(self.keys(uri), pattern):
            try:
                with self.filesystem().open_input_stream(f"{uri.removeprefix('s3://').rstrip('/')}/{key}") as stream:
                    texts[key] = stream.read().decode()
            except OSError:  # the listing's size no longer the object's (HTTP 416), or the object gone
                continue
        return texts


def start_s3_server(bucket: str = "raytrain-tests"):
    """(moto's ThreadedMotoServer on 127.0.0.1 at a free port, its S3Server). Beside the bucket it
    holds one IAM user allowed everything, then turns on moto's checking of requests (its
    /moto-api/reset-auth): from then on only that user's key opens the bucket, as on AWS."""
    import json
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in every failure report
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Any key works until checking is on.
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="raytrain")
    everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="raytrain", PolicyName="everything", PolicyDocument=json.dumps(everything))
    key = iam.create_access_key(UserName="raytrain")["AccessKey"]
    boto3.client("s3", **setup).create_bucket(Bucket=bucket)
    # The body is how many more requests go unchecked: none. text/plain, else Flask reads it as a form.
    check_all = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                       headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(check_all, timeout=10).close()
    return server, S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"])


def set_dotted(tree: dict, **dotted) -> dict:
    """tree with each dotted key (`train.epochs`) set to its value, sections made as needed."""
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def read_events(log_dir: Path | str):
    """Every scalar and image in a TensorBoard log folder, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    accumulator.Reload()
    return accumulator


def wait_for(condition, what: str, timeout: float = 480):
    """Poll `condition` until it returns something true, and return that; a guard against hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def tiny_config(shards, storage, **overrides):
    """A valid Config for tiny, fast runs on `shards`, storing results under `storage`."""
    from raytrain.config import load_config

    base = {
        "name": "tiny",
        "data": {"path": str(shards), "size": "64x32", "shuffle_buffer": 0},
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 2, "batch_size": 4, "num_workers": 2, "storage_path": str(storage), "max_failures": 0},
    }
    return load_config(base, overrides)


@contextlib.contextmanager
def small_disk_at(folder: Path, size: str):
    """A real filesystem of `size` bytes (a tmpfs: "64k", "1m") mounted at `folder`, which fills up
    with ENOSPC as a full disk does; unmounted on the way out. Skips the test where this process may
    not mount (not root, or a container without the capability)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a small tmpfs stands in for a full disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here, which stands in for a full disk ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        # Lazily where a child still holds a file open: the mount never outlives the test.
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


# ---------------------------------------------------------------- files the tests make

# KITTI road's three categories, as in its file names (um_000000.png): the groups of `grouped_shards`.
CATEGORIES = {"um": 14, "umm": 5, "uu": 5}
VAL_CATEGORIES = ["umm", "uu"]


def kitti_categories(root: Path, categories: dict[str, int] = CATEGORIES) -> Path:
    """Rename a synthetic KITTI folder's samples (all `um_*`) into consecutive runs of `categories`."""
    names = [name for name, count in categories.items() for _ in range(count)]
    for index, name in enumerate(names):
        for folder, kind in (("image_2", ""), ("gt_image_2", "road_")):
            old = root / "training" / folder / f"um_{kind}{index:06d}.png"
            old.rename(old.with_name(f"{name}_{kind}{index:06d}.png"))
    return root


def shards(tmp: Path) -> Path:
    """A real sharded dataset: 16 synthetic KITTI-layout scenes at 64x32."""
    from raytrain.data.shards import write_shards
    from raytrain.data.synthetic import write_synthetic_kitti

    raw = write_synthetic_kitti(tmp / "raw", 16, seed=0, size=(64, 32))
    write_shards(raw, "kitti", tmp / "shards", val_fraction=0.25)
    return tmp / "shards"


def shards_without_val(tmp: Path) -> Path:
    from raytrain.data.shards import write_shards

    write_shards(kitti_folder(tmp), "kitti", tmp / "shards", val_fraction=0.0)
    return tmp / "shards"


def config(tmp: Path, data: Path | str | None = None, **dotted) -> Path:
    """tmp/c.yaml: a tiny valid run on `data` (default: fresh shards), with dotted keys replaced."""
    text = {
        "name": "bad",
        "data": {"path": str(data if data is not None else shards(tmp)), "size": "64x32", "shuffle_buffer": 0},
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
        "train": {"epochs": 1, "batch_size": 2, "num_workers": 2, "max_failures": 0, "storage_path": str(tmp / "results")},
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(set_dotted(text, **dotted)))
    return tmp / "c.yaml"


def finished_experiment(tmp: Path) -> None:
    """A finished `raytrain train` experiment of tmp/c.yaml's config."""
    from raytrain import experiments
    from raytrain.config import load_config

    experiment = experiments.create_experiment(load_config(config(tmp)), "train")
    experiments.mark(experiment, experiments.FINISHED)


def kitti_folder(tmp: Path) -> Path:
    from raytrain.data.synthetic import write_synthetic_kitti

    return write_synthetic_kitti(tmp / "raw", 4, seed=0, size=(32, 16))


def kitti_um_and_uu(tmp: Path) -> Path:
    """kitti_folder's 4 samples as 2 of KITTI's um category and 2 of uu."""
    return kitti_categories(kitti_folder(tmp), {"um": 2, "uu": 2})


def mask_value_outside_class_map(tmp: Path) -> None:
    root = tmp / "raw"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [{name: other, index: 0}, {name: road, index: 1}]\n")
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / f"images/{i}.png")
        Image.fromarray(np.full((8, 8), 7 if i else 1, np.uint8)).save(root / f"masks/{i}.png")


def checkpoint(tmp: Path, name: str = "ckpt", metrics: dict | None = None) -> Path:
    """A real checkpoint directory of a tiny model, as the training loop saves it: seed 0's weights,
    which mark some pixels of write_images' noise as road and some not."""
    import torch

    from raytrain.checkpoints import save_checkpoint
    from raytrain.config import load_config
    from raytrain.models import create_model

    run = load_config({"data": {"path": str(tmp / "shards"), "size": "32x16"}, "model": {"name": "simple", "depth": 1}})
    with torch.random.fork_rng():  # the same weights every time, without touching the caller's generator
        torch.manual_seed(0)
        model = create_model("simple", depth=1)
    optimizer = torch.optim.Adam(model.parameters())
    return save_checkpoint(tmp / "exp" / name, model, optimizer, None, 1, run, metrics or {"val_iou": 0.5})


# An smp model with a small encoder (ResNet-18 to its first stage: 0.6 MB of weights).
SMALL_ENCODER = {"model.name": "smp:Unet", "model.encoder": "resnet18", "model.depth": 2, "model.base_channels": None}


def encoder_weights(path: Path, seed: int = 1, depth: int = 2, change=None) -> Path:
    """`path`: the encoder of SMALL_ENCODER's model at `depth`, built under `seed`, saved as the docs
    say to save one (torch.save(model.encoder.state_dict())), after change(state) -> state where given."""
    import torch

    from raytrain.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = create_model("smp:Unet", encoder="resnet18", depth=depth).encoder.state_dict()
    torch.save(change(state) if change else state, path)
    return path


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`count` noise images of (height, width) `size`, img00.png, img01.png, ..."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{index:02d}.png")
    return folder


@functools.cache
def big_png_bytes() -> bytes:
    encoded = io.BytesIO()
    Image.new("RGB", (12000, 12000)).save(encoded, format="PNG")  # seconds of zlib: made once
    return encoded.getvalue()


def big_png(path: Path) -> None:
    """A real 12000x12000 RGB PNG of about 420 KB: 144 megapixels, 432 MB once decoded."""
    path.write_bytes(big_png_bytes())


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (no pixel data): enough for Image.open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))


def sparse_tail(path: Path) -> None:
    """`path` grown to 3 GiB by a hole: what it held, then zeros that take no block on disk."""
    with open(path, "r+b") as file:
        file.truncate(3 << 30)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def broken_png(damage: str) -> bytes:
    """A small RGB PNG with one damaged chunk, on which Pillow raises neither OSError nor its
    UnidentifiedImageError: "truncated-gama" and "oversized-iccp" (ValueError when opened),
    "junk-chunk" (a chunk type of control bytes between two IDAT chunks: SyntaxError when decoded)."""
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(encoded, format="PNG")
    data = encoded.getvalue()
    (length,) = struct.unpack(">I", data[33:37])  # Pillow writes one IDAT chunk, right after IHDR
    start, image = data[:33], data[41 : 41 + length]
    half = len(image) // 2
    damaged = {
        "truncated-gama": _png_chunk(b"gAMA", b"\0\1") + _png_chunk(b"IDAT", image),
        "oversized-iccp": _png_chunk(b"iCCP", b"p\0\0" + zlib.compress(bytes(20_000_000))) + _png_chunk(b"IDAT", image),
        "junk-chunk": _png_chunk(b"IDAT", image[:half]) + _png_chunk(b"\0\1\2\3", b"abc") + _png_chunk(b"IDAT", image[half:]),
    }
    return start + damaged[damage] + _png_chunk(b"IEND", b"")


BROKEN_PNGS = ["truncated-gama", "oversized-iccp", "junk-chunk"]


# The small datasets of the format tests: W x H images, in these colours.
W, H = 12, 8
ROAD, CAR, SKY, VOID = (128, 64, 128), (64, 0, 128), (70, 130, 180), (0, 0, 0)


def camvid_annot(seed):
    annot = np.random.default_rng(seed).integers(0, 12, (H, W)).astype(np.uint8)  # 0..10 classes, 11 void
    annot[0, :4] = [3, 11, 0, 10]
    return annot


def folder_dataset(tmp_path, class_map, masks, rgb):
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump(class_map))
    for stem, mask in masks.items():
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8), mode="RGB" if rgb else "L").save(root / "masks" / f"{stem}.png")
    return root


def palette_mask(seed):
    choice = np.random.default_rng(seed).integers(0, 4, (H, W))
    return choice, np.array([ROAD, CAR, SKY, VOID], np.uint8)[choice]


PALETTE_MAP = {
    "classes": [{"name": "road", "color": list(ROAD)}, {"name": "car", "color": list(CAR)}, {"name": "sky", "color": list(SKY)}],
    "ignore_color": list(VOID),
}


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def kitti_with_lanes(tmp_path):
    """um_ images with road and ego-lane ground truth, umm_ images with road ground truth only."""
    from raytrain.data.formats import encode_kitti_gt

    root = tmp_path / "kitti"
    (root / "training/image_2").mkdir(parents=True)
    (root / "training/gt_image_2").mkdir()
    lanes = {}
    for k, stem in enumerate(["um_000000", "um_000001", "umm_000000"]):
        category, number = stem.split("_")
        road = np.zeros((H, W), bool)
        road[4:, 2:10] = True
        Image.fromarray(np.full((H, W, 3), 30 * k, np.uint8)).save(root / "training/image_2" / f"{stem}.png")
        Image.fromarray(encode_kitti_gt(road)).save(root / "training/gt_image_2" / f"{category}_road_{number}.png")
        if category == "um":
            lane = np.zeros((H, W), bool)
            lane[4:, 4 + k : 7 + k] = True
            valid = np.ones((H, W), bool)
            valid[0] = False
            Image.fromarray(encode_kitti_gt(lane, valid)).save(root / "training/gt_image_2" / f"um_lane_{number}.png")
            lanes[stem] = np.where(valid, lane, IGNORE_INDEX).astype(np.uint8)
    return root, lanes


# ---------------------------------------------------------------- one line, exit 2, nothing written

# The command of the data rows: shard {tmp}/raw (a KITTI-layout folder) into {tmp}/out.
SHARD = ["data", "shard", "{tmp}/raw", "--format", "kitti", "--out", "{tmp}/out"]
C = "{tmp}/c.yaml"  # the config file of the bad-input table's rows

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file, folder and link below root with its size and modification time (of a link itself:
    a broken link or a loop has no target to stat)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


# As root, the CLI runs without the two capabilities that let root read and write any file (util-linux's
# setpriv), so that rows about unreadable files and read-only folders see what a user sees. setpriv
# works on a fresh program, so those rows (marked as_a_user) run in a fresh interpreter.
AS_A_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 and shutil.which("setpriv") else []
PERMISSIONS_HOLD = os.geteuid() != 0 or bool(AS_A_USER)
NEEDS_PERMISSIONS = [
    pytest.mark.skipif(not PERMISSIONS_HOLD, reason="runs as root without setpriv: root reads and writes files whatever their permissions"),
    pytest.mark.as_a_user,
]

# The bomb rows' memory bound: what the CLI may allocate (RLIMIT_DATA: heap and private writable
# mappings). Not an address-space limit, which torch's libraries alone exceed, and not max RSS, which
# counts the libraries' pages too and so depends on what the page cache holds (a fresh virtual
# environment read 240 MB more). It is counted from after the imports: what the command allocates.
MEMORY_LIMIT = 2**30

# Rows that get as far as starting Ray, which keeps its own record of the failed run under train.storage_path.
REACH_RAY = {"workers-nan-loss", "train-shard-image-bomb"}


def needs_a_fresh_interpreter(request) -> bool:
    return request.node.get_closest_marker("as_a_user") is not None or request.node.callspec.id in REACH_RAY


def run_raytrain(args: list[str], cwd: Path, fresh: bool = False, memory_limit: int | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI with args in its own process, forked or a fresh interpreter; allowed at most
    memory_limit bytes of data where given, and `timeout` seconds (then subprocess.TimeoutExpired)."""
    if not fresh:
        return run_cli(args, cwd, memory_limit=memory_limit, timeout=timeout)
    limit = None if memory_limit is None else lambda: resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    return run_cli_fresh(args, cwd, prefix=AS_A_USER, preexec_fn=limit, timeout=timeout)


def assert_one_line_error(run: subprocess.CompletedProcess, fragments: list[str], tmp: Path) -> None:
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raytrain: error: "), run.stderr
    for fragment in fragments:
        assert fragment.format(tmp=tmp) in lines[0]


def check_one_line_and_nothing_written(tmp: Path, args: list[str], setup, fragments: list[str],
                                       fresh: bool = False, memory_limit: int | None = None, timeout: float = 600) -> None:
    """setup(tmp), then the CLI with args: exit 2, one line holding every fragment, tmp unchanged."""
    setup(tmp)
    before = snapshot(tmp)
    run = run_raytrain([a.format(tmp=tmp) for a in args], tmp, fresh, memory_limit, timeout)
    assert_one_line_error(run, fragments, tmp)  # a MemoryError would be a traceback
    assert snapshot(tmp) == before  # also: no temporary file left


# ---------------------------------------------------------------- shared by the files that one test file was split into

SIZES = [(375, 1242), (61, 97)]  # a KITTI image, and an odd size that is no multiple of anything


SIMPLE, UNET = {"name": "simple", "depth": 1}, {"name": "unet", "base_channels": 4, "depth": 2}


def make_checkpoint(tmp, options=UNET, classes=("road",)):
    """A checkpoint of a lab model at a training size of 64x32 with seeded random weights, its head
    scaled so that the probabilities spread out as a trained model's do."""
    from raytrain.checkpoints import save_checkpoint
    from raytrain.config import load_config
    from raytrain.models import create_model

    config = load_config({"classes": list(classes), "data": {"path": str(tmp), "size": "64x32"}, "model": options})
    torch.manual_seed(0)
    model = create_model(**options, num_classes=config.num_classes)
    with torch.no_grad():
        model.head.weight.mul_(20)
    return save_checkpoint(tmp / options["name"], model, torch.optim.Adam(model.parameters()), None, 1, config, {})


def batches(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8) for height, width in SIZES]


def shard_by_drive(src: Path, out: Path, val_drive: str) -> Path:
    """Shards as data/README.md recommends: binary road, one whole drive held out for val."""
    done = run_cli(["data", "shard", src, "--format", "camvid", "--classes", "road", "--group-by", "^[^_]+",
                    "--val-groups", val_drive, "--out", out], timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def _hand_made_run(config, epochs=(1, 2), ious=(0.3, 0.5)) -> str:
    """An experiment of `config` with real checkpoint files, written without Ray."""
    import torch

    from raytrain.checkpoints import save_checkpoint
    from raytrain.models import create_model

    experiment = experiments.create_experiment(config, "train")
    torch.manual_seed(0)
    model = create_model(config.model.name, num_classes=1, **config.model.kwargs())
    optimizer = torch.optim.Adam(model.parameters())
    for epoch, iou in zip(epochs, ious):
        metrics = {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_f1": iou + 0.1, "val_iou": iou}
        save_checkpoint(Path(experiment) / f"checkpoint_{epoch:06d}", model, optimizer, None, epoch, config, metrics)
    experiments.mark(experiment, experiments.FINISHED)
    return experiment


CURVE_PNGS = {"loss.png", "accuracy.png", "f1.png", "iou.png"}


def _check_report(out: Path, index: Path, expected_pngs: set[str]):
    assert index == out / "index.html"
    pngs = {path.name for path in out.glob("*.png")}
    assert pngs == expected_pngs
    page = index.read_text()
    for name in pngs:
        assert f'<img src="{name}"' in page
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2, f"{name} is blank"
    return page


def check_bad_input_row(request, tmp_path, args, setup, fragments) -> None:
    """One row of the bad-input table: one line naming the fault, exit code 2, nothing written (a
    row that reaches Ray leaves no checkpoint; its results folder is Ray's own)."""
    setup(tmp_path)
    before = snapshot(tmp_path)
    run = run_raytrain([a.format(tmp=tmp_path) for a in args], tmp_path, needs_a_fresh_interpreter(request))
    assert_one_line_error(run, fragments, tmp_path)
    after = snapshot(tmp_path)
    if request.node.callspec.id in REACH_RAY:
        assert not [p for p in after if "checkpoint_" in p]
        after = {p: s for p, s in after.items() if not p.startswith("results")}
    assert after == before


# ---------------------------------------------------------------- a search for the selection rules

# Each trial's val_iou per epoch, and its val group uu's (um's is val_iou + 0.02, so uu is always the
# worst): picked so that each rule picks another trial or epoch. trial_b reports epoch 3 twice, first
# 0.99 (a restored trial reports an epoch again; the last report counts).
SELECTION_TRIALS = {
    "trial_a": ([0.50, 0.95, 0.40, 0.30], [0.30, 0.35, 0.30, 0.20]),
    "trial_b": ([0.10, 0.20, 0.30, 0.90], [0.05, 0.10, 0.20, 0.40]),
    "trial_c": ([0.60, 0.85, 0.84, 0.83], [0.50, 0.70, 0.80, 0.60]),
    "trial_d": ([0.00, 0.00, 0.86, 0.86], [0.00, 0.00, 0.50, 0.50]),
}


def selection_checkpoint(trial: Path, epoch: int) -> Path:
    """Where the crafted search keeps a trial's checkpoint of `epoch`, named as Ray Train names them."""
    return trial / "train" / f"checkpoint_2026-01-01_00-00-{epoch:02d}.000000"


def search_for_selection(tmp: Path, **search) -> Path:
    """A finished tune experiment of SELECTION_TRIALS written without Ray: Tune's params.json and
    result.json in each trial folder, and every epoch's checkpoint (save_checkpoint, sealed) in its
    Train run's folder. `search`: the search.* keys the experiment records (select, last_k, ...)."""
    from raytrain.checkpoints import save_checkpoint
    from raytrain.config import load_config
    from raytrain.models import create_model

    config = load_config({"name": "picks", "data": {"path": str(tmp / "shards"), "size": "32x16"},
                          "model": {"name": "simple", "depth": 1}, "train": {"storage_path": str(tmp / "results")},
                          "search": {"space": {"optim.lr": {"choice": [0.001, 0.01]}}, **search}})
    experiment = Path(experiments.create_experiment(config, "tune"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("simple", depth=1)
    optimizer = torch.optim.Adam(model.parameters())
    for index, (name, (ious, worst)) in enumerate(SELECTION_TRIALS.items()):
        trial = experiment / name
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"search": {"optim.lr": 0.001 * (index + 1)}}))
        reports = []
        for epoch, (iou, uu) in enumerate(zip(ious, worst), start=1):
            groups = {"val_iou@um": iou + 0.02, "val_iou@uu": uu, "val_iou@worst": min(iou + 0.02, uu)}
            report = {"epoch": epoch, "val_loss": 1 - iou, "val_iou": iou, "val_f1": iou, **groups, "trial_id": name}
            if name == "trial_b" and epoch == 3:
                reports.append({**report, "val_iou": 0.99})
            reports.append(report)
            save_checkpoint(selection_checkpoint(trial, epoch), model, optimizer, None, epoch, config, report)
        (trial / "result.json").write_text("".join(json.dumps(report) + "\n" for report in reports))
    experiments.mark(str(experiment), experiments.FINISHED)
    return experiment
