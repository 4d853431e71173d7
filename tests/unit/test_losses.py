import pytest
import torch
import torch.nn.functional as F

from raytrain.losses import create_loss, list_losses

IGNORE = 255
WEIGHTS = {1: [2.0], 3: [1.0, 2.0, 0.5]}
CASES = [(c, name, w) for c in (1, 3) for name in list_losses(c) for w in (None, WEIGHTS[c])]
IDS = [f"{'binary' if c == 1 else 'multiclass'}-{name}{'-weighted' if w else ''}" for c, name, w in CASES]


def _batch(num_classes, seed=0, size=16, ignore_fraction=0.25):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, max(num_classes, 2), (2, size, size), generator=g)
    ignored = torch.rand(2, size, size, generator=g) < ignore_fraction
    target[ignored] = IGNORE
    logits = torch.randn(2, num_classes, size, size, generator=g)
    return logits, target, ignored.unsqueeze(1).expand_as(logits)


def test_names_per_mode():
    assert list_losses(1) == ["bce", "bce_dice", "dice", "focal", "jaccard", "lovasz", "tversky"]
    assert list_losses(3) == ["ce", "ce_dice", "dice", "focal", "jaccard", "lovasz", "tversky"]


@pytest.mark.parametrize("name,num_classes,valid", [("ce", 1, "bce"), ("bce", 3, "ce"), ("nope", 2, "ce_dice")])
def test_name_invalid_for_mode(name, num_classes, valid):
    with pytest.raises(ValueError, match=f"valid: .*{valid}"):
        create_loss(name, num_classes)


@pytest.mark.parametrize("num_classes,weights", [(1, [1.0, 2.0, 3.0]), (3, [1.0, 2.0]), (3, [1.0, -1.0, 1.0])])
def test_bad_class_weights(num_classes, weights):
    with pytest.raises(ValueError, match="class_weights"):
        create_loss("focal", num_classes, class_weights=weights)


@pytest.mark.parametrize("num_classes,name,weights", CASES, ids=IDS)
def test_loss_is_finite_and_falls_while_overfitting(num_classes, name, weights):
    loss_fn = create_loss(name, num_classes, class_weights=weights)
    logits, target, _ = _batch(num_classes)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    values = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(logits, target)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < 0.5 * values[0], values


@pytest.mark.parametrize("num_classes,name,weights", CASES, ids=IDS)
def test_ignored_pixels_change_neither_value_nor_gradient(num_classes, name, weights):
    loss_fn = create_loss(name, num_classes, class_weights=weights)
    logits, target, ignored = _batch(num_classes, seed=1)
    changed = logits.clone()
    changed[ignored] = 50 * torch.randn(int(ignored.sum()))
    values = []
    for x in (logits, changed):
        x.requires_grad_(True)
        value = loss_fn(x, target)
        value.backward()
        assert torch.all(x.grad[ignored] == 0)
        values.append(value.item())
    assert values[0] == pytest.approx(values[1], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("num_classes,name,weights", CASES, ids=IDS)
def test_batch_with_every_pixel_ignored_gives_zero_attached_to_the_graph(num_classes, name, weights):
    logits = torch.randn(2, num_classes, 8, 8, requires_grad=True)
    loss = create_loss(name, num_classes, class_weights=weights)(logits, torch.full((2, 8, 8), IGNORE))
    assert loss.dim() == 0 and loss.item() == 0
    loss.backward()  # still part of the graph, so DDP gets a (zero) gradient for every parameter
    assert torch.all(logits.grad == 0)


def test_cross_entropy_matches_torch_with_weights_and_ignore_index():
    logits, target, _ = _batch(3, seed=2)
    weights = torch.tensor(WEIGHTS[3])
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    assert create_loss("ce", 3, class_weights=WEIGHTS[3])(logits, target).item() == pytest.approx(expected.item())


def test_binary_weights_equal_two_class_weighted_mean():
    logits, target, _ = _batch(1, seed=3)
    valid = target != IGNORE
    per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target.clamp(max=1).float(), reduction="none")
    assert create_loss("bce", 1)(logits, target).item() == pytest.approx(per_pixel[valid].mean().item())
    w = torch.where(target == 1, 2.0, 1.0)[valid]
    expected = (w * per_pixel[valid]).sum() / w.sum()
    for weights in ([2.0], [1.0, 2.0]):  # (w_road,) is short for (1, w_road)
        assert create_loss("bce", 1, class_weights=weights)(logits, target).item() == pytest.approx(expected.item())


def test_focal_loss_formula():
    logits, target, _ = _batch(3, seed=4)
    valid = target != IGNORE
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")[valid]
    expected = ((1 - torch.exp(-ce)) ** 2 * ce).mean()
    assert create_loss("focal", 3)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert create_loss("focal", 3)(logits, target) < create_loss("ce", 3)(logits, target)
