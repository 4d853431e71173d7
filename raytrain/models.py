"""Model registry: ``create_model(name, num_classes, **kwargs)`` -> a module returning logits.

Every model maps (N, in_channels, H, W) images to LOGITS (N, num_classes, H, W) at the input's size;
``to_probabilities`` turns them into probabilities (sigmoid for the single road channel, softmax
over the channels otherwise).

Names: ``simple`` and ``unet`` (the lab's models) and ``smp:<Arch>`` for the architectures of
segmentation-models-pytorch. ``depth`` is a knob of every model; ``allowed_depths(name)`` tells its range.

DDP safety: DistributedDataParallel (without find_unused_parameters) fails when a trainable
parameter gets no gradient, e.g. ResNet's layer4 when smp builds the encoder with depth 3.
``create_model`` therefore traces one forward pass and replaces every submodule that has no path to
the output by ``nn.Identity`` (freezing any stray unused parameter left inside a used module).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SMP_PREFIX = "smp:"


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
    _drop_unused_parameters(model, kwargs.get("in_channels", 3), entry.probe_size)
    return model


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


# ---------------------------------------------------------------- unused parameters (DDP safety)

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


def _drop_unused_parameters(model: nn.Module, in_channels: int, probe_size: int) -> None:
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


# ---------------------------------------------------------------- the lab's models


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


# ---------------------------------------------------------------- segmentation-models-pytorch

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
