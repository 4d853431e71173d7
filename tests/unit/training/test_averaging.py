"""train.ema without Ray: the average against a reference written out by hand, BatchNorm's buffers,
and the average through a checkpoint (what is saved, loaded, and resumed exactly)."""
import pytest
import torch

from raytrain.checkpoints import restore_train_state, save_checkpoint
from raytrain.errors import ConfigError
from raytrain.inference.loading import load_model
from raytrain.losses import create_loss
from raytrain.models import create_model
from raytrain.training.averaging import create_weight_average
from raytrain.training.loop import create_optimizer, train_one_epoch
from tests.helpers import tiny_config
from tests.unit.training.test_loop import batches


def test_the_average_is_the_warmed_up_ema_of_the_weights_step_by_step():
    decay, weights = 0.6, [3.0, -1.0, 4.0, 10.0, 2.0]
    model = torch.nn.Linear(1, 1, bias=False)
    average = create_weight_average(model, decay)
    expected = plain = None
    for step, value in enumerate(weights):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        # The first update copies; update n after it keeps min(decay, (1 + n) / (10 + n)) of the average.
        kept = min(decay, (1 + step) / (10 + step))
        expected = value if expected is None else kept * expected + (1 - kept) * value
        plain = value if plain is None else decay * plain + (1 - decay) * value
        assert average.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(plain)  # the warm-up kept less of the early weights than decay would


def test_batchnorm_statistics_are_averaged_and_its_count_is_the_models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    average = create_weight_average(model, 0.99)
    means = []
    for scale in (1.0, 5.0):
        model(torch.randn(2, 3, 8, 8) * scale + scale)
        means.append(model[1].running_mean.clone())
        average.update_parameters(model)
    decay = min(0.99, 2 / 11)
    assert torch.allclose(average.module[1].running_mean, decay * means[0] + (1 - decay) * means[1], atol=1e-6)
    assert average.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 2


def test_ema_must_be_a_decay_between_0_and_1(tiny_shards, tmp_path):
    for value in (0, 1, 1.5):
        with pytest.raises(ConfigError, match=r"train\.ema: Input should be (greater|less) than"):
            tiny_config(tiny_shards, tmp_path, **{"train.ema": value})
    assert tiny_config(tiny_shards, tmp_path, **{"train.ema": 0.99}).train.ema == 0.99


def _trained(config, steps: int, average=None, model=None, optimizer=None):
    model = model or create_model("unet", base_channels=4, depth=2)
    optimizer = optimizer or create_optimizer(config, model.parameters())
    train_one_epoch(model, batches(count=steps, seed=steps), create_loss("bce", 1), optimizer, torch.device("cpu"), 0,
                    average=average)
    return model, optimizer


def test_the_checkpoint_holds_the_average_as_its_model_and_resumes_both_exactly(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path, **{"train.ema": 0.9})
    torch.manual_seed(0)
    model = create_model("unet", base_channels=4, depth=2)
    average = create_weight_average(model, 0.9)
    model, optimizer = _trained(config, 3, average, model)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, None, 1, config, {"val_iou": 0.5}, average=average)

    loaded = load_model(tmp_path / "ckpt").module.state_dict()  # what evaluate, predict and serve load
    assert all(torch.equal(loaded[name], value) for name, value in average.module.state_dict().items())
    assert any(not torch.equal(loaded[name], value) for name, value in model.state_dict().items())

    torch.manual_seed(1)  # other initial weights: all of them must come from the checkpoint
    fresh = create_model("unet", base_channels=4, depth=2)
    fresh_average = create_weight_average(fresh, 0.9)
    fresh_optimizer = create_optimizer(config, fresh.parameters())
    assert restore_train_state(tmp_path / "ckpt", fresh, fresh_optimizer, None, fresh_average) == 1
    assert fresh_average.n_averaged.item() == average.n_averaged.item() == 3

    for model_, average_, optimizer_ in ((model, average, optimizer), (fresh, fresh_average, fresh_optimizer)):
        _trained(config, 2, average_, model_, optimizer_)
    for left, right in ((model, fresh), (average.module, fresh_average.module)):
        assert all(torch.equal(a, b) for a, b in zip(left.state_dict().values(), right.state_dict().values()))


def test_a_run_with_ema_from_a_checkpoint_without_one_starts_its_average_from_the_weights(tiny_shards, tmp_path):
    """PBT or --resume with train.ema turned on: the average begins again at the next step."""
    config = tiny_config(tiny_shards, tmp_path)
    model, optimizer = _trained(config, 2)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, None, 1, config, {"val_iou": 0.5})
    fresh = create_model("unet", base_channels=4, depth=2)
    fresh_average = create_weight_average(fresh, 0.9)
    restore_train_state(tmp_path / "ckpt", fresh, create_optimizer(config, fresh.parameters()), None, fresh_average)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_average.n_averaged.item() == 0  # its next update copies the weights
    fresh_average.update_parameters(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), fresh_average.module.state_dict().values()))


def test_a_checkpoint_with_ema_resumes_the_trained_weights_in_a_run_without_it(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path, **{"train.ema": 0.9})
    model = create_model("unet", base_channels=4, depth=2)
    average = create_weight_average(model, 0.9)
    model, optimizer = _trained(config, 3, average, model)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, None, 1, config, {"val_iou": 0.5}, average=average)
    fresh = create_model("unet", base_channels=4, depth=2)
    restore_train_state(tmp_path / "ckpt", fresh, create_optimizer(config, fresh.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
