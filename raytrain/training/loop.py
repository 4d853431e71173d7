"""The training loop that runs inside every DDP worker. `train_worker` is the table of contents; the
parts it calls follow, then one epoch in plain torch, then the optimiser, schedule and small helpers.

The loop meets the cluster through a RunContext alone (its rank, device, dataset shards, checkpoints
and reports): launch.trainer's for a Ray Train worker, launch.trial's for a one-worker trial run in
Ray Tune's own trial actor.
"""
from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import ray.data
import ray.train
from ray.data.collate_fn import NumpyBatchCollateFn
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from raytrain.checkpoints import (
    checkpoints_by_epoch, initial_model, restore_train_state, save_checkpoint, unwrap,
)
from raytrain.config import Config
from raytrain.data.pipeline import FIRST_EPOCH, cached_epoch
from raytrain.errors import CheckpointError, RaytrainError
from raytrain.losses import create_loss
from raytrain.metrics import SegmentationMetrics
from raytrain.models import normalise, to_probabilities
from raytrain.training.augment import Augment, AugmentBuffers, augment_batch, augment_of, batch_params
from raytrain.training.averaging import create_weight_average

if TYPE_CHECKING:
    from raytrain.viz import TensorBoardLogger

OVERLAY_SAMPLES = 4  # val images drawn with their predictions in TensorBoard, each epoch
CHECK_LOSS_EVERY = 50  # training steps between checks that the loss is finite (each waits for the device)


class NonFiniteLoss(RaytrainError):
    """The training loss went NaN or infinite: the user's settings or data, so one line, no traceback."""


class ToTensors(NumpyBatchCollateFn):
    """Ray Data batch -> tensors, with each image's group index where the val rows carry one, and,
    for training, each sample's augmentation parameters ("augment", drawn from (seed, epoch, its id)
    on the host, where it costs microseconds). With `ids` (validation), the string ids as "id", a
    (N, longest) uint8 tensor of their UTF-8 bytes (ids_of reads them back): a batch of tensors
    alone is what Ray Data moves and pins."""

    def __init__(self, augment: Augment | None = None, size: tuple[int, int] | None = None, *,
                 seed: int | None = None, epoch: int = 0, ids: bool = False):
        super().__init__()
        self.augment, self.size, self.seed, self.epoch, self.ids = augment, size, seed, epoch, ids

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        tensors = {name: torch.from_numpy(batch[name]) for name in ("image", "mask", "group") if name in batch}
        if self.augment is not None:
            params = batch_params(self.augment, self.size, batch["id"], seed=self.seed, epoch=self.epoch)
            tensors["augment"] = torch.from_numpy(params)
        if self.ids:
            encoded = [str(sample_id).encode() for sample_id in batch["id"]]
            tensors["id"] = torch.from_numpy(np.array(encoded, dtype=bytes).view(np.uint8).reshape(len(encoded), -1).copy())
        return tensors


def ids_of(encoded: torch.Tensor) -> list[str]:
    """The sample ids ToTensors(ids=True) put in a batch."""
    return [bytes(row).rstrip(b"\0").decode() for row in encoded.cpu().numpy()]


# ---------------------------------------------------------------- the worker: what Ray runs


class RunContext(Protocol):
    """What the loop asks of the run it is part of."""

    world_rank: int
    world_size: int

    def device(self) -> torch.device: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """On this worker's device, wrapped for DDP when there are several workers."""

    def dataset(self, name: str) -> ray.data.DataIterator:
        """This worker's part of the run's dataset `name`."""

    def checkpoint(self) -> ray.train.Checkpoint | None:
        """The run's latest registered checkpoint (a restarted worker group, a resumed run), or None."""

    def storage(self) -> tuple:
        """(pyarrow filesystem, the run's folder on it): where its checkpoints are."""

    def report(self, metrics: dict, directory: str | None) -> None:
        """An epoch's metrics, with the checkpoint rank 0 saved in the local `directory` (None elsewhere)."""

    def register(self, checkpoint: ray.train.Checkpoint, metrics: dict) -> None:
        """A checkpoint already in the run's folder, restored from but never registered, with its metrics."""


