"""The worker loop's plain parts, without Ray: schedules, precision, clipping, early stopping, resume."""
import math

import pytest
import torch

from raytrain.checkpoints import restore_train_state, save_checkpoint
from raytrain.errors import CheckpointError
from raytrain.training.loop import (
    EarlyStopping,
    NonFiniteLoss,
    autocast_dtype,
    create_optimizer,
    create_scheduler,
    grad_scaler,
    lr_factor,
    train_one_epoch,
    use_optim_settings,
)
from raytrain.losses import create_loss
from raytrain.models import create_model
from tests.helpers import tiny_config


@pytest.mark.parametrize("schedule", ["cosine", "poly", "onecycle"])
def test_schedules_fall_to_zero_and_warm_up_linearly(schedule):
    total, warmup = 100, 10
    factors = [lr_factor(schedule, step, total, warmup) for step in range(total)]
    assert factors[warmup] == pytest.approx(1.0)  # the peak is optim.lr itself
    assert factors[-1] < 0.05 and lr_factor(schedule, total + 5, total, warmup) == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))  # never rises after the peak
    if schedule != "onecycle":
        assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])


def test_onecycle_starts_at_a_25th_and_rises_for_30_percent_by_default():
    assert lr_factor("onecycle", 0, 100) == pytest.approx(0.04 + 0.96 / 30)
    assert lr_factor("onecycle", 29, 100) == pytest.approx(1.0)
    assert lr_factor("onecycle", 31, 100) < 1.0


def test_constant_and_cosine_midpoint():
    assert lr_factor("constant", 57, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)


def optimiser_after(config, steps: int, steps_per_epoch: int = 5):
    """A fresh simple model's (model, optimizer, scheduler) after `steps` batches of `config`'s schedule."""
    model = create_model("simple")
    optimizer = create_optimizer(config, model.parameters())
    scheduler = create_scheduler(config, optimizer, steps_per_epoch=steps_per_epoch)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_scheduler_steps_every_batch_and_resumes_from_a_checkpoint(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path, **{"optim.schedule": "cosine", "train.epochs": 2})
    model, optimizer, scheduler = optimiser_after(config, 5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(config.optim.lr * 0.5)  # half-way down a cosine
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, 1, config, {"val_iou": 0.5})

    fresh, fresh_optimizer, fresh_scheduler = optimiser_after(config, 0)
    assert restore_train_state(tmp_path / "ckpt", fresh, fresh_optimizer, fresh_scheduler) == 1
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    assert fresh_scheduler.last_epoch == 5


@pytest.mark.parametrize("damage,fragments", [
    (lambda ckpt: (ckpt / "train_state.pt").write_bytes(b"not a torch file"), ["train_state.pt: cannot resume from it"]),
    (lambda ckpt: (ckpt / "train_state.pt").unlink(), ["train_state.pt: cannot read the training state", "No such file"]),
    (lambda ckpt: (ckpt / "model.pt").write_bytes((ckpt / "model.pt").read_bytes()[:100]), ["model.pt: cannot load the weights"]),
], ids=["state-not-torch", "state-missing", "weights-truncated"])
def test_a_damaged_checkpoint_is_one_line_naming_its_file_when_resuming(tiny_shards, tmp_path, damage, fragments):
    config = tiny_config(tiny_shards, tmp_path)
    save_checkpoint(tmp_path / "ckpt", *optimiser_after(config, 1), 1, config, {"val_iou": 0.5})
    damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as caught:
        restore_train_state(tmp_path / "ckpt", *optimiser_after(config, 0))
    [line] = str(caught.value).splitlines()
    assert line.startswith(str(tmp_path / "ckpt")) and all(fragment in line for fragment in fragments), line


