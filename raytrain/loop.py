"""The training loop that runs inside every DDP worker: read it top to bottom like a script.

Ray appears only where the loop meets the cluster: its dataset shard, its checkpoint, its report.
"""
from __future__ import annotations

import math
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raytrain.checkpoints import restore_train_state, save_checkpoint, unwrap
from raytrain.config import Config
from raytrain.data.shards import read_manifest
from raytrain.data.transforms import to_model_input
from raytrain.errors import RaytrainError
from raytrain.losses import create_loss
from raytrain.metrics import SegmentationMetrics
from raytrain.models import create_model


class NonFiniteLoss(RaytrainError):
    pass


def to_tensors(batch: dict) -> dict[str, torch.Tensor]:
    """Ray Data batch -> tensors; the string ids stay behind (they only serve data tests and logs)."""
    return {"image": torch.from_numpy(batch["image"]), "mask": torch.from_numpy(batch["mask"])}


def loss_class_weights(config: Config) -> list[float] | None:
    """The configured weights, or inverse pixel frequencies from the manifest (mean 1)."""
    weights = config.loss.class_weights
    if weights != "inverse_frequency":
        return weights
    frequencies = read_manifest(config.data.path)["pixel_frequencies"]
    names = ["background", *config.classes] if config.num_classes == 1 else config.classes
    inverse = [1.0 / max(frequencies[name], 1e-6) for name in names]
    return [w * len(inverse) / sum(inverse) for w in inverse]


def create_optimizer(config: Config, params) -> torch.optim.Optimizer:
    optim = config.optim
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.name]
    return optimizer_class(params, lr=optim.lr, weight_decay=optim.weight_decay)


def sum_over_workers(*values: float, device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def train_one_epoch(model, batches, loss_fn, optimizer, device, epoch: int) -> tuple[float, int]:
    """One pass over this worker's training shard; returns (summed loss, images seen)."""
    model.train()
    total_loss, seen = 0.0, 0
    for step, batch in enumerate(batches):
        images, masks = to_model_input(batch["image"], device), batch["mask"].to(device).long()
        loss = loss_fn(model(images), masks)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch}, step {step}: lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(images)
        seen += len(images)
    return total_loss, seen


@torch.no_grad()
def evaluate(model, batches, loss_fn, metrics: SegmentationMetrics, device) -> tuple[float, int]:
    """Accumulate this worker's val shard into `metrics`; the all-reduce happens in compute()."""
    model.eval()
    total_loss, seen = 0.0, 0
    for batch in batches:
        images, masks = to_model_input(batch["image"], device), batch["mask"].to(device).long()
        logits = model(images)
        total_loss += loss_fn(logits, masks).item() * len(images)
        seen += len(images)
        metrics.update(logits, masks)
    return total_loss, seen


def train_worker(config_dict: dict) -> None:
    config = Config.model_validate(config_dict)
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.train.seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))

    model = create_model(config.model.name, num_classes=config.num_classes, **config.model.kwargs())
    model = ray.train.torch.prepare_model(model)
    loss_fn = create_loss(config.loss.name, num_classes=config.num_classes, class_weights=loss_class_weights(config))
    optimizer = create_optimizer(config, model.parameters())
    # Validation runs on the plain module: every worker evaluates a different number of batches,
    # and DDP's forward would wait for the others.
    eval_model = unwrap(model)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group, or a resumed run: carry on after the last epoch
        with checkpoint.as_directory() as directory:
            start_epoch = restore_train_state(directory, model, optimizer)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = config.train.batch_size
    metrics = SegmentationMetrics(config.num_classes, class_names=config.classes, from_logits=True)

    for epoch in range(start_epoch, config.train.epochs):
        started = time.perf_counter()
        train_batches = train_shard.iter_torch_batches(
            batch_size=batch_size, collate_fn=to_tensors, prefetch_batches=2,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
        )
        train_loss, train_seen = train_one_epoch(model, train_batches, loss_fn, optimizer, device, epoch)
        train_seconds = time.perf_counter() - started

        metrics.reset()
        val_loss, val_seen = evaluate(eval_model, val_shard.iter_torch_batches(batch_size=batch_size, collate_fn=to_tensors), loss_fn, metrics, device)
        train_loss, train_seen, val_loss, val_seen = sum_over_workers(
            train_loss, train_seen, val_loss, val_seen, device=device
        )
        report = {f"val_{key}": value for key, value in metrics.compute().items()}
        report.update(
            epoch=epoch + 1,  # epochs completed: what schedulers and checkpoints count
            train_loss=train_loss / max(train_seen, 1),
            val_loss=val_loss / max(val_seen, 1),
            lr=optimizer.param_groups[0]["lr"],
            images_per_s=train_seen / train_seconds,
        )
        report = {k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in report.items()}

        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if context.get_world_rank() == 0:
                save_checkpoint(directory, model, optimizer, None, epoch + 1, config, report)
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(report, checkpoint=saved)
