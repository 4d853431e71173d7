"""The CUDA paths, on a real GPU: training in each precision and layout, then load, predict, evaluate
and export on cuda. CI has no GPU, so these skip there; benchmarks/gpu_check.sh runs them on one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# (precision, channels_last, compile): the 2-epoch runs, each on one GPU through Ray Train (NCCL).
RUNS = {
    "fp32": ("fp32", False, False),
    "bf16_channels_last": ("bf16", True, False),
    "fp16_channels_last": ("fp16", True, False),
    "bf16_compile": ("bf16", True, True),
}


def gpu_config(shards, storage, precision="auto", channels_last=None, compile=False):
    return tiny_config(shards, storage, **{
        "train.use_gpu": True, "train.num_workers": 1, "train.gpus_per_worker": 1,
        "train.precision": precision, "train.channels_last": channels_last, "train.compile": compile,
    })


@pytest.fixture(scope="module")
def gpu_run(ray_cluster, tiny_shards, tmp_path_factory):
    """A finished 2-epoch bf16 run on the GPU: its best checkpoint for the inference tests."""
    from raytrain.api import best_checkpoint, train

    result = train(gpu_config(tiny_shards, tmp_path_factory.mktemp("gpu")))
    assert result.error is None
    return best_checkpoint(result.path)


@pytest.mark.parametrize("case", RUNS)
def test_a_two_epoch_run_trains_on_the_gpu(ray_cluster, tiny_shards, tmp_path, case):
    from raytrain.api import train

    precision, channels_last, compile = RUNS[case]
    result = train(gpu_config(tiny_shards, tmp_path, precision, channels_last, compile))
    assert result.error is None
    assert result.metrics["epoch"] == 2
    assert np.isfinite(result.metrics["train_loss"]) and np.isfinite(result.metrics["val_loss"])
    assert 0 <= result.metrics["val_iou"] <= 1


def test_a_gpu_checkpoint_predicts_on_cuda_as_on_the_cpu(gpu_run, synthetic_kitti):
    from raytrain.inference.loading import load_model
    from raytrain.inference.prediction import predict

    images = sorted((synthetic_kitti / "training" / "image_2").glob("*.png"))[:3]
    on_gpu = load_model(gpu_run, device="cuda")
    assert next(on_gpu.module.parameters()).device.type == "cuda"
    on_cpu = load_model(gpu_run, device="cpu")
    for tta in (None, "flip"):
        gpu_probabilities = predict(on_gpu, images, tta=tta)
        cpu_probabilities = predict(on_cpu, images, tta=tta)
        for gpu, cpu in zip(gpu_probabilities, cpu_probabilities):
            assert gpu.shape == cpu.shape
            np.testing.assert_allclose(gpu, cpu, atol=1e-3)  # TF32 convolutions on the GPU


def test_evaluate_on_cuda_matches_the_cpu(gpu_run, tiny_shards):
    from raytrain.api import evaluate

    on_gpu = evaluate(gpu_run, tiny_shards, device="cuda")
    on_cpu = evaluate(gpu_run, tiny_shards, device="cpu")
    assert on_gpu["iou"] == pytest.approx(on_cpu["iou"], abs=1e-2)


def test_a_gpu_checkpoint_exports_and_runs(gpu_run, synthetic_kitti, tmp_path):
    from PIL import Image

    from raytrain.api import export
    from raytrain.inference.loading import load_model
    from raytrain.inference.prediction import predict

    image = np.asarray(Image.open(sorted((synthetic_kitti / "training" / "image_2").glob("*.png"))[0]).convert("RGB"))
    expected = predict(load_model(gpu_run), [image])[0]
    scripted = torch.jit.load(str(export(gpu_run, tmp_path / "model.pt")))
    got = scripted(torch.from_numpy(image)[None])[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    on_cuda = scripted.cuda()(torch.from_numpy(image)[None].cuda())[0, 0].cpu().numpy()
    np.testing.assert_allclose(on_cuda, expected, atol=1e-3)
