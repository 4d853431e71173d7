"""The name registry: ``create_model(name, num_classes, **kwargs)`` checks the options and builds.

``register`` adds a builder under a name; ``create_model`` checks the options against the builder's
signature and the depth against the registered range, builds, then prunes the parameters that get no
gradient (see pruning.py) so that DistributedDataParallel can train the model.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from raytrain.models.pruning import drop_unused_parameters


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    depths: range
    probe_size: int = 64  # an input side the model accepts at every depth (for the build-time probe)


_MODELS: dict[str, _Entry] = {}


def register(name: str, depths: range, probe_size: int = 64) -> Callable:
    """Decorator adding a builder ``fn(num_classes, ..., depth=...) -> nn.Module`` under ``name``."""

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = _Entry(build, depths, probe_size)
        return build

    return add


def list_models() -> list[str]:
    return sorted(_MODELS)


def allowed_depths(name: str) -> range:
    return _entry(name).depths


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for a single (road) channel, softmax over the classes (dim 1) otherwise."""
    return logits.sigmoid() if logits.size(1) == 1 else logits.softmax(dim=1)


def create_model(name: str, num_classes: int = 1, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` output channels; kwargs are the model's options.

    Raises ValueError for an unknown name, an option the model does not take or a depth outside
    ``allowed_depths(name)``.
    """
    entry = _entry(name)
    options = [p for p in inspect.signature(entry.build).parameters if p != "num_classes"]
    for key in kwargs:
        if key not in options:
            raise ValueError(f"model {name!r} does not take {key!r} (it takes: {', '.join(options)})")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    depth = kwargs.get("depth")
    if depth is not None and depth not in entry.depths:
        raise ValueError(f"model {name!r} takes depth in {list(entry.depths)}, got {depth}")
    model = entry.build(num_classes=num_classes, **kwargs)
    drop_unused_parameters(model, kwargs.get("in_channels", 3), entry.probe_size)
    return model


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]
