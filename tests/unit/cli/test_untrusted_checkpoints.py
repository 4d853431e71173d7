"""Checkpoints from elsewhere: a checkpoint is data, never code, and loading one costs about its
files' size, whatever its config.yaml claims. Predict and export write whole files, with the
permissions the umask gives, where they were asked to and nowhere else.

Real files, real `raytrain` subprocesses (the bad-input table's helpers), real torch.
"""
from __future__ import annotations

import os
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import raytrain
from raytrain.checkpoints import seal
from tests.helpers import set_dotted
from tests.helpers import cli_environment, run_cli
from tests.helpers import (
    MEMORY_LIMIT, NEEDS_PERMISSIONS, check_one_line_and_nothing_written, checkpoint, needs_a_fresh_interpreter, shards,
)

CKPT = "{tmp}/exp/ckpt"
PREDICT = ["predict", CKPT, "{tmp}/street.png", "--out", "{tmp}/out"]


def street(tmp: Path) -> Path:
    Image.fromarray(np.full((16, 32, 3), 90, np.uint8)).save(tmp / "street.png")
    return tmp / "street.png"


def edit_config(ckpt: Path, **dotted) -> None:
    """Rewrite the checkpoint's config.yaml with dotted keys replaced, and its complete.json to match,
    as a hand could."""
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    (ckpt / "config.yaml").write_text(yaml.safe_dump(set_dotted(config, **dotted)))
    seal(ckpt)


def with_config(**dotted):
    def setup(tmp: Path) -> None:
        edit_config(checkpoint(tmp), **dotted)
        street(tmp)

    return setup


def with_weights(save):
    """A checkpoint whose model.pt is replaced by save(state_dict, path)."""

    def setup(tmp: Path) -> None:
        weights = checkpoint(tmp) / "model.pt"
        save(torch.load(weights, weights_only=True), weights)
        seal(weights.parent)
        street(tmp)

    return setup


BOMB_ELEMENTS = 400_000_000  # float32: 1.6 GB once inflated


def deflate_bomb(tmp: Path) -> None:
    """model.pt of about 1.6 MB whose first tensor claims 400 million floats, stored deflated: torch
    inflates the whole record (1.6 GB) before load_state_dict can see the shape is wrong."""
    weights = checkpoint(tmp) / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["encoder.0.weight"] = torch.zeros(70_000)  # a 4-byte BININT in the pickle, patched below
    torch.save(state, weights)
    small, large = b"J" + struct.pack("<i", 70_000), b"J" + struct.pack("<i", BOMB_ELEMENTS)
    with zipfile.ZipFile(weights) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_name = next(name for name in entries if name.endswith("/data.pkl"))
    assert entries[pickle_name].count(small) == 2  # the storage's size and the tensor's shape
    entries[pickle_name] = entries[pickle_name].replace(small, large)
    entries[pickle_name[: -len("data.pkl")] + "data/0"] = _deflated_zeros(BOMB_ELEMENTS * 4)
    write_zip(weights, entries)
    seal(weights.parent)
    street(tmp)


def _deflated_zeros(size: int) -> tuple[bytes, int, int]:
    """(raw deflate stream, CRC-32, size) of `size` zero bytes, made in a second: one 8 MB block
    is compressed once and repeated (a full flush makes each block independent)."""
    block = bytes(8_000_000)
    assert size % len(block) == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    return deflated * (size // len(block)) + compressor.flush(zlib.Z_FINISH), crc, size


def write_zip(path: Path, entries: dict[str, bytes | tuple[bytes, int, int]]) -> None:
    """A zip file: bytes are stored, (deflate stream, crc, size) deflated. zipfile cannot write an
    entry from data that is already compressed, hence this."""
    body, directory = b"", b""
    for name, data in entries.items():
        method, (payload, crc, size) = (0, (data, zlib.crc32(data), len(data))) if isinstance(data, bytes) else (8, data)
        fields = struct.pack("<HHHHHIIIH", 20, 0, method, 0, 0x21, crc, len(payload), size, len(name))
        offset = struct.pack("<HHHHII", 0, 0, 0, 0, 0, len(body))  # no comment, extra or attributes
        directory += b"PK\x01\x02" + struct.pack("<H", 20) + fields + offset + name.encode()
        body += b"PK\x03\x04" + fields + struct.pack("<H", 0) + name.encode() + payload
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    path.write_bytes(body + directory + end)


BOMBS = [
    pytest.param(
        PREDICT, with_config(**{"model.name": "unet", "model.base_channels": 4096, "model.depth": 4}),
        ["{tmp}/exp/ckpt/config.yaml", "127071186945 parameters", "RAYTRAIN_MAX_PARAMETERS"], id="config-unet-4096-channels",
    ),
    pytest.param(
        # 496 million parameters: under the limit, but 2 GB that model.pt (10 kB) cannot fill
        PREDICT, with_config(**{"model.name": "unet", "model.base_channels": 256, "model.depth": 4}),
        ["{tmp}/exp/ckpt/model.pt", "needs 1985616900 bytes of weights"], id="config-model-bigger-than-its-weights",
    ),
    pytest.param(
        PREDICT, with_config(**{"data.size": "60000x60000"}),
        ["{tmp}/exp/ckpt/config.yaml", "data.size 60000x60000", "RAYTRAIN_MAX_PIXELS"], id="config-size-60000x60000",
    ),
    pytest.param(PREDICT, deflate_bomb, ["{tmp}/exp/ckpt/model.pt", "compressed"], id="weights-deflate-bomb"),
]


@pytest.mark.parametrize("args, setup, fragments", BOMBS)
def test_a_small_checkpoint_never_costs_gigabytes(tmp_path, args, setup, fragments):
    """Refused before the memory is taken: the CLI runs within MEMORY_LIMIT (1 GiB of data)."""
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments, memory_limit=MEMORY_LIMIT)


