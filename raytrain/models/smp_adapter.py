"""The adapter to segmentation-models-pytorch: ``smp:<Arch>`` names, one per architecture.

The adapter keeps the logits at input size at every encoder depth and imports smp only when a model
is built.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from raytrain.models.registry import register

SMP_PREFIX = "smp:"


# Encoder depths each architecture builds with (checked in smp 0.6 with ResNet encoders): the FPN,
# DeepLabV3+, PAN, UPerNet and Segformer decoders raise below 3, UNet++ breaks at 1 (KeyError).
# Other encoder families may restrict further (e.g. mit_b* only take 5); smp raises then.
_SMP_DEPTHS = {
    "Unet": range(1, 6),
    "UnetPlusPlus": range(2, 6),
    "FPN": range(3, 6),
    "DeepLabV3": range(1, 6),
    "DeepLabV3Plus": range(3, 6),
    "Linknet": range(1, 6),
    "MAnet": range(1, 6),
    "PAN": range(3, 6),
    "PSPNet": range(1, 6),
    "UPerNet": range(3, 6),
    "Segformer": range(3, 6),
}  # DPT is left out: it only works with ViT encoders from timm.

_UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's default, one per decoder block


def _depth_adapted_options(arch: str, depth: int) -> dict:
    """The smp options that must follow encoder_depth so that the logits come out at input size."""
    if arch in ("Unet", "UnetPlusPlus", "MAnet"):
        # one decoder block per encoder stage; keep the widths each resolution has at depth 5
        return {"decoder_channels": _UNET_DECODER_CHANNELS[-depth:]}
    if arch == "FPN":  # the pyramid is the last 4 features, its finest level at stride 2**(depth-3)
        return {"upsampling": 2 ** (depth - 3)}
    if arch == "PSPNet":  # the head sees only the deepest feature, at stride 2**depth
        return {"upsampling": 2**depth}
    return {}


def _smp_builder(arch: str) -> Callable[..., nn.Module]:
    def build(
        num_classes: int = 1,
        in_channels: int = 3,
        encoder: str = "resnet34",
        depth: int | None = None,
        encoder_weights: str | None = None,
    ) -> nn.Module:
        # Imported here: smp (with timm) costs seconds to import, and most processes that import
        # raytrain.models -- Ray workers running the lab's models among them -- never build one.
        import segmentation_models_pytorch as smp

        model_class = getattr(smp, arch)
        if depth is None:
            depth = inspect.signature(model_class).parameters["encoder_depth"].default
        return model_class(
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            encoder_depth=depth,
            in_channels=in_channels,
            classes=num_classes,
            **_depth_adapted_options(arch, depth),
        )

    build.__doc__ = f"smp.{arch} (smp's default encoder depth unless given)"
    return build


for _arch, _depths in _SMP_DEPTHS.items():
    # PAN's feature pyramid attention pools its stride-16 feature 3 times: 128 px at depth >= 4
    register(SMP_PREFIX + _arch, _depths, probe_size=128 if _arch == "PAN" else 64)(_smp_builder(_arch))
