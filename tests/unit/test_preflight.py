"""Real CamVid (when present beside the repository): shard a subset, train one epoch with 2 DDP
workers; the camvid_road recipe plans on a CamVid-style drive split and runs as one command."""

from pathlib import Path

import numpy as np
from PIL import Image

from raytrain.config import load_config
from tests.helpers import run_cli
from tests.helpers import shard_by_drive


def camvid_drives(root: Path, drives: dict[str, int], size=(48, 36)) -> Path:
    """A CamVid-style folder (class-index PNG annotations, road = 3, 11 = void) whose frames come
    from the given drives, all in train/ as CamVid's own drives are."""
    rng = np.random.default_rng(0)
    for folder in ("train", "trainannot", "val", "valannot"):
        (root / folder).mkdir(parents=True)
    for drive, count in drives.items():
        for frame in range(count):
            annot = rng.integers(0, 12, (size[1], size[0])).astype(np.uint8)
            annot[size[1] // 2 :] = 3  # the road: the lower half
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "train" / f"{drive}_{frame:06d}.png")
            Image.fromarray(annot, mode="L").save(root / "trainannot" / f"{drive}_{frame:06d}.png")
    return root


def test_camvid_road_config_validates_and_plans_on_a_drive_split(tmp_path):
    config = load_config("camvid_road")
    assert config.classes == ["road"] and Path(config.data.path) == Path("data/camvid_road_by_drive").resolve()
    assert config.search.time_budget_s is not None and config.search.time_budget_s <= 30 * 60
    shards = shard_by_drive(camvid_drives(tmp_path / "camvid", {"0001TP": 6, "0006R0": 3}), tmp_path / "shards", "0006R0")
    done = run_cli(["tune", "camvid_road", "--dry-run", "--set", f"data.path={shards}",
                    "--set", f"train.storage_path={tmp_path / 'results'}"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dry run: nothing started" in done.stdout
    plan = dict(line.split(":", 1) for line in done.stdout.splitlines()[1:])
    assert plan["name"].strip() == "camvid_road" and plan["kind"].strip() == "tune"
    assert f"path={shards}, train=6, val=3" in plan["data"]  # drive 0006R0 held out whole
    assert float(plan["time_budget_s"]) == config.search.time_budget_s
    assert not (tmp_path / "results").exists()
