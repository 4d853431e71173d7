"""inference/files: masks of another model are never mixed into an output folder (no Ray: the
record is checked before anything starts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from raytrain.checkpoints import seal
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


def _other_weights(ckpt: Path) -> Path:
    """A second checkpoint beside `ckpt`: the same model with its last layer negated, so it marks
    road where the first does not."""
    import shutil

    import torch

    other = shutil.copytree(ckpt, ckpt.with_name("other"))
    state = torch.load(other / "model.pt", weights_only=True)
    last = [name for name in state if name.endswith(".weight")][-1]
    state[last] = -state[last]
    torch.save(state, other / "model.pt")
    seal(other)
    return other


def test_two_predicts_into_one_new_folder_started_together_one_writes_the_other_is_refused(tmp_path):
    """Both pass their checks before either has written anything: the folder is claimed by creating
    prediction.json exclusively, and the loser stops before its first mask."""
    import threading

    from raytrain.inference.files import predict_files

    ckpt = checkpoint(tmp_path)
    other = _other_weights(ckpt)
    images = write_images(tmp_path / "images", 120, (48, 64))  # enough that each run is still reading while the other checks
    out = tmp_path / "masks"
    runs = {}

    def predict(weights: Path) -> None:
        runs[weights] = run_cli(["predict", weights, images, "--out", out], timeout=300)

    racers = [threading.Thread(target=predict, args=(weights,)) for weights in (ckpt, other)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()

    codes = sorted(run.returncode for run in runs.values())
    assert codes == [0, 2], [(run.returncode, run.stderr[-2000:]) for run in runs.values()]
    winner, loser = sorted(runs, key=lambda weights: runs[weights].returncode)
    [line] = runs[loser].stderr.splitlines()
    assert line.startswith(f"raytrain: error: {out}: ") and "another model" in line, line
    assert json.loads((out / "prediction.json").read_text())["checkpoint"] == str(winner)
    for weights in (winner, loser):  # each model's own masks, alone, to compare with
        predict_files(weights, [images], tmp_path / f"alone_{weights.name}")
    masks = sorted(p.name for p in out.glob("*_mask.png"))
    assert len(masks) == 120
    differ = [name for name in masks if (tmp_path / f"alone_{winner.name}" / name).read_bytes() != (tmp_path / f"alone_{loser.name}" / name).read_bytes()]
    assert len(differ) > 100  # the two models' masks tell them apart
    assert all((out / name).read_bytes() == (tmp_path / f"alone_{winner.name}" / name).read_bytes() for name in masks)
