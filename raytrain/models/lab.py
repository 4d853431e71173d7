"""The lab's models: ``simple`` (the baseline, 53,761 parameters) and ``unet`` (485,817 by default)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.models.registry import register


class SimpleNet(nn.Module):
    """The lab's baseline: ``depth`` 5x5 stride-2 convs (32, 64, ... channels), a 1x1 head, bilinear resize."""

    def __init__(self, num_classes: int = 1, in_channels: int = 3, depth: int = 2):
        super().__init__()
        widths = [in_channels] + [32 * 2**i for i in range(depth)]
        self.encoder = nn.Sequential(
            *(
                layer
                for c_in, c_out in zip(widths, widths[1:])
                for layer in (nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), nn.ReLU(inplace=True))
            )
        )
        self.head = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _conv_pair(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """The lab's U-Net: ``depth`` max-pool levels, widths base, 2*base, ..., base*2**depth (bottleneck).

    Inputs whose sides are not multiples of 2**depth are zero-padded and the logits cropped back.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 3,
        base_channels: int = 8,
        depth: int = 4,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            _conv_pair(c_in, c_out, batch_norm) for c_in, c_out in zip([in_channels] + widths, widths)
        )  # the last one is the bottleneck
        self.dropout = nn.Dropout(dropout)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up_convs = nn.ModuleList(
            _conv_pair(2 * widths[i], widths[i], batch_norm) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        x = F.pad(x, (0, -width % multiple, 0, -height % multiple))
        skips = []
        for block in self.down[:-1]:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.down[-1](x))
        for up, conv, skip in zip(self.up, self.up_convs, reversed(skips)):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :height, :width]


# The classes are their own builders: their __init__ signatures are the options create_model checks.
register("simple", depths=range(1, 6))(SimpleNet)
register("unet", depths=range(1, 6))(UNet)
