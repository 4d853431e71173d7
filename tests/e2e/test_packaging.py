"""The wheel: built and installed as a user's pip would, it ships its configs and runs away from the
source tree (in e2e for its time: pip builds and installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import raytrain
from tests.helpers import REPO


def test_the_wheel_ships_its_configs_and_runs_away_from_the_source_tree(tmp_path, tiny_shards):
    """Built and installed as a user's pip would, then run from another folder."""
    repo = REPO
    import setuptools  # noqa: F401  (what builds the wheel without network)

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(repo)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("raytrain-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The dependencies come from this environment (a plain path entry: its .pth files, among them
    # raytrain's own editable install, are not read); raytrain itself only from the wheel.
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "deps.pth").write_text("\n".join(map(str, deps)) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install",
                                "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}

    def run(*args):
        done = subprocess.run([str(venv / "bin/raytrain"), *args], capture_output=True, text=True, timeout=300,
                              cwd=away, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([str(venv / "bin/python"), "-c", "import raytrain; print(raytrain.__file__)"],
                           capture_output=True, text=True, cwd=away, env=env).stdout
    assert where.startswith(str(site)), where  # the wheel's copy, not the source tree
    assert run("--version").strip() == f"raytrain {raytrain.__version__}"
    assert run("configs").split() == ["camvid_multiclass", "camvid_road", "kitti_search", "quickstart", "seed_lab"]
    assert "name: quickstart" in run("config", "show", "quickstart")
    plan = run("train", "quickstart", "--dry-run", "--set", f"data.path={tiny_shards}",
               "--set", f"train.storage_path={tmp_path / 'results'}")
    assert "dry run: nothing started" in plan and "workers_per_trial:     1" in plan
    assert not (tmp_path / "results").exists()