def test_a_checkpoint_from_another_config_takes_this_configs_lr_at_the_same_point_of_the_schedule(tiny_shards, tmp_path):
    """PBT: a trial continues from a better trial's checkpoint with its own, perturbed lr and weight decay."""
    source = tiny_config(tiny_shards, tmp_path, **{"optim.schedule": "cosine", "optim.lr": 1e-3, "train.epochs": 2})
    save_checkpoint(tmp_path / "ckpt", *optimiser_after(source, 5), 1, source, {"val_iou": 0.5})

    target = source.with_overrides({"optim.lr": 4e-3, "optim.weight_decay": 0.01})
    fresh, fresh_optimizer, fresh_scheduler = optimiser_after(target, 0)
    restore_train_state(tmp_path / "ckpt", fresh, fresh_optimizer, fresh_scheduler)
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)  # the state's own lr, until told
    use_optim_settings(target, fresh_optimizer, fresh_scheduler)
    group = fresh_optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(4e-3 * 0.5) and group["weight_decay"] == 0.01  # half-way down the new cosine
    fresh_optimizer.step()
    fresh_scheduler.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * lr_factor("cosine", 6, 10))


def test_precision_is_fp32_on_cpu_unless_asked():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16


def batches(count=3, size=(32, 64), seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        images = torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8, generator=generator)
        masks = torch.randint(0, 2, (2, *size), dtype=torch.uint8, generator=generator)
        yield {"image": images, "mask": masks}


def test_gradient_clipping_bounds_each_update():
    torch.manual_seed(0)
    model = create_model("simple")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, batches(count=1), create_loss("bce", 1), optimizer, torch.device("cpu"), 0, grad_clip=1e-3)
    step = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(model.parameters(), before)))
    assert step == pytest.approx(1e-3, rel=1e-3)  # SGD at lr 1 moves exactly the clipped gradient's norm


def test_bf16_autocast_trains_on_cpu():
    torch.manual_seed(0)
    model = create_model("simple")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, seen = train_one_epoch(
        model, batches(), create_loss("bce", 1), optimizer, torch.device("cpu"), 0, amp_dtype=torch.bfloat16
    )
    assert seen == 6 and math.isfinite(loss)


def test_fp16_autocast_trains_on_cpu_through_the_grad_scaler():
    torch.manual_seed(0)
    model = create_model("simple")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = grad_scaler(torch.device("cpu"), torch.float16)
    loss, seen = train_one_epoch(
        model, batches(), create_loss("bce", 1), optimizer, torch.device("cpu"), 0, scaler=scaler, amp_dtype=torch.float16
    )
    assert scaler.is_enabled() and not grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
    assert seen == 6 and math.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_nan_loss_names_the_epoch_and_its_steps():
    model = create_model("simple")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 4, steps 0 to 4: lower optim.lr or check the data"):
        train_one_epoch(model, batches(count=5), create_loss("bce", 1), optimizer, torch.device("cpu"), 4)


def test_the_loss_is_checked_every_few_steps_and_the_error_names_the_steps_since_the_last_check():
    bce, calls = create_loss("bce", 1), []

    def nan_at_step_3(logits, masks):
        calls.append(None)
        return bce(logits, masks) * (math.nan if len(calls) == 4 else 1.0)

    model = create_model("simple")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 1, steps 2 to 3:"):
        train_one_epoch(model, batches(count=9), nan_at_step_3, optimizer, torch.device("cpu"), 1, check_every=2)
    assert len(calls) == 4  # stopped at the first check after the NaN, not at the epoch's end


def test_early_stopping_waits_for_patience_epochs_without_improvement():
    stopping = EarlyStopping("val_iou", "max", patience=2, min_delta=0.01)
    decisions = [stopping.should_stop({"val_iou": v}) for v in (0.5, 0.6, 0.605, 0.7, 0.69, 0.695)]
    assert decisions == [False, False, False, False, False, True]
    assert not EarlyStopping("val_iou", "max", patience=None).should_stop({"val_iou": 0.1})
    minimise = EarlyStopping("val_loss", "min", patience=1)
    assert [minimise.should_stop({"val_loss": v}) for v in (1.0, 0.5, 0.6)] == [False, False, True]


def test_training_batches_carry_each_samples_augmentation_drawn_from_seed_epoch_and_id():
    import numpy as np

    from raytrain.training.augment import Augment, batch_params
    from raytrain.training.loop import ToTensors

    batch = {"id": np.array(["b", "a"]), "image": np.zeros((2, 8, 16, 3), np.uint8), "mask": np.zeros((2, 8, 16), np.uint8)}
    augment = Augment(blur=0.5, noise=0.1)
    tensors = ToTensors(augment, (16, 8), seed=3, epoch=2)(batch)
    assert set(tensors) == {"image", "mask", "augment"}
    assert np.array_equal(tensors["augment"].numpy(), batch_params(augment, (16, 8), ["b", "a"], seed=3, epoch=2))
    assert set(ToTensors()(batch)) == {"image", "mask"}  # validation: no augmentation


