"""inference/files: masks of another model are never mixed into an output folder (no Ray: the
record is checked before anything starts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import write_images
from tests.helpers import run_cli
from tests.helpers import checkpoint


def _record(ckpt: Path, **changes) -> str:
    record = {"checkpoint": str(ckpt), "model_sha256": hashlib.sha256((ckpt / "model.pt").read_bytes()).hexdigest(), "tta": "none"}
    return json.dumps({**record, **changes})


@pytest.mark.parametrize("record,expected", [
    (lambda ckpt: _record(ckpt, checkpoint="/elsewhere/best", model_sha256="0" * 64), ["/elsewhere/best", "tta none", "new --out"]),
    (lambda ckpt: _record(ckpt), ["another model or tta", "tta none", "new --out"]),  # same weights, but --tta flip below
    (lambda ckpt: "{not json", ["prediction.json", "not a record of raytrain predict"]),
], ids=["other-weights", "other-tta", "not-a-record"])
@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["one-process", "workers"])
def test_masks_of_another_model_are_never_mixed_into_an_output_folder(tmp_path, record, expected, workers):
    ckpt = checkpoint(tmp_path)
    write_images(tmp_path / "images", 2, (16, 32))
    out = tmp_path / "masks"
    out.mkdir()
    (out / "prediction.json").write_text(record(ckpt))
    (out / "img00_mask.png").write_bytes(b"an earlier mask")
    result = run_cli(["predict", ckpt, tmp_path / "images", "--out", out, *workers, "--tta", "flip"])
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("raytrain: error: ") and all(fragment in line for fragment in expected), line
    assert sorted(p.name for p in out.iterdir()) == ["img00_mask.png", "prediction.json"]
    assert (out / "img00_mask.png").read_bytes() == b"an earlier mask"
