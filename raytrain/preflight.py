"""Checks made before Ray starts, on what would otherwise fail in every worker or wait forever.
Plain functions of the config and the dataset: no Ray cluster needed to run or test them."""
from __future__ import annotations

import itertools

from raytrain.config import Config
from raytrain.data.shards import read_manifest
from raytrain.errors import ConfigError, DataError, RaytrainError
from raytrain.losses import create_loss
from raytrain.loop import loss_class_weights
from raytrain.models import create_model


def check_ready(config: Config, local_cpus: int | None) -> None:
    """Fail before Ray starts on what would otherwise fail in every worker, or wait forever: a local
    cluster too small for one run, the dataset and its classes, the model and loss of every trial.

    local_cpus: the CPUs of the local cluster about to start, or None for a cluster that is already
    running or remote (it may grow).
    """
    train = config.train
    needed = train.num_workers * train.cpus_per_worker + 1  # Ray Data's read and decode tasks need a CPU too
    if local_cpus is not None and needed > local_cpus:
        raise ConfigError(
            f"train.num_workers={train.num_workers} x train.cpus_per_worker={train.cpus_per_worker:g} needs {needed:g} CPUs "
            f"(one more for Ray Data), but the local cluster has {local_cpus}: lower train.num_workers or raise --num-cpus"
        )
    checked = set()
    for overrides in _trial_variants(config):
        where = "".join(f"search.space {key}={value!r}: " for key, value in overrides.items())
        try:
            variant = config.with_overrides(overrides)
            if ("data", variant.data.path, tuple(variant.classes)) not in checked:
                try:
                    manifest = read_manifest(variant.data.path)
                except DataError as err:
                    raise DataError(f"data.path: {err}") from None
                counts = manifest["num_samples"]
                if counts.get("train", 0) < variant.train.num_workers or not counts.get("val"):
                    raise DataError(
                        f"data.path {variant.data.path}: {counts.get('train', 0)} train and {counts.get('val', 0)} val "
                        f"samples; {variant.train.num_workers} workers need at least one train sample each, and "
                        "validation at least one sample (shard with --val-fraction above 0)"
                    )
                names = [entry["name"] for entry in manifest["classes"]]
                if names != variant.classes:
                    raise ConfigError(
                        f"classes {variant.classes} do not match the classes {names} of the dataset in data.path "
                        f"{variant.data.path}"
                    )
                checked.add(("data", variant.data.path, tuple(variant.classes)))
            model_key = ("model", variant.model.name, variant.num_classes, tuple(sorted(variant.model.kwargs().items())))
            if model_key not in checked:
                try:
                    create_model(variant.model.name, num_classes=variant.num_classes, **variant.model.kwargs())
                except (ValueError, KeyError) as err:
                    raise ConfigError(f"model: {err.args[0] if err.args else err}") from None  # KeyError's str() adds quotes
                checked.add(model_key)
            try:
                create_loss(variant.loss.name, num_classes=variant.num_classes, class_weights=loss_class_weights(variant))
            except ValueError as err:
                raise ConfigError(f"loss: {err}") from None
        except RaytrainError as err:
            raise type(err)(f"{where}{err}") from None


def _trial_variants(config: Config) -> list[dict]:
    """The overrides of every combination of searched values (both ends of a range): what trials can run."""
    keys = list(config.search.space)
    values = [next(iter(config.search.space[key].values())) for key in keys]
    return [dict(zip(keys, combination)) for combination in itertools.product(*values)]
