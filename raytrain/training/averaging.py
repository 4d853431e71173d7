"""An exponential moving average of the weights (train.ema), in plain torch: torch's AveragedModel,
with the decay warmed up as timm's ModelEmaV3 does, so a short run's average does not hold its
initial weights for 1 / (1 - decay) steps. The average is what a run evaluates, checkpoints as
model.pt and loads; train_state.pt keeps the trained weights and the count of updates to resume.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def create_weight_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An average of `model`'s parameters and buffers (BatchNorm's statistics too), on its device.
    Every DDP rank keeps its own: their weights are equal after each step, so their averages are."""
    return AveragedModel(model, multi_avg_fn=warmed_up_ema(decay), use_buffers=True)


def ema_decay(decay: float, updates: torch.Tensor) -> torch.Tensor:
    """The decay of the average's update number `updates` (1 after the copy that starts it)."""
    return torch.clamp((1 + updates) / (10 + updates), max=decay)


def warmed_up_ema(decay: float):
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates) -> None:
        if not averaged[0].is_floating_point():  # counts (BatchNorm's num_batches_tracked): the model's own
            torch._foreach_copy_(averaged, current)
            return
        # AveragedModel hands over its count already copied to this device (docs/decisions.md: that
        # copy waits for the device once a step on a GPU).
        updates = torch.as_tensor(updates, device=averaged[0].device, dtype=averaged[0].dtype)
        torch._foreach_lerp_(averaged, current, 1 - ema_decay(decay, updates))

    return update
