"""Loss registry: ``create_loss(name, num_classes, ignore_index, class_weights)`` -> ``loss(logits, target)``.

logits: (N, C, H, W); target: (N, H, W) int64 holding 0/1 (C == 1, binary road) or class indices,
and ``ignore_index`` where the label is unknown. Ignored pixels add nothing to the value nor to the
gradient, in every loss. Losses that average over pixels average over the non-ignored ones only; a
batch without a single labelled pixel gives 0 (still attached to the graph, so DDP sees gradients).

class_weights:
  multi-class: one weight per class. ce and focal take the weighted mean over pixels
    sum(w[t] * l) / sum(w[t]) (torch's cross_entropy convention); dice, jaccard and tversky weight
    their per-class losses.
  binary: ``(w_road,)`` meaning ``(1, w_road)``, or ``(w_background, w_road)``. bce and focal then
    equal the 2-class weighted mean above (unlike BCEWithLogits' pos_weight, which divides by the
    pixel count instead of the weight sum).
  lovasz, and the region losses (dice, jaccard, tversky) in binary mode, which only score the road
  class, do not use weights.

Where smp's losses are used and why some are not (checked in smp 0.6.0's source):
  * SoftBCEWithLogitsLoss / SoftCrossEntropyLoss zero the ignored pixels but still divide by ALL
    pixels, so the loss shrinks with the share of ignored pixels, and take no class weights: bce and
    ce are computed here (torch's cross_entropy handles ignore_index and weights properly).
  * FocalLoss in multi-class mode is a sum of one-vs-rest *sigmoid* focal losses, which does not
    match the softmax the model's multi-class logits are read with, takes no weights in binary mode
    and returns NaN for a batch with every pixel ignored: focal is computed here (softmax focal
    loss; sigmoid focal for binary).
  * DiceLoss, JaccardLoss, TverskyLoss mask ignored pixels out of both prediction and one-hot
    target in binary and multi-class mode: used as they are.
  * LovaszLoss drops ignored pixels correctly, but in multi-class mode returns an empty tensor
    (not a scalar) when every pixel is ignored: wrapped to return 0 then.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BINARY, MULTICLASS = "binary", "multiclass"

# (mode, name) -> builder(ignore_index, class_weights as a float tensor or None) -> nn.Module
_LOSSES: dict[tuple[str, str], Callable[[int, torch.Tensor | None], nn.Module]] = {}


def register(name: str, *modes: str) -> Callable:
    def add(build: Callable) -> Callable:
        for mode in modes:
            _LOSSES[(mode, name)] = build
        return build

    return add


def _mode(num_classes: int) -> str:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return BINARY if num_classes == 1 else MULTICLASS


def list_losses(num_classes: int = 1) -> list[str]:
    """Names valid for ``num_classes`` (1 = binary road, > 1 = multi-class)."""
    mode = _mode(num_classes)
    return sorted(name for m, name in _LOSSES if m == mode)


def create_loss(
    name: str,
    num_classes: int = 1,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
) -> nn.Module:
    mode = _mode(num_classes)
    if (mode, name) not in _LOSSES:
        raise ValueError(
            f"unknown loss {name!r} for {mode} segmentation (num_classes={num_classes}); "
            f"valid: {', '.join(list_losses(num_classes))}"
        )
    weights = None if class_weights is None else _class_weights(class_weights, num_classes)
    return _LOSSES[(mode, name)](ignore_index, weights)


def _class_weights(class_weights: Sequence[float], num_classes: int) -> torch.Tensor:
    weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if num_classes == 1 and len(weights) == 1:
        weights = torch.cat([torch.ones(1), weights])  # (w_road,) -> (1, w_road)
    expected = 2 if num_classes == 1 else num_classes
    if len(weights) != expected or (weights < 0).any():
        raise ValueError(
            f"class_weights must be {expected} non-negative numbers"
            + (" (or one, for road)" if num_classes == 1 else "")
            + f", got {list(class_weights)}"
        )
    return weights


class PixelLoss(nn.Module):
    """(Focal) cross-entropy per pixel, averaged over non-ignored pixels with optional class weights.

    One logit channel: binary cross-entropy (sigmoid). Several: softmax cross-entropy.
    gamma > 0 turns it into the focal loss (1 - p_true)**gamma * CE (Lin et al. 2017).
    """

    def __init__(self, ignore_index: int, class_weights: torch.Tensor | None = None, gamma: float = 0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.gamma = gamma
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, 0).long()
        if logits.size(1) == 1:
            loss = F.binary_cross_entropy_with_logits(
                logits[:, 0], safe_target.to(logits.dtype), reduction="none"
            )
        else:
            loss = F.cross_entropy(logits, safe_target, reduction="none")
        if self.gamma:
            loss = (1 - torch.exp(-loss)).pow(self.gamma) * loss  # exp(-CE) = probability of the truth
        weight = valid.to(loss.dtype)
        if self.class_weights is not None:
            # .to(device): the loss module itself is usually never moved to the GPU
            weight = weight * self.class_weights.to(loss.device, loss.dtype)[safe_target]
        # torch.where, not a product, so that a non-finite value at an ignored pixel cannot leak in
        return torch.where(valid, weight * loss, 0).sum() / weight.sum().clamp_min(1e-12)


class SumLoss(nn.Module):
    """Sum of losses, e.g. BCE + Dice."""

    def __init__(self, *losses: nn.Module):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(loss(logits, target) for loss in self.losses)


class _ZeroWhenAllIgnored(nn.Module):
    """smp's multi-class LovaszLoss returns an empty tensor when no pixel is labelled: return 0 then."""

    def __init__(self, loss: nn.Module, ignore_index: int):
        super().__init__()
        self.loss = loss
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0
        return self.loss(logits, target)