@dataclass
class Worker:
    """What a worker sets up once and uses every epoch."""

    config: Config
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped: the one to train
    eval_model: torch.nn.Module  # the plain module (see build_model), or with train.ema the average's
    average: AveragedModel | None  # train.ema's average of the weights
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    channels_last: bool
    start_epoch: int
    run: RunContext
    unregistered: tuple[ray.train.Checkpoint, dict] | None  # restored from, with its metrics, and not in the run's record
    train_shard: ray.data.DataIterator | None  # every epoch's, or None when the split is cached
    first_epoch_shard: ray.data.DataIterator  # train_shard itself, or the cached split in its streamed order
    cached_train: ray.data.MaterializedDataset | None  # the cached split, whose later epochs are data.pipeline.cached_epoch
    val_shard: ray.data.DataIterator
    metrics: SegmentationMetrics
    early_stopping: EarlyStopping
    logger: TensorBoardLogger | None  # rank 0's, when there is a log_dir
    rank: int
    is_rank0: bool
    progress: Callable[[int, int, int], None] | None  # rank 0's: (epoch, images done, of total) once a batch
    world_size: int
    epoch_images: int  # trained on by all workers each epoch: DDP's equal split leaves the remainder out


def train_worker(loop_config: dict, run: RunContext) -> None:
    """loop_config: {"config": the resolved Config as a dict, "manifest": its dataset's Manifest,
    "log_dir": where rank 0 writes TensorBoard, "initial_checkpoint": a ray.train.Checkpoint to start
    from, or None, "cached_train": the cached train split (also the run's dataset FIRST_EPOCH) or
    None, "progress": rank 0's ProgressRelay or None (launch.trainer.trainer_loop_config)}."""
    worker = setup(loop_config, run)
    try:
        if worker.unregistered:
            run.register(*worker.unregistered)
        for epoch in range(worker.start_epoch, worker.config.train.epochs):
            report, samples = run_epoch(worker, epoch)
            report_and_checkpoint(worker, epoch, report, samples)
            # Every worker sees the same all-reduced metrics, so all of them stop at the same epoch.
            if worker.early_stopping.should_stop(report):
                break
    finally:  # also when a scheduler stops the run inside a report: a trial's actor may train the next trial
        if worker.logger:
            worker.logger.close()


def setup(loop_config: dict, run: RunContext) -> Worker:
    """Seed; build model, loss, optimiser and schedule; restore a checkpoint if there is one."""
    config, manifest = Config.model_validate(loop_config["config"]), loop_config["manifest"]
    device = run.device()
    seed_everything(config.train.seed)  # before the model: its initial weights come from the seed
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    amp_dtype = autocast_dtype(config.train.precision, device)
    channels_last = config.train.channels_last if config.train.channels_last is not None else device.type == "cuda"
    model, config = initial_model(config)  # the config now records an encoder_weights file's SHA-256
    model, eval_model, average = build_model(run.prepare_model, model, config, channels_last)
    # .to(device): class weights are a buffer of the loss, and must sit where the logits are.
    class_weights = manifest.class_weights(config.loss.class_weights)
    loss_fn = create_loss(config.loss.name, num_classes=config.num_classes, class_weights=class_weights).to(device)
    optimizer = create_optimizer(config, model.parameters())
    scheduler = create_scheduler(config, optimizer, steps_per_epoch(manifest.count("train"), config.train.batch_size, run.world_size))
    start_epoch, unregistered = restore(run, config, model, optimizer, scheduler, average, loop_config.get("initial_checkpoint"))
    is_rank0 = run.world_rank == 0
    cached_train = loop_config.get("cached_train")
    return Worker(
        config=config, device=device, model=model, eval_model=eval_model, average=average, loss_fn=loss_fn,
        optimizer=optimizer, scheduler=scheduler, scaler=grad_scaler(device, amp_dtype),
        amp_dtype=amp_dtype, channels_last=channels_last, start_epoch=start_epoch, run=run, unregistered=unregistered,
        train_shard=None if cached_train is not None else run.dataset("train"),
        first_epoch_shard=run.dataset(FIRST_EPOCH if cached_train is not None else "train"),
        cached_train=cached_train,
        val_shard=run.dataset("val"),
        metrics=SegmentationMetrics(config.num_classes, class_names=config.classes, from_logits=True,
                                    groups=manifest.metric_groups("val")),
        early_stopping=EarlyStopping.for_config(config),
        logger=open_logger(loop_config.get("log_dir"), config) if is_rank0 else None,
        rank=run.world_rank,
        is_rank0=is_rank0,
        progress=loop_config.get("progress") if is_rank0 else None,
        world_size=run.world_size,
        epoch_images=manifest.count("train") // run.world_size * run.world_size,
    )


