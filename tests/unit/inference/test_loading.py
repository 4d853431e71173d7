"""inference/loading: raytrain.load_model gives the module with its config, and a checkpoint's
bounds are API errors too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raytrain
from raytrain.errors import RaytrainError
from tests.helpers import checkpoint


def test_load_model_gives_the_module_with_its_config(tmp_path):
    ckpt = checkpoint(tmp_path)
    model = raytrain.load_model(ckpt)
    assert isinstance(model, raytrain.LoadedModel) and isinstance(model.module, torch.nn.Module)
    assert model.config.data.size == (32, 16) and model.classes == ["road"] and model.path == ckpt
    assert not model.module.training and not hasattr(model.module, "raytrain_config")
    [probabilities] = raytrain.predict(model, [np.zeros((20, 40, 3), np.uint8)])
    assert probabilities.shape == (20, 40)
    with pytest.raises(TypeError, match="what raytrain.load_model returns"):
        raytrain.predict(model.module, [np.zeros((20, 40, 3), np.uint8)])
    for device in ("banana", "cuda:7", "meta"):
        with pytest.raises(RaytrainError, match=f"'{device}'"):
            raytrain.load_model(ckpt, device)


def test_checkpoint_bounds_are_api_errors_too(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path)
    monkeypatch.setenv("RAYTRAIN_MAX_PARAMETERS", "1000")  # the simple model has 2465
    with pytest.raises(RaytrainError, match="2465 parameters, over the limit of 1000"):
        raytrain.load_model(ckpt)
    monkeypatch.setenv("RAYTRAIN_MAX_PARAMETERS", "lots")
    with pytest.raises(RaytrainError, match="RAYTRAIN_MAX_PARAMETERS='lots'"):
        raytrain.load_model(ckpt)
