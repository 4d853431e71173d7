"""The CLI on S3, as a cluster user reaches it: a real S3-protocol server on 127.0.0.1 (moto's, the
`s3_server` fixture) and only the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). What S3 does wrong is one line naming the bucket or the
key, exit code 2, and nothing half-written. No Ray starts here (train --dry-run starts nothing); in
e2e for the server and the SDK's retries against endpoints that do not answer."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.helpers import assert_one_line_error, config, free_port, run_cli, snapshot


def kitti_folder(tmp):
    """8 synthetic scenes at 32x16 (--val-fraction 0.25 holds out 1)."""
    from raytrain.data.synthetic import write_synthetic_kitti

    return write_synthetic_kitti(tmp / "raw", 8, seed=0, size=(32, 16))


def shard(src, out, env):
    return run_cli(["data", "shard", src, "--format", "kitti", "--val-fraction", "0.25", "--out", out], env=env, timeout=120)


def test_shards_written_to_s3_are_read_back_by_a_dry_run(tmp_path, s3_server, s3_prefix):
    raw = kitti_folder(tmp_path)
    out = f"{s3_prefix}/shards"
    done = shard(raw, out, s3_server.env)
    assert done.returncode == 0, done.stderr
    keys = s3_server.keys(out)
    assert "manifest.json" in keys and [k for k in keys if k.endswith(".parquet")], keys
    assert not [k for k in keys if k.startswith(".") or "/." in k], keys  # no temporary left

    # The local shards of the same folder: the manifest on S3 lists the same samples.
    local = shard(raw, tmp_path / "local", s3_server.env)
    assert local.returncode == 0, local.stderr
    remote_manifest = json.loads(s3_server.filesystem().open_input_stream(f"{out.removeprefix('s3://')}/manifest.json").read())
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert remote_manifest["num_samples"] == local_manifest["num_samples"] == {"train": 7, "val": 1}

    dry = run_cli(["train", config(tmp_path, out), "--dry-run"], tmp_path, env=s3_server.env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert out in dry.stdout


def test_shard_to_a_missing_bucket_is_one_line_naming_it(tmp_path, s3_server):
    raw = kitti_folder(tmp_path)
    before = snapshot(tmp_path)
    run = shard(raw, "s3://no-such-bucket/shards", s3_server.env)
    assert_one_line_error(run, ["s3://no-such-bucket/shards: the bucket 'no-such-bucket' does not exist"], tmp_path)
    assert snapshot(tmp_path) == before


def test_train_on_data_in_a_missing_bucket_is_one_line_before_ray(tmp_path, s3_server):
    run = run_cli(["train", config(tmp_path, "s3://no-such-bucket/shards")], tmp_path, env=s3_server.env, timeout=120)
    assert_one_line_error(run, ["data.path: s3://no-such-bucket/shards", "bucket 'no-such-bucket' does not exist"], tmp_path)
    assert not (tmp_path / "results").exists()


def test_train_storing_in_a_missing_bucket_is_one_line_even_in_a_dry_run(tmp_path, s3_server, s3_prefix):
    data = f"{s3_prefix}/shards"
    assert shard(kitti_folder(tmp_path), data, s3_server.env).returncode == 0
    run_config = config(tmp_path, data, **{"train.storage_path": "s3://no-such-bucket/results"})
    run = run_cli(["train", run_config, "--dry-run"], tmp_path, env=s3_server.env, timeout=120)
    assert_one_line_error(run, ["train.storage_path: s3://no-such-bucket/results", "'no-such-bucket' does not exist"], tmp_path)


def test_wrong_credentials_are_one_line(tmp_path, s3_server, s3_prefix):
    raw = kitti_folder(tmp_path)
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    before = snapshot(tmp_path)
    run = shard(raw, f"{s3_prefix}/shards", env)
    assert snapshot(tmp_path) == before
    assert_one_line_error(run, [f"{s3_prefix}/shards: cannot reach the bucket '{s3_server.bucket}'", "ACCESS_DENIED"], tmp_path)
    assert s3_server.keys(s3_prefix) == []

    unknown = {**s3_server.env, "AWS_ACCESS_KEY_ID": "AKIANOTAKEY"}
    run = run_cli(["train", config(tmp_path, f"{s3_prefix}/shards"), "--dry-run"], tmp_path, env=unknown, timeout=120)
    assert_one_line_error(run, [f"data.path: {s3_prefix}/shards", f"cannot reach the bucket '{s3_server.bucket}'"], tmp_path)


@pytest.mark.parametrize("endpoint, says", [("closed", "Could not connect"), ("silent", "Timeout was reached")])
def test_an_endpoint_that_does_not_answer_is_one_line_in_bounded_time(tmp_path, s3_server, s3_prefix, endpoint, says):
    """A closed port, and one that accepts connections and never replies (the kernel's backlog
    accepts them; nothing reads): the SDK's standard retries, then one line."""
    raw = kitti_folder(tmp_path)
    before = snapshot(tmp_path)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = free_port() if endpoint == "closed" else silent.getsockname()[1]
        start = time.monotonic()
        run = shard(raw, f"{s3_prefix}/shards", {**s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        took = time.monotonic() - start
    assert_one_line_error(run, [f"{s3_prefix}/shards: cannot reach the bucket '{s3_server.bucket}'", says], tmp_path)
    assert took < 30  # a silent endpoint held it 100 s under the SDK's legacy retries
    assert snapshot(tmp_path) == before and s3_server.keys(s3_prefix) == []


def test_shard_onto_existing_shards_is_one_line_and_keeps_them(tmp_path, s3_server, s3_prefix):
    raw = kitti_folder(tmp_path)
    out = f"{s3_prefix}/shards"
    assert shard(raw, out, s3_server.env).returncode == 0
    before = s3_server.keys(out)
    run = shard(raw, out, s3_server.env)
    assert_one_line_error(run, [f"{out}: already exists"], tmp_path)
    assert s3_server.keys(out) == before
