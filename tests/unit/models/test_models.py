import importlib
import pkgutil
import types

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import raytrain.models
from raytrain.models import allowed_depths, count_parameters, create_model, list_models, to_probabilities
from tests.helpers import free_port
from tests.helpers import forkserver

SMALL_ENCODER = "resnet18"


def _options(name: str, depth: int) -> dict:
    return {"depth": depth, **({"encoder": SMALL_ENCODER} if name.startswith("smp:") else {})}


def _input_size(name: str, depth: int) -> int:
    # PAN's feature pyramid attention pools its stride-16 feature 3 times: it needs 128 px there.
    return 128 if name == "smp:PAN" and depth >= 4 else 64


def _forward_backward(model: nn.Module, num_classes: int, size: int = 64) -> torch.Tensor:
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, num_classes, size, size)
    logits.float().square().mean().backward()
    return logits


def _without_gradient(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_the_package_exports_names_no_module_shadows():
    modules = {m.name for m in pkgutil.iter_modules(raytrain.models.__path__)}
    assert {"registry", "lab", "smp_adapter", "pruning"} <= modules
    for name in modules:
        importlib.import_module(f"raytrain.models.{name}")
    for name in raytrain.models.__all__:
        assert name not in modules, name
        assert not isinstance(getattr(raytrain.models, name), types.ModuleType), name


def test_registry_names():
    names = list_models()
    assert {"simple", "unet", "smp:Unet", "smp:UnetPlusPlus", "smp:FPN", "smp:DeepLabV3", "smp:DeepLabV3Plus",
            "smp:Linknet", "smp:MAnet", "smp:PAN", "smp:PSPNet", "smp:UPerNet", "smp:Segformer"} <= set(names)


def test_unet_has_the_lab_parameter_count():
    assert count_parameters(create_model("unet", base_channels=8, depth=4)) == 485_817
    assert count_parameters(create_model("unet")) == 485_817  # the defaults


def test_simple_is_the_lab_baseline():
    model = create_model("simple")
    assert count_parameters(model) == 53_761
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 32, (5, 5), (2, 2), (2, 2)),
        (32, 64, (5, 5), (2, 2), (2, 2)),
        (64, 1, (1, 1), (1, 1), (0, 0)),
    ]
    assert [c.out_channels for c in create_model("simple", depth=3).modules() if isinstance(c, nn.Conv2d)] == [32, 64, 128, 1]


@pytest.mark.parametrize("name", ["simple", "unet"])
@pytest.mark.parametrize("size", [(64, 64), (50, 70), (33, 17)])
def test_lab_models_keep_any_input_size(name, size):
    logits = create_model(name, num_classes=2)(torch.randn(1, 3, *size))
    assert logits.shape == (1, 2, *size)


def test_unet_options():
    plain, with_bn = create_model("unet"), create_model("unet", batch_norm=True, dropout=0.5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in with_bn.modules())
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    _forward_backward(with_bn, 1)
    assert not _without_gradient(with_bn)


# Every depth once, the class count alternating 1, 3, 1, ... so that each model meets both: the class
# count only changes the head, and building the encoder is what a case costs (0.1-0.2 s).
CASES = [(name, depth, 3 if i % 2 else 1) for name in list_models() for i, depth in enumerate(allowed_depths(name))]


@pytest.mark.parametrize("name,depth,num_classes", CASES, ids=[f"{n}-d{d}-{c}" for n, d, c in CASES])
def test_every_model_at_every_depth_trains_every_parameter(name, depth, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, **_options(name, depth))
    _forward_backward(model, num_classes, _input_size(name, depth))
    assert not _without_gradient(model)
    assert all(p.requires_grad for p in model.parameters())  # trimmed, not frozen


def test_smp_default_encoder_is_resnet34_without_weights():
    model = create_model("smp:Unet", depth=3)
    reference = smp.Unet("resnet34", encoder_weights=None, encoder_depth=3, decoder_channels=(64, 32, 16))
    # depth 3 = conv1, layer1, layer2: layer3 and layer4 never run
    trimmed = sum(p.numel() for layer in (reference.encoder.layer3, reference.encoder.layer4) for p in layer.parameters())
    assert count_parameters(model) == count_parameters(reference) - trimmed
    _forward_backward(model, 1)
    assert not _without_gradient(model)


def test_smp_default_depth_is_smp_default():
    assert len(create_model("smp:Unet", encoder=SMALL_ENCODER).decoder.blocks) == 5
    assert create_model("smp:PSPNet", encoder=SMALL_ENCODER).encoder._depth == 3


def test_building_is_deterministic_and_leaves_no_trace():
    torch.manual_seed(0)
    a = create_model("smp:FPN", encoder=SMALL_ENCODER, depth=3)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b = create_model("smp:FPN", encoder=SMALL_ENCODER, depth=3)
    assert torch.equal(after_a, torch.rand(1))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    bn = a.encoder.bn1  # the build-time probe must not have updated BatchNorm statistics
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and bn.num_batches_tracked == 0
    assert a.training


def test_to_probabilities():
    logits = torch.randn(2, 1, 4, 4)
    assert torch.allclose(to_probabilities(logits), torch.sigmoid(logits))
    logits = torch.randn(2, 3, 4, 4)
    assert torch.allclose(to_probabilities(logits).sum(1), torch.ones(2, 4, 4))
    assert torch.allclose(to_probabilities(logits), logits.softmax(1))


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*simple.*unet"):
        create_model("resnet")


def test_option_the_model_does_not_take():
    with pytest.raises(ValueError, match=r"model 'simple' does not take 'encoder' \(it takes: .*depth"):
        create_model("simple", encoder="resnet34")
    with pytest.raises(ValueError, match="does not take 'base_channels'"):
        create_model("smp:Unet", base_channels=8)


@pytest.mark.parametrize("name,depth", [("smp:FPN", 2), ("smp:UnetPlusPlus", 1), ("unet", 0), ("simple", 9)])
def test_depth_outside_allowed_range(name, depth):
    with pytest.raises(ValueError, match="depth"):
        create_model(name, **_options(name, depth))


# ---------------------------------------------------------------- DDP with real gloo processes


def _ddp_worker(rank: int, port: int, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name in names:
            torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
            model = DistributedDataParallel(create_model(name, **_options(name, min(allowed_depths(name)))))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            torch.manual_seed(1 + rank)  # different data on each rank
            # two steps: DDP reports parameters that got no gradient when the next step starts
            for _ in range(2):
                optimizer.zero_grad()
                model(torch.randn(2, 3, 64, 64)).square().mean().backward()
                optimizer.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1]), f"{name}: parameters differ across ranks"
    finally:
        dist.destroy_process_group()


def test_ddp_step_for_every_architecture_at_its_smallest_depth():
    forkserver()  # preloaded: the workers skip importing torch
    mp.start_processes(_ddp_worker, args=(free_port(), list_models()), nprocs=2, join=True, start_method="forkserver")