def test_model_input_is_augmented_on_the_device_when_the_batch_says_how():
    import numpy as np

    from raytrain.models import to_model_input
    from raytrain.training.augment import Augment
    from raytrain.training.loop import ToTensors, model_input

    rng = np.random.default_rng(0)
    batch = {"id": np.array(["a", "b"]), "image": rng.integers(0, 256, (2, 8, 16, 3), dtype=np.uint8),
             "mask": rng.integers(0, 2, (2, 8, 16), dtype=np.uint8)}
    plain_images, plain_masks = model_input(ToTensors()(batch), "cpu", channels_last=False)
    assert torch.allclose(plain_images, to_model_input(torch.from_numpy(batch["image"])))
    assert plain_masks.dtype == torch.long
    flipped = ToTensors(Augment(hflip=1.0, scale=(1.0, 1.0), color_jitter=0.0), (16, 8), seed=0)(batch)
    images, masks = model_input(flipped, "cpu", channels_last=True)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(images, plain_images.flip(-1), atol=1e-5) and torch.equal(masks, plain_masks.flip(-1))


def test_first_batch_clock_times_the_first_batch_only():
    import time

    from raytrain.training.loop import FirstBatchClock

    def slow_start():
        time.sleep(0.05)
        yield from range(3)

    clock = FirstBatchClock(slow_start())
    assert clock.first_batch_s is None
    assert list(clock) == [0, 1, 2] and 0.05 <= clock.first_batch_s < 1


def test_a_run_starts_from_the_encoder_weights_file_and_its_checkpoint_loads_without_it(tmp_path):
    """The model as a worker builds it (checkpoints.initial_model, under the run's seed): its encoder
    holds exactly the file's tensors, where the seed alone gives others; one step trains from them as
    from the file loaded by hand; the checkpoint records the file and its SHA-256, and loads (the way
    evaluate, predict, export and serve load it) once the file is gone."""
    import hashlib

    import raytrain
    from raytrain.checkpoints import initial_model
    from tests.helpers import SMALL_ENCODER, encoder_weights

    file = encoder_weights(tmp_path / "resnet18.pt", seed=1)
    pretrained = torch.load(file, weights_only=True)
    config = tiny_config(tmp_path, tmp_path / "results", **SMALL_ENCODER, **{"model.encoder_weights": str(file)})
    torch.manual_seed(config.train.seed)  # as the worker seeds before building
    model, run_config = initial_model(config)
    assert run_config.model.encoder_weights_sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert model.encoder.state_dict().keys() == pretrained.keys()
    assert all(torch.equal(model.encoder.state_dict()[name], tensor) for name, tensor in pretrained.items())

    torch.manual_seed(config.train.seed)
    by_hand = create_model("smp:Unet", encoder="resnet18", depth=2)
    assert not torch.equal(by_hand.encoder.conv1.weight, pretrained["conv1.weight"])  # the seed's own weights differ
    by_hand.encoder.load_state_dict(pretrained)
    assert all(torch.equal(tensor, by_hand.state_dict()[name]) for name, tensor in model.state_dict().items())  # decoder too
    for trained in (model, by_hand):
        train_one_epoch(trained, batches(count=1), create_loss("bce", 1), create_optimizer(config, trained.parameters()),
                        torch.device("cpu"), 0)
    assert not torch.equal(model.encoder.conv1.weight, pretrained["conv1.weight"])  # the step trained the encoder
    assert all(torch.equal(tensor, by_hand.state_dict()[name]) for name, tensor in model.state_dict().items())

    save_checkpoint(tmp_path / "ckpt", model, create_optimizer(config, model.parameters()), None, 1, run_config, {"val_iou": 0.5})
    file.unlink()
    loaded = raytrain.load_model(tmp_path / "ckpt")
    recorded = loaded.config.model
    assert (recorded.encoder_weights, recorded.encoder_weights_sha256) == (str(file), run_config.model.encoder_weights_sha256)
    assert all(torch.equal(loaded.module.state_dict()[name], tensor) for name, tensor in model.state_dict().items())
