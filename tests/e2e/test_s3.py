"""A cluster user's day on S3, through the CLI in real subprocesses: shards to s3://, `train` reading
them and storing its experiment in s3:// (TensorBoard's files too, read back), then `runs`, `best`,
`report`, `evaluate` (on the s3:// shards), `export`, `predict --workers` (s3:// images into s3://) and
`serve` with the s3:// checkpoint, MLflow tracking the run.
The store is moto's S3-protocol server on 127.0.0.1 (the `s3_server` fixture), reached only through
the standard AWS variables; `train` starts a local Ray cluster of its own, which inherits them."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

import raytrain
from tests.helpers import (config, free_port, read_events, run_cli, run_cli_fresh, search_for_selection, selection_checkpoint,
                           write_images)


@pytest.mark.ray
@pytest.mark.slow
def test_shard_train_runs_best_evaluate_predict_export_and_serve_on_s3(tmp_path, s3_server, s3_prefix, ray_cluster):
    from raytrain.data.synthetic import write_synthetic_kitti

    env = s3_server.env
    data, storage = f"{s3_prefix}/shards", f"{s3_prefix}/results"
    raw = write_synthetic_kitti(tmp_path / "raw", 8, seed=0, size=(32, 16))
    done = run_cli(["data", "shard", raw, "--format", "kitti", "--val-fraction", "0.25", "--out", data], env=env, timeout=120)
    assert done.returncode == 0, done.stderr

    # MLflow's store stays on this machine (train.tracking_uri), as docs/usage.md has it for s3:// storage.
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    run_config = config(tmp_path, data, **{"train.num_workers": 1, "train.storage_path": storage,
                                           "train.tracking": "mlflow", "train.tracking_uri": tracking})
    trained = run_cli_fresh(["train", run_config, "--num-cpus", "2", "-q"], tmp_path, env=env, timeout=480)
    assert trained.returncode == 0, trained.stderr
    assert not (tmp_path / "results").exists()  # everything went to S3
    stored = s3_server.keys(storage)
    [weights] = [key for key in stored if key.endswith("/model.pt")]  # 1 epoch, 1 checkpoint
    checkpoint = f"{storage}/{weights.removesuffix('/model.pt')}"
    # the paths train prints, and its next steps, are s3:// URIs a user can run, not Ray's bucket/key
    assert f"checkpoint: {checkpoint}\n" in trained.stdout and f"  raytrain serve {checkpoint}\n" in trained.stdout

    runs = run_cli(["runs", storage, "--json"], tmp_path, env=env, timeout=120)
    assert runs.returncode == 0, runs.stderr
    [experiment] = json.loads(runs.stdout)
    assert experiment["status"] == "finished" and experiment["path"].startswith(f"{storage}/bad/")
    assert f"experiment: {experiment['path']}\n" in trained.stdout

    best = run_cli(["best", experiment["path"], "--json"], tmp_path, env=env, timeout=120)
    assert best.returncode == 0, best.stderr
    found = json.loads(best.stdout)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    [run] = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["best_checkpoint"] == checkpoint
    assert run.data.metrics["val_iou"] == pytest.approx(found["metrics"]["val_iou"], abs=1e-6)
    # best fetches the checkpoint it picks into the local cache, once.
    assert found["experiment"] == experiment["path"] and found["path"].endswith("/" + checkpoint.rpartition("/")[2])

    # TensorBoard's val run, copied up each epoch, read back from the bucket: the reported val IoU.
    [events] = [key for key in stored if "/tensorboard/val/events.out.tfevents." in key]
    (tmp_path / "val").mkdir()
    pafs.copy_files(f"{storage.removeprefix('s3://')}/{events.rpartition('/')[0]}", str(tmp_path / "val"),
                    source_filesystem=s3_server.filesystem(), destination_filesystem=pafs.LocalFileSystem())
    [logged] = read_events(tmp_path / "val").Scalars("iou")
    assert logged.value == pytest.approx(found["metrics"]["val_iou"], abs=1e-6)

    # report reads the trials' histories, the best checkpoint and its val shards from S3.
    reported = run_cli(["report", experiment["path"], "--out", tmp_path / "report"], tmp_path, env=env, timeout=120)
    assert reported.returncode == 0, reported.stderr
    assert reported.stdout.strip() == str(tmp_path / "report" / "index.html")
    assert f"<td>{found['metrics']['val_iou']:.4f}</td>" in (tmp_path / "report" / "index.html").read_text()

    # evaluate reads the checkpoint and the shards from S3 and gives the val IoU the run reported.
    evaluated = run_cli(["evaluate", checkpoint, data, "--json"], tmp_path, env=env, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["iou"] == pytest.approx(found["metrics"]["val_iou"], abs=1e-6)

    exported = run_cli(["export", checkpoint, "--format", "torchscript", "--out", tmp_path / "model.pt"], tmp_path,
                       env=env, timeout=120)
    assert exported.returncode == 0, exported.stderr
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        probabilities = torch.jit.load(tmp_path / "model.pt")(torch.from_numpy(images))[:, 0]
    expected = raytrain.predict(raytrain.load_model(found["path"]), list(images))  # the copy best fetched
    torch.testing.assert_close(probabilities, torch.from_numpy(np.stack(expected)))

    # predict on the cluster, from s3:// images into s3://, with the s3:// checkpoint: the masks of local predict.
    images, inputs, out = write_images(tmp_path / "images", 2, (16, 32)), f"{s3_prefix}/images", f"{s3_prefix}/masks"
    pafs.copy_files(str(images), inputs.removeprefix("s3://"), destination_filesystem=s3_server.filesystem())
    predicted = run_cli_fresh(["predict", checkpoint, inputs, "--out", out, "--workers", "1"], tmp_path, env=env, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert s3_server.keys(out) == ["img00_mask.png", "img00_overlay.png", "img01_mask.png", "img01_overlay.png",
                                   "prediction.json"]
    [probabilities] = raytrain.predict(raytrain.load_model(found["path"]), [np.asarray(Image.open(images / "img01.png"))])
    with s3_server.filesystem().open_input_stream(f"{out.removeprefix('s3://')}/img01_mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mask.read()))), probabilities > 0.5)

    # serve the experiment on S3: the command reads the best checkpoint's bytes from the bucket and
    # hands them to the replica (on the session's cluster, whose processes have no S3 settings).
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "raytrain.cli", "serve", experiment["path"], "--port", str(port)],
                              env={**env, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving "), line + server.communicate(timeout=60)[1]
        body = (images / "img00.png").read_bytes()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", body, {"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = np.asarray(Image.open(io.BytesIO(answer.read())))
        [expected] = raytrain.predict(raytrain.load_model(found["path"]), [np.asarray(Image.open(io.BytesIO(body)))], masks=True)
        np.testing.assert_array_equal(served, expected)
    finally:
        server.terminate()  # SIGTERM: the command stops serving and shuts Serve down
        server.wait(timeout=60)
        from ray import serve

        serve.shutdown()  # whatever a failed run left: later tests need the session's CPUs


def test_best_and_runs_read_a_searchs_trials_on_s3_by_each_rule(tmp_path, s3_server, s3_prefix):
    """Tune's result.json and params.json and the checkpoints' metrics.json, all read from s3:// (no Ray).
    trial_c keeps only its first and last checkpoints: its mean of the last 3 epochs (0.84) is
    result.json's; from its checkpoints alone it would be 0.715."""
    import shutil

    search = search_for_selection(tmp_path, select="mean_last", last_k=3)
    for epoch in (2, 3):
        shutil.rmtree(selection_checkpoint(search / "trial_c", epoch))
    remote = f"{s3_prefix}/picks/{search.name}"
    pafs.copy_files(str(search), remote.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_server.filesystem())
    env = {**s3_server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # where best fetches the checkpoint it picks
    for args, trial, epoch in [([], "trial_c", 4), (["--select", "last"], "trial_b", 4), (["--select", "best"], "trial_a", 2)]:
        best = run_cli(["best", remote, "--json", *args], tmp_path, env=env, timeout=120)
        assert best.returncode == 0, best.stderr
        found = json.loads(best.stdout)
        assert (found["metrics"]["trial_id"], found["metrics"]["epoch"]) == (trial, epoch), args
        assert found["path"].endswith("/" + selection_checkpoint(search / trial, epoch).name)
    runs = run_cli(["runs", s3_prefix, "--json"], tmp_path, env=env, timeout=120)
    assert runs.returncode == 0, runs.stderr
    [run] = json.loads(runs.stdout)
    assert (run["path"], run["select"], run["last_k"], run["trials"]) == (remote, "mean_last", 3, 4)
    assert run["best"] == pytest.approx(0.84)