def read_only_folder(tmp: Path) -> None:
    checkpoint(tmp)
    street(tmp)
    (tmp / "out").mkdir()
    (tmp / "out").chmod(0o555)


CASES = [
    pytest.param(
        PREDICT, with_weights(lambda state, path: torch.save({**state, "hook": os.system}, path)),
        ["{tmp}/exp/ckpt/model.pt", "refused: not a weights-only file", "posix.system"], id="weights-pickled-code",
    ),
    pytest.param(
        PREDICT, with_weights(lambda state, path: torch.save(state, path, _use_new_zipfile_serialization=False)),
        ["{tmp}/exp/ckpt/model.pt", "cannot load the weights", "legacy"], id="weights-legacy-format",
    ),
    pytest.param(
        PREDICT, with_weights(lambda state, path: torch.save({**state, "head.bias": torch.zeros(2)}, path)),
        ["{tmp}/exp/ckpt/model.pt", "head.bias is (2,)"], id="weights-of-another-shape",
    ),
    pytest.param(
        PREDICT, with_config(**{"model.name": "smp:Nope"}), ["{tmp}/exp/ckpt/config.yaml", "smp:Nope"], id="config-unknown-model",
    ),
    pytest.param([*PREDICT, "--device", "banana"], with_config(), ["--device", "'banana'"], id="device-banana"),
    pytest.param([*PREDICT, "--device", "cuda:7"], with_config(), ["--device", "'cuda:7'", "no such device"], id="device-cuda-7"),
    pytest.param(
        ["evaluate", CKPT, "{tmp}/shards", "--device", "meta"], lambda t: (checkpoint(t), shards(t)),
        ["--device", "'meta'"], id="evaluate-device-meta",
    ),
    pytest.param(
        ["export", CKPT, "--out", "{tmp}/adir"], lambda t: (checkpoint(t), (t / "adir").mkdir()),
        ["{tmp}/adir", "is a folder"], id="export-out-is-a-folder",
    ),
    pytest.param(
        ["export", "s3://bucket/exp/ckpt?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"], lambda t: None,
        ["s3://bucket/exp/ckpt", "remote", "--out"], id="export-remote-without-out",
    ),
    pytest.param(
        PREDICT, lambda t: (with_config()(t), (t / "out").write_text("keep me")),
        ["{tmp}/out", "not a folder"], id="predict-out-is-a-file",
    ),
    pytest.param(
        [*PREDICT[:-1], "/proc/raytrain-out"], with_config(), ["/proc/raytrain-out", "cannot create"],
        id="predict-out-cannot-be-made",  # even root cannot make a folder in /proc
    ),
    pytest.param(
        PREDICT, read_only_folder, ["{tmp}/out/prediction.json", "cannot write"], id="predict-out-read-only",  # the first file written
        marks=NEEDS_PERMISSIONS,
    ),
]


@pytest.mark.parametrize("args, setup, fragments", CASES)
def test_bad_checkpoint_or_output_is_one_line_and_nothing_written(request, tmp_path, args, setup, fragments):
    check_one_line_and_nothing_written(tmp_path, args, setup, fragments, needs_a_fresh_interpreter(request))  # also: no .adir.* file left


def cli(args: list, cwd: Path, umask: int | None = None, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, {**cli_environment(), **env}, timeout, umask)