@register("bce", BINARY)
@register("ce", MULTICLASS)
def _cross_entropy(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
    return PixelLoss(ignore_index, weights)


@register("focal", BINARY, MULTICLASS)
def _focal(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
    return PixelLoss(ignore_index, weights, gamma=2.0)


def _smp_loss(class_name: str) -> type:
    # Imported when such a loss is built: smp (with timm) takes seconds to import, paid by every Ray
    # worker that imports raytrain, most of which train with a loss of their own.
    import segmentation_models_pytorch.losses

    return getattr(segmentation_models_pytorch.losses, class_name)


def _smp_region_loss(class_name: str, mode: str, **options) -> Callable[[int, torch.Tensor | None], nn.Module]:
    def build(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
        # binary mode scores the road class only: smp rejects class weights there
        smp_weights = weights.tolist() if mode == MULTICLASS and weights is not None else None
        return _smp_loss(class_name)(mode, ignore_index=ignore_index, class_weights=smp_weights, **options)

    return build


_REGION_LOSSES = {
    "dice": ("DiceLoss", {}),
    "jaccard": ("JaccardLoss", {}),
    # alpha weighs false positives, beta false negatives; (0.3, 0.7) as recommended by Salehi et al. 2017
    "tversky": ("TverskyLoss", {"alpha": 0.3, "beta": 0.7}),
}
for _mode_name in (BINARY, MULTICLASS):
    for _name, (_class_name, _options) in _REGION_LOSSES.items():
        register(_name, _mode_name)(_smp_region_loss(_class_name, _mode_name, **_options))


@register("bce_dice", BINARY)
def _bce_dice(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
    return SumLoss(PixelLoss(ignore_index, weights), _smp_region_loss("DiceLoss", BINARY)(ignore_index, weights))


@register("ce_dice", MULTICLASS)
def _ce_dice(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
    return SumLoss(PixelLoss(ignore_index, weights), _smp_region_loss("DiceLoss", MULTICLASS)(ignore_index, weights))


@register("lovasz", BINARY)
def _lovasz_hinge(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
    return _smp_loss("LovaszLoss")(BINARY, ignore_index=ignore_index)


@register("lovasz", MULTICLASS)
def _lovasz_softmax(ignore_index: int, weights: torch.Tensor | None) -> nn.Module:
    return _ZeroWhenAllIgnored(_smp_loss("LovaszLoss")(MULTICLASS, ignore_index=ignore_index), ignore_index)