def build_model(prepare: Callable[[torch.nn.Module], torch.nn.Module], model: torch.nn.Module, config: Config,
                channels_last: bool) -> tuple[torch.nn.Module, torch.nn.Module, AveragedModel | None]:
    """From the run's initial model (checkpoints.initial_model): (the model to train, on the device
    and wrapped for DDP by `prepare`; the plain module to evaluate, or with train.ema the average's;
    the average, or None)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare(model)
    average = create_weight_average(unwrap(model), config.train.ema) if config.train.ema else None
    # Validation runs on a plain module: every worker evaluates a different number of batches,
    # and DDP's forward would wait for the others.
    eval_model = average.module if average is not None else unwrap(model)
    if config.train.compile:
        return torch.compile(model), torch.compile(eval_model), average
    return model, eval_model, average


def restore(run: RunContext, config: Config, model, optimizer, scheduler, average,
            initial_checkpoint: ray.train.Checkpoint | None) -> tuple[int, tuple[ray.train.Checkpoint, dict] | None]:
    """Load the weights and training state of this run's latest checkpoint: its registered latest
    (a restarted worker group, a resumed run), else where it was told to start, unless the run's
    folder holds a later one. A worker saves its checkpoint before the run registers it, so a
    run killed in between (kill -9, a lost node) leaves it there unregistered; one cut off mid-copy
    is passed over. Returns the epoch to start from (0 without a checkpoint) and the unregistered
    checkpoint restored, with its metrics, or None."""
    registered = run.checkpoint()
    own = registered or initial_checkpoint
    for checkpoint, metrics in _unregistered_checkpoints(*run.storage(), registered):
        try:
            start_epoch = _restore_from(checkpoint, config, model, optimizer, scheduler, average)
        except (CheckpointError, OSError):
            continue
        return start_epoch, (checkpoint, metrics)
    return (_restore_from(own, config, model, optimizer, scheduler, average) if own else 0), None


def _restore_from(checkpoint: ray.train.Checkpoint, config: Config, model, optimizer, scheduler, average) -> int:
    with checkpoint.as_directory() as directory:
        start_epoch = restore_train_state(directory, model, optimizer, scheduler, average)
    use_optim_settings(config, optimizer, scheduler)
    return start_epoch


def _unregistered_checkpoints(filesystem, folder: str, registered: ray.train.Checkpoint | None) -> list[tuple[ray.train.Checkpoint, dict]]:
    """The checkpoints in the run's folder of later epochs than its latest registered one
    (all of them when it has none), the latest first, each with its metrics."""
    found = checkpoints_by_epoch(filesystem, folder)
    if registered is not None:
        epochs = [epoch for epoch, path, _ in found if path.rstrip("/") == registered.path.rstrip("/")]
        if not epochs:
            return []  # its metrics unreadable: nothing to compare with, so Ray Train's own stands
        found = [entry for entry in found if entry[0] > epochs[0]]
    return [(ray.train.Checkpoint(path, filesystem=filesystem), metrics) for _, path, metrics in found]


def open_logger(log_dir: str | None, config: Config) -> TensorBoardLogger | None:
    if not log_dir:
        return None
    from raytrain.viz import TensorBoardLogger  # matplotlib and tensorboard load on rank 0 only

    return TensorBoardLogger(log_dir, config.classes)


def run_epoch(worker: Worker, epoch: int) -> tuple[dict, dict | None]:
    """Train, then evaluate; returns the epoch's report, summed over workers, and rank 0's overlay samples."""
    started = time.perf_counter()
    batches = FirstBatchClock(counted(train_batches(worker, epoch), worker, epoch))
    train_loss, train_seen = train_one_epoch(
        worker.model, batches, worker.loss_fn, worker.optimizer, worker.device, epoch,
        scheduler=worker.scheduler, scaler=worker.scaler, amp_dtype=worker.amp_dtype,
        grad_clip=worker.config.train.grad_clip, channels_last=worker.channels_last, average=worker.average,
    )
    train_seconds = time.perf_counter() - started
    worker.metrics.reset()
    val_batches = worker.val_shard.iter_torch_batches(
        batch_size=worker.config.train.batch_size, collate_fn=ToTensors(ids=True), **host_batches(worker.device)
    )
    val_loss, val_seen, samples = evaluate(
        worker.eval_model, val_batches, worker.loss_fn, worker.metrics, worker.device, amp_dtype=worker.amp_dtype,
        channels_last=worker.channels_last, keep=OVERLAY_SAMPLES if worker.logger else 0,
    )
    train_loss, train_seen, val_loss, val_seen = sum_over_workers(
        train_loss, train_seen, val_loss, val_seen, device=worker.device
    )
    report = {f"val_{key}": value for key, value in worker.metrics.compute().items()}
    report.update(
        epoch=epoch + 1,  # epochs completed: what schedulers and checkpoints count
        train_loss=train_loss / max(train_seen, 1),
        val_loss=val_loss / max(val_seen, 1),
        lr=worker.optimizer.param_groups[0]["lr"],
        images_per_s=train_seen / train_seconds,
        first_batch_s=batches.first_batch_s,  # the epoch's fixed cost: its Ray Data execution's start
        epoch_s=time.perf_counter() - started,
    )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.items()}, samples


def train_batches(worker: Worker, epoch: int):
    data, seed = worker.config.data, worker.config.train.seed
    if epoch == 0:
        shard = worker.first_epoch_shard
    elif worker.cached_train is not None:
        shard = cached_epoch(worker.cached_train, seed, epoch, worker.rank, worker.world_size)
    else:
        shard = worker.train_shard
    return shard.iter_torch_batches(
        batch_size=worker.config.train.batch_size, prefetch_batches=2,
        collate_fn=ToTensors(augment_of(data), data.size, seed=seed, epoch=epoch),
        local_shuffle_buffer_size=data.shuffle_buffer or None,
        local_shuffle_seed=(seed * 10_007 + epoch) if data.shuffle_buffer else None,  # a new, seeded order each epoch
        **host_batches(worker.device),
    )


def host_batches(device: torch.device) -> dict:
    """Batches stay on the host, pinned for a GPU, and each step copies them without waiting
    (forward's non_blocking), so the copy overlaps the work already queued on the device."""
    return {"device": "cpu", "pin_memory": device.type == "cuda"}


def report_and_checkpoint(worker: Worker, epoch: int, report: dict, samples: dict | None) -> None:
    """The epoch's metrics to TensorBoard and Ray, with rank 0's checkpoint: every rank holds the same weights."""
    if worker.logger:  # scalars every epoch; images when rank 0 had val samples
        worker.logger.log_epoch(epoch + 1, report, **(samples or {}))
    with tempfile.TemporaryDirectory() as directory:
        if worker.is_rank0:
            save_checkpoint(directory, worker.model, worker.optimizer, worker.scheduler, epoch + 1, worker.config, report,
                            average=worker.average)
        worker.run.report(report, directory if worker.is_rank0 else None)


# ---------------------------------------------------------------- one epoch, in plain torch


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The one mixed-precision context for training and evaluation; disabled in fp32."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Scales the loss in fp16 only, so small gradients do not underflow; elsewhere it passes through."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def forward(model, loss_fn, batch: dict, device, precision, channels_last: bool, buffers: AugmentBuffers | None = None):
    """The batch to the device, augmented there (into `buffers`) when it carries parameters
    ("augment"), then the model and loss under `precision`: (logits, masks, loss)."""
    images, masks = model_input(batch, device, channels_last, buffers)
    with precision:
        logits = model(images)
        loss = loss_fn(logits, masks)
    return logits, masks, loss


def train_step(model, loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()


def train_one_epoch(
    model, batches, loss_fn, optimizer, device, epoch: int, *,
    scheduler=None, scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = None, channels_last: bool = False, check_every: int = CHECK_LOSS_EVERY,
    average: AveragedModel | None = None,
) -> tuple[float, int]:
    """One pass over this worker's training shard, `average` (train.ema) updated after each step;
    returns (summed loss, images seen)."""
    model.train()
    scaler = grad_scaler(device, amp_dtype) if scaler is None else scaler
    precision = autocast(device, amp_dtype)
    total_loss, seen, checked, step = loss_sum(device), 0, 0, -1
    buffers = AugmentBuffers()
    for step, batch in enumerate(batches):
        _, masks, loss = forward(model, loss_fn, batch, device, precision, channels_last, buffers)
        train_step(model, loss, optimizer, scaler, grad_clip)
        if average is not None:
            average.update_parameters(unwrap(model))
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach().double() * len(masks)  # stays on the device: no host sync per step
        seen += len(masks)
        if (step + 1) % check_every == 0:
            check_finite(total_loss, epoch, checked, step)
            checked = step + 1
    check_finite(total_loss, epoch, checked, step)
    return total_loss.item(), seen


def loss_sum(device) -> torch.Tensor:
    """A running sum of batch losses; float64, like the Python float it replaced, so sums stay exact."""
    return torch.zeros((), dtype=torch.float64, device=device)


def check_finite(total_loss: torch.Tensor, epoch: int, first: int, last: int) -> None:
    """Raise if the running sum went NaN or infinite in steps first..last: once it does, it stays so."""
    if not torch.isfinite(total_loss):  # the host sync, once per check_every steps
        steps = f"step {last}" if first == last else f"steps {first} to {last}"
        raise NonFiniteLoss(f"loss is {total_loss.item()} at epoch {epoch}, {steps}: lower optim.lr or check the data")


@torch.no_grad()
def evaluate(
    model, batches, loss_fn, metrics: SegmentationMetrics, device, *,
    amp_dtype: torch.dtype | None = None, channels_last: bool = False, keep: int = 0,
) -> tuple[float, int, dict | None]:
    """Accumulate this worker's val shard into `metrics` (all-reduced in compute()).

    Returns (summed loss, images seen, the first `keep` images with their masks and probabilities).
    """
    model.eval()
    precision = autocast(device, amp_dtype)
    total_loss, seen, samples = loss_sum(device), 0, None
    for batch in batches:
        logits, masks, loss = forward(model, loss_fn, batch, device, precision, channels_last)
        total_loss += loss.double() * len(masks)
        seen += len(masks)
        logits = logits.float()
        metrics.update(logits, masks, batch.get("group"), ids=ids_of(batch["id"]) if "id" in batch else None)
        if keep and samples is None:
            samples = {  # .cpu(): on a GPU worker, Ray Data hands over batches already on the device
                "images": batch["image"][:keep].cpu().numpy(),
                "masks": batch["mask"][:keep].cpu().numpy(),
                "probabilities": to_probabilities(logits[:keep]).cpu().numpy(),
            }
    return total_loss.item(), seen, samples


# ---------------------------------------------------------------- optimiser, schedule and the small parts


def create_optimizer(config: Config, params) -> torch.optim.Optimizer:
    optim = config.optim
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.name]
    return optimizer_class(params, lr=optim.lr, weight_decay=optim.weight_decay)


def use_optim_settings(config: Config, optimizer, scheduler) -> None:
    """After loading another run's optimiser state (PBT), apply this config's lr, weight decay and
    momentum: the state keeps the values it was saved with. The schedule's position is kept."""
    optim = config.optim
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(initial_lr=optim.lr, lr=optim.lr * factor, weight_decay=optim.weight_decay)
        if "momentum" in group:
            group["momentum"] = optim.momentum


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiple of optim.lr used at batch `step` (0-based) of a run of `total_steps` batches."""
    if schedule == "onecycle" and not warmup_steps:
        warmup_steps = max(1, round(0.3 * total_steps))  # one-cycle rises for the first 30% by default
    if step < warmup_steps:
        start = 0.04 if schedule == "onecycle" else 0.0  # one-cycle starts at lr/25, as in Smith's paper
        return start + (1 - start) * (step + 1) / warmup_steps
    # Clamped: a worker may run a step or two more than the manifest's count predicts.
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule in ("cosine", "onecycle"):
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1 - progress) ** 0.9  # the usual power in segmentation (DeepLab)
    return 1.0


def create_scheduler(config: Config, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * config.train.epochs
    warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.optim.schedule, step, total, warmup)
    )


def steps_per_epoch(train_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per worker and epoch: the train split is cut into equal parts, one per worker."""
    return max(1, math.ceil(train_samples // world_size / batch_size))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sum_over_workers(*values: float, device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def model_input(batch: dict, device, channels_last: bool, buffers: AugmentBuffers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised float images, long masks) on `device`, augmented when the batch says how: new
    tensors, so the augmentation's `buffers` are free again for the next batch."""
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    if "augment" in batch:
        images, masks = augment_batch(images, masks, batch["augment"], buffers)
    else:
        images = images.permute(0, 3, 1, 2).float()
    images = normalise(images)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.contiguous(memory_format=memory_format), masks.long()


class FirstBatchClock:
    """Iterates `batches`, timing how long the first one took to arrive (seconds, None until then)."""

    def __init__(self, batches):
        self.batches, self.first_batch_s = batches, None

    def __iter__(self):
        started = time.perf_counter()
        for batch in self.batches:
            if self.first_batch_s is None:
                self.first_batch_s = time.perf_counter() - started
            yield batch


def counted(batches, worker: Worker, epoch: int):
    """Iterates `batches`, telling rank 0's progress how many images all workers have trained on so
    far (from the batch's length on the host: no device sync)."""
    if worker.progress is None:
        yield from batches
        return
    done, total = 0, worker.epoch_images
    worker.progress(epoch + 1, 0, total)  # the epoch's start: where its rate is counted from
    for batch in batches:
        yield batch
        done = min(done + len(batch["mask"]) * worker.world_size, total)
        worker.progress(epoch + 1, done, total)
    if done < total:
        worker.progress(epoch + 1, total, total)


class EarlyStopping:
    """Stop when `metric` has not improved by `min_delta` for `patience` epochs."""

    def __init__(self, metric: str, mode: str, patience: int | None, min_delta: float = 0.0):
        self.metric, self.sign, self.patience, self.min_delta = metric, (1 if mode == "max" else -1), patience, min_delta
        self.best, self.waited = -math.inf, 0

    @classmethod
    def for_config(cls, config: Config) -> EarlyStopping:
        stopping = config.train.early_stopping
        return cls(stopping.metric or config.search.metric, config.search.mode, stopping.patience, stopping.min_delta)

    def should_stop(self, report: dict) -> bool:
        value = report.get(self.metric)
        if value is None or self.patience is None:
            return False
        if self.sign * value > self.best + self.min_delta:
            self.best, self.waited = self.sign * value, 0
        else:
            self.waited += 1
        return self.waited >= self.patience
