"""Pruning for DDP: drop the parameters that no forward pass reaches.

DistributedDataParallel (without find_unused_parameters) fails when a trainable parameter gets no
gradient, e.g. ResNet's layer4 when smp builds the encoder with depth 3. ``create_model`` therefore
traces one forward pass and replaces every submodule that has no path to the output by
``nn.Identity`` (freezing any stray unused parameter left inside a used module).
"""
from __future__ import annotations

import torch
from torch import nn


def _unused_parameters(model: nn.Module, in_channels: int, size: int) -> set[str]:
    """Names of trainable parameters that no autograd path connects to the output.

    Walks the autograd graph of one training-mode forward pass (batch 2: BatchNorm needs more
    than one value per channel). Nothing is written to .grad; the BatchNorm statistics the pass
    updates and the global RNG are restored, so building a model stays deterministic.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        output = model(torch.randn(2, in_channels, size, size))
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)

    reached: set[int] = set()
    seen: set = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf, i.e. a parameter
            reached.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached}


def drop_unused_parameters(model: nn.Module, in_channels: int, probe_size: int) -> None:
    """Replace every submodule none of whose parameters reach the output by ``nn.Identity``."""
    unused = _unused_parameters(model, in_channels, probe_size)
    if not unused:
        return
    replaced: list[str] = []  # outermost modules whose parameters are all unused
    for name, module in model.named_modules():
        if name and not _inside(name, replaced):
            params = [n for n, _ in module.named_parameters(prefix=name)]
            if params and all(n in unused for n in params):
                replaced.append(name)
    # Unused parameters of modules that are used otherwise (none in the registered models) are frozen.
    for name in unused:
        if not _inside(name, replaced):
            model.get_parameter(name).requires_grad_(False)
    for name in replaced:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())


def _inside(name: str, modules: list[str]) -> bool:
    return any(name.startswith(module + ".") for module in modules)
