"""preflight: the checks and the plan that `raytrain train|tune` make before Ray starts, called in
process on tiny shards; and the camvid_road recipe, which plans on a CamVid-style drive split."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain.config import load_config
from raytrain.data.manifest import read_manifest
from tests.helpers import run_cli, shard_by_drive, tiny_config


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


def test_check_ready_returns_the_manifest_of_a_config_that_passes(tiny_shards, tmp_path):
    from raytrain.preflight import check_ready

    config = tiny_config(tiny_shards, tmp_path)
    checked, manifest = check_ready(config, local_cpus=4)
    assert checked == config
    assert manifest.class_names == ["road"] and manifest.count("train") + manifest.count("val") == 24


def test_the_worst_groups_metric_passes_on_grouped_val_data_and_is_refused_in_early_stopping_without(grouped_shards, tiny_shards, tmp_path):
    from raytrain.errors import ConfigError
    from raytrain.preflight import check_ready

    grouped = tiny_config(grouped_shards, tmp_path, **{"search.metric": "val_f1@worst", "train.early_stopping.metric": "val_iou@worst"})
    assert check_ready(grouped, None)[1].metric_groups("val") == ["umm", "uu"]
    ungrouped = tiny_config(tiny_shards, tmp_path, **{"train.early_stopping.metric": "val_iou@worst"})
    with pytest.raises(ConfigError, match=f"train.early_stopping.metric val_iou@worst: .* data.path {tiny_shards} has no val groups"):
        check_ready(ungrouped, None)


def test_a_missing_shard_folder_is_one_line_naming_it(tmp_path):
    from raytrain.errors import DataError
    from raytrain.preflight import check_ready

    missing = tmp_path / "no_shards_here"
    with pytest.raises(DataError) as caught:
        check_ready(tiny_config(missing, tmp_path), local_cpus=4)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.path: ") and str(missing) in message


def test_a_cluster_too_small_for_the_workers_is_refused_before_ray(tiny_shards, tmp_path):
    from raytrain.errors import RaytrainError
    from raytrain.preflight import check_ready

    with pytest.raises(RaytrainError):
        check_ready(tiny_config(tiny_shards, tmp_path), local_cpus=2)  # 2 workers + 1 CPU for Ray Data


def test_the_plan_of_a_train_run(tiny_shards, tmp_path):
    from raytrain.preflight import plan

    config = tiny_config(tiny_shards, tmp_path)
    lines = plan(config, "train", local_cpus=4)
    manifest = read_manifest(tiny_shards)
    assert lines["kind"] == "train" and lines["name"] == "tiny" and lines["trials"] == 1
    assert lines["scheduler"] is None and lines["search_space"] == {} and lines["epochs"] == 2
    assert lines["workers_per_trial"] == 2 and lines["cpus_per_trial"] == 2 and lines["gpus_per_trial"] == 0
    assert lines["cluster"] == "local, 4 logical CPUs" and lines["model"] == "unet"
    assert lines["data"] == {"path": str(tiny_shards), "train": manifest.count("train"), "val": manifest.count("val"),
                             "size": "64x32", "classes": ["road"]}
    assert plan(config, "train", local_cpus=None)["cluster"] == "the running cluster"


# ---------------------------------------------------------------- the decoded cache's budget


def cache_config(shards, tmp_path, mode, size=(64, 32)):
    return tiny_config(shards, tmp_path, **{"data.cache": mode, "data.size": list(size)})


def test_decoded_bytes_are_both_splits_at_the_training_size(tiny_shards, tmp_path):
    from raytrain.data.manifest import read_manifest
    from raytrain.preflight import decoded_bytes

    manifest = read_manifest(tiny_shards)
    images = manifest.count("train") + manifest.count("val")
    assert decoded_bytes(cache_config(tiny_shards, tmp_path, "auto", (64, 32)), manifest) == images * 64 * 32 * 4


@pytest.mark.parametrize("mode, store, expected", [
    ("off", 10**12, (False, None)),
    ("auto", 10**12, (True, None)),
    ("memory", 10**12, (True, None)),
    ("auto", None, (True, None)),  # a cluster not joined yet: decided again once joined
])
def test_cache_decision_when_the_splits_fit(tiny_shards, tmp_path, mode, store, expected):
    from raytrain.data.manifest import read_manifest
    from raytrain.preflight import cache_decision

    assert cache_decision(cache_config(tiny_shards, tmp_path, mode), read_manifest(tiny_shards), store) == expected


def test_cache_auto_streams_with_a_note_and_memory_refuses_when_over_the_budget(tiny_shards, tmp_path):
    from raytrain.data.manifest import read_manifest
    from raytrain.errors import ConfigError
    from raytrain.preflight import CACHE_SHARE, cache_decision, decoded_bytes

    manifest = read_manifest(tiny_shards)
    config = cache_config(tiny_shards, tmp_path, "auto")
    store = decoded_bytes(config, manifest) / CACHE_SHARE - 1  # one byte short of fitting
    on, note = cache_decision(config, manifest, store)
    assert not on and "data.cache auto" in note and "streaming" in note and "over the budget" in note
    assert cache_decision(config, manifest, store + 1) == (True, None)
    with pytest.raises(ConfigError, match="data.cache memory.*over the budget"):
        cache_decision(cache_config(tiny_shards, tmp_path, "memory"), manifest, store)


def test_the_plan_says_whether_the_cache_is_on_and_its_size(tiny_shards, tmp_path):
    from raytrain.preflight import plan

    assert plan(cache_config(tiny_shards, tmp_path, "auto"), "train", 4)["cache"] == "on: 0.2 MiB decoded, kept in the object store"
    assert plan(cache_config(tiny_shards, tmp_path, "off"), "train", 4)["cache"] == "off: 0.2 MiB decoded every epoch"
    assert "decided against the running cluster" in plan(cache_config(tiny_shards, tmp_path, "auto"), "train", None)["cache"]


def test_local_object_store_is_ray_s_default_share_of_the_available_memory():
    import os

    from raytrain.preflight import local_object_store_bytes

    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    assert 0 < local_object_store_bytes() <= 0.3 * available * 1.05  # memory moves between the two reads


# ---------------------------------------------------------------- a local cluster sized to the config


def test_more_workers_than_the_machine_can_hold_are_refused_unless_the_cluster_is_sized(tiny_shards, tmp_path, monkeypatch):
    """`--set train.num_workers=64` on a laptop once started 64 worker processes; --num-cpus is the
    user saying how large the local cluster is, so that is still allowed."""
    from raytrain.errors import ConfigError
    from raytrain.preflight import WORKERS_PER_CORE, local_cluster_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cores = os.cpu_count()
    many = WORKERS_PER_CORE * cores + 1
    config = tiny_config(tiny_shards, tmp_path, **{"train.num_workers": many})
    with pytest.raises(ConfigError, match=rf"train.num_workers={many} starts {many} worker processes, over {WORKERS_PER_CORE} per CPU .*\({cores}\).*--num-cpus"):
        local_cluster_cpus(config, "train")
    assert local_cluster_cpus(config, "train", num_cpus=many + 1) == many + 1
    fits = tiny_config(tiny_shards, tmp_path, **{"train.num_workers": WORKERS_PER_CORE * cores})
    assert local_cluster_cpus(fits, "train") == WORKERS_PER_CORE * cores + 1  # and Ray Data's CPU
    search = tiny_config(tiny_shards, tmp_path, **{"train.num_workers": cores, "search.max_concurrent_trials": WORKERS_PER_CORE + 1})
    with pytest.raises(ConfigError, match=rf"x {WORKERS_PER_CORE + 1} trials at a time .*search.max_concurrent_trials"):
        local_cluster_cpus(search, "tune")
    assert local_cluster_cpus(search, "train") == cores + 1  # train runs one at a time


def test_too_many_workers_is_one_line_at_the_cli(tmp_path):
    from raytrain.preflight import WORKERS_PER_CORE
    from tests.helpers import assert_one_line_error, config

    many = WORKERS_PER_CORE * os.cpu_count() + 1
    path = config(tmp_path, **{"train.num_workers": many})
    run = run_cli(["train", path, "--dry-run"], tmp_path)
    assert_one_line_error(run, [f"train.num_workers={many}", "worker processes", "--num-cpus"], tmp_path)
    assert run_cli(["train", path, "--dry-run", "--num-cpus", many + 1], tmp_path).returncode == 0


def test_check_ready_pins_the_encoder_weights_files_sha256_so_a_worker_refuses_another_file(tiny_shards, tmp_path):
    """Every worker loads the bytes preflight checked: a node's other copy, or the file replaced
    after the checks, is refused. A search that searches the file pins none (each trial records its own)."""
    import hashlib

    from raytrain.checkpoints import initial_model
    from raytrain.errors import ConfigError
    from raytrain.preflight import check_ready
    from tests.helpers import SMALL_ENCODER, encoder_weights

    file = encoder_weights(tmp_path / "resnet18.pt")
    config = tiny_config(tiny_shards, tmp_path, **SMALL_ENCODER, **{"model.encoder_weights": str(file)})
    pinned, _ = check_ready(config, local_cpus=4)
    assert pinned == config.with_overrides({"model.encoder_weights_sha256": hashlib.sha256(file.read_bytes()).hexdigest()})
    assert initial_model(pinned)[1] == pinned  # the same file, as a worker reads it

    other = encoder_weights(tmp_path / "other.pt", seed=2)
    searched = config.with_overrides({"search.space": {"model.encoder_weights": {"choice": [str(file), str(other)]}}})
    assert check_ready(searched, local_cpus=4, search=True)[0] == searched
    encoder_weights(file, seed=2)  # replaced after the checks
    with pytest.raises(ConfigError, match=f"^model.encoder_weights: {file}: its SHA-256 is .*, not model.encoder_weights_sha256's"):
        initial_model(pinned)
