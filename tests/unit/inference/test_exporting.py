"""inference/exporting: an exported file (ONNX through onnxruntime, TorchScript, torch.export)
takes uint8 images of any size and gives raytrain.predict's numbers."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import raytrain
from tests.helpers import assert_one_line_error, snapshot
from tests.helpers import SIMPLE, UNET, batches, make_checkpoint


def cli(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raytrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**environment, **(env or {})})


def predicted(model, images, tta=None):
    """raytrain.predict's probabilities for a batch, as (N, C, H, W)."""
    probabilities = np.stack(raytrain.predict(model, list(images), tta=tta))
    return probabilities[:, None] if probabilities.ndim == 3 else probabilities


# One export, as each costs 3-4 s of torch.onnx's exporter: the U-Net's skips and upsampling, a softmax
# over three classes and the flip, in one graph.
@pytest.mark.parametrize("options, classes, tta", [(UNET, ["road", "car", "sky"], "flip")], ids=["unet-3-classes-flip"])
def test_onnx_export_matches_predict_and_holds_classes_and_size(tmp_path, capfd, options, classes, tta):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt = make_checkpoint(tmp_path, options, classes)
    out = raytrain.export(ckpt, format="onnx", tta=tta)
    assert out == ckpt / "model.onnx" and capfd.readouterr() == ("", "")  # none of the exporter's chatter
    session = ort.InferenceSession(str(out))
    assert session.get_modelmeta().custom_metadata_map | {"raytrain_version": "-"} == {
        "classes": json.dumps(classes), "training_size": "64x32", "tta": tta or "none", "model": options["name"], "raytrain_version": "-"}
    model = raytrain.load_model(ckpt)
    for images in batches():
        [probabilities] = session.run(None, {"images": images})
        assert probabilities.shape == (2, len(classes), *images.shape[1:3])
        assert np.abs(probabilities - predicted(model, images, tta)).max() <= 1e-4
        if tta:
            assert np.abs(probabilities - predicted(model, images)).max() > 1e-2  # the flip is in the graph


@pytest.mark.parametrize("format", ["torchscript", "torch.export"])
def test_torch_exports_take_the_same_images_and_give_predicts_numbers(tmp_path, format):
    ckpt = make_checkpoint(tmp_path, SIMPLE)
    out = raytrain.export(ckpt, tmp_path / f"model.{'pt2' if format == 'torch.export' else 'ts'}", format=format, tta="flip")
    extra = {"raytrain.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(out, _extra_files=extra) if format == "torchscript" else torch.export.load(out, extra_files=extra).module()
    assert json.loads(extra["raytrain.json"])["training_size"] == "64x32"
    model = raytrain.load_model(ckpt)
    for images in batches():
        with torch.no_grad():
            probabilities = exported(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(probabilities, predicted(model, images, "flip"), atol=1e-6)


def test_onnx_export_without_onnx_installed_is_one_line_naming_the_extra(tmp_path):
    """`onnx` shadowed by a module that fails to import, as on an install without the extra."""
    ckpt = make_checkpoint(tmp_path, SIMPLE)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnx.py").write_text("raise ImportError('No module named onnx')\n")
    before = snapshot(tmp_path)
    path = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    run = cli("export", ckpt, "--format", "onnx", env={"PYTHONPATH": path})
    assert_one_line_error(run, ["--format onnx", "pip install 'raytrain[onnx]'"], tmp_path)
    assert snapshot(tmp_path) == before