def test_encoder_weights_in_the_config_are_never_downloaded(tmp_path):
    """encoder_weights: imagenet only seeded training; loading takes model.pt's weights and makes no
    network call (this machine has no network: a download attempt fails the run)."""
    from raytrain.checkpoints import save_checkpoint
    from raytrain.config import load_config
    from raytrain.models import create_model

    options = {"name": "smp:Unet", "encoder": "resnet18", "depth": 2}
    config = load_config({"data": {"path": str(tmp_path), "size": "32x32"}, "model": {**options, "encoder_weights": "imagenet"}})
    model = create_model("smp:Unet", encoder="resnet18", depth=2)  # as if from imagenet, then trained
    save_checkpoint(tmp_path / "ckpt", model, torch.optim.Adam(model.parameters()), None, 1, config, {"val_iou": 0.5})
    street(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    run = cli(["predict", tmp_path / "ckpt", tmp_path / "street.png", "--out", tmp_path / "out"], tmp_path,
              HOME=str(home), TORCH_HOME=str(home / "torch"), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "cache"))
    assert run.returncode == 0, run.stderr
    assert list(home.rglob("*")) == []  # no pretrained weights fetched into any cache
    loaded = raytrain.load_model(tmp_path / "ckpt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[name], tensor)


def test_export_of_a_file_uri_goes_beside_the_checkpoint(tmp_path):
    ckpt = checkpoint(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    run = cli(["export", f"file://{ckpt}"], work)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(ckpt / "model.torchscript.pt") and (ckpt / "model.torchscript.pt").is_file()
    assert list(work.rglob("*")) == []  # not ./file:/...


def test_predict_and_export_files_have_the_umasks_mode(tmp_path):
    ckpt = checkpoint(tmp_path)
    street(tmp_path)
    assert cli(["predict", ckpt, tmp_path / "street.png", "--out", tmp_path / "out"], tmp_path, umask=0o027).returncode == 0
    assert cli(["export", ckpt, "--out", tmp_path / "model.ts"], tmp_path, umask=0o027).returncode == 0
    written = [tmp_path / "out/street_mask.png", tmp_path / "out/street_overlay.png", tmp_path / "model.ts"]
    assert [oct(path.stat().st_mode & 0o777) for path in written] == ["0o640"] * 3  # not mkstemp's 0o600
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left behind


def damaged_experiment(tmp: Path) -> Path:
    """checkpoint `good` (val_iou 0.5) among damaged ones that old code either failed on or picked."""
    checkpoint(tmp, "good")
    checkpoint(tmp, "corrupt_metrics")
    (tmp / "exp/corrupt_metrics/metrics.json").write_text("{val_iou: ")
    for name, text in [("infinite", "Infinity"), ("nan", "NaN"), ("boolean", "true")]:
        checkpoint(tmp, name)
        (tmp / f"exp/{name}/metrics.json").write_text(f'{{"val_iou": {text}}}')
    checkpoint(tmp, "corrupt_config", {"val_iou": 0.9})
    (tmp / "exp/corrupt_config/config.yaml").write_text("model: [\n")
    checkpoint(tmp / "elsewhere", "other", {"val_iou": 0.99})  # another experiment's best
    (tmp / "exp/checkpoint_linked").symlink_to(tmp / "elsewhere/exp/other")
    (tmp / "exp/checkpoint_root").symlink_to("/")  # old code walked the whole machine
    for name in ("corrupt_metrics", "infinite", "nan", "boolean", "corrupt_config"):
        seal(tmp / "exp" / name)  # as a hand could: each file's own check, not complete.json's
    return tmp / "exp"


DAMAGED = ["corrupt_metrics/metrics.json", "infinite/metrics.json", "nan/metrics.json", "boolean/metrics.json",
           "corrupt_config/config.yaml"]


def test_best_checkpoint_skips_damage_and_names_it(tmp_path):
    experiment = damaged_experiment(tmp_path)
    run = cli(["best", experiment], tmp_path, timeout=120)  # a walk of / would take far longer
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(experiment / "good")
    notes = run.stderr.splitlines()
    assert all(line.startswith("raytrain: note: skipped ") for line in notes) and len(notes) == 5, run.stderr
    for damaged in DAMAGED:
        assert sum(str(experiment / damaged) in line for line in notes) == 1, damaged
    with pytest.warns(UserWarning) as caught:
        assert raytrain.best_checkpoint(experiment).path == experiment / "good"
    assert sorted(str(w.message).split(":")[0] for w in caught) == sorted(
        f"skipped {experiment / damaged}" for damaged in DAMAGED)
