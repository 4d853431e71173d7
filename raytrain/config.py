"""The one typed config that every part of raytrain reads.

A run is described by a YAML file validated against `Config`: a path, or the name of a config
shipped in the package (`raytrain/tune_configs/`, listed by `shipped_configs()`). Any field can be
overridden with dotted keys, `--set train.epochs=3` on the CLI or `{"train.epochs": 3}` from Python,
and `search.space` uses the same dotted keys. The fully resolved config travels inside every
checkpoint, so a checkpoint says exactly how it was made.
"""
from __future__ import annotations

import copy
import math
import os
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raytrain.errors import ConfigError
from raytrain.storage.paths import is_uri
from raytrain.storage.safe_yaml import load_yaml_file, yaml_value


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default. So are inf and nan.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info) -> Any:
        # pydantic reads true as 1 for an int or float field: `epochs: true` must not train one epoch.
        accepted = _types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in accepted and accepted & {int, float}:
            raise ValueError(f"expected a number, not {str(value).lower()}")
        return value


def _types(annotation: Any) -> set:
    """The plain types an annotation accepts at its top level: int | None -> {int, NoneType}."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_types(arg) for arg in args))
    if typing.get_origin(annotation) is Literal:
        return {type(arg) for arg in args}
    return {typing.get_origin(annotation) or annotation}


def parse_size(value: Any) -> tuple[int, int]:
    """'256x128' or [256, 128] -> (width, height)."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"expected WIDTHxHEIGHT such as 256x128, got {value!r}")
        value = [int(p) for p in parts]
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        hint = " (a number: YAML reads text such as 0x64 as hexadecimal)" if isinstance(value, int) and not isinstance(value, bool) else ""
        raise ValueError(f"expected WIDTHxHEIGHT such as 256x128, got {value!r}{hint}")
    width, height = value
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    return width, height


class DataConfig(_Section):
    path: str = Field(description="a sharded dataset: the directory (or URI) holding manifest.json")
    size: tuple[int, int] = Field((256, 256), description="training size WIDTHxHEIGHT")
    augment: bool = True
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    scale: tuple[float, float] = Field((0.8, 1.25), description="random zoom range before cropping")
    color_jitter: float = Field(0.2, ge=0, le=1, description="brightness/contrast/saturation jitter")
    blur: float = Field(0, ge=0, le=1, description="probability of a Gaussian blur (after the jitter)")
    blur_sigma: tuple[float, float] = Field(
        (0.5, 1.5), description="range of the blur's standard deviation, in pixels at the training size"
    )
    noise: float = Field(
        0, ge=0, le=1, description="additive Gaussian pixel noise: each image's deviation is drawn in [0, noise] x 255"
    )
    shuffle_buffer: int = Field(64, ge=0, description="samples in each worker's local shuffle buffer")
    cache: Literal["auto", "off", "memory"] = Field(
        "auto", description="keep the decoded splits in Ray's object store after one pass: auto when they fit its budget"
    )

    _parse_size = field_validator("size", mode="before")(lambda v: parse_size(v))

    @field_validator("scale", "blur_sigma")
    @classmethod
    def _positive_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"expected [low, high] with 0 < low <= high, got {list(bounds)}")
        return bounds

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        # Ray workers run in other directories: a relative path means the one the user typed it in.
        return path if is_uri(path) else str(Path(path).expanduser().resolve())


class ModelConfig(_Section):
    name: str = "unet"
    # Every field below is optional: only the ones that are set reach create_model, so each
    # architecture keeps its own defaults and an option that does not apply is a clear error.
    depth: int | None = Field(None, ge=1)
    base_channels: int | None = Field(None, ge=1)
    batch_norm: bool | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    encoder: str | None = None
    encoder_weights: str | None = Field(
        None,
        description="the encoder's pretrained weights (smp:<Arch> models): the name of smp's weights (imagenet, "
        "ssl, ...), which smp downloads, or a file, as a path or URI (s3://...), of the encoder's state dict saved "
        "with torch.save, which every worker reads (a value holding a / or a . is a file)",
    )
    encoder_weights_sha256: str | None = Field(
        None,
        description="the SHA-256 of the encoder_weights file, which a run records in its checkpoints; where set, "
        "a file with other contents is refused",
    )

    @field_validator("encoder_weights")
    @classmethod
    def _weights_file_absolute(cls, weights: str | None) -> str | None:
        if weights is not None and not weights.strip():
            raise ValueError("expected the name of smp's weights or a file's path or URI, got an empty string")
        # Ray workers run in other directories: a relative path means the one the user typed it in.
        if weights is None or not _names_a_file(weights) or is_uri(weights):
            return weights
        return str(Path(weights).expanduser().resolve())

    @field_validator("encoder_weights_sha256")
    @classmethod
    def _a_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"expected a SHA-256 as 64 hexadecimal digits (0-9, a-f), got {digest!r}")
        return digest

    @model_validator(mode="after")
    def _digest_of_a_file(self) -> "ModelConfig":
        if self.encoder_weights_sha256 is not None and self.encoder_weights_file is None:
            raise ValueError("encoder_weights_sha256 is the digest of an encoder_weights file, and none is set")
        return self

    @property
    def encoder_weights_file(self) -> str | None:
        """encoder_weights where it is a file (a path or URI) that the run loads; None otherwise."""
        return self.encoder_weights if self.encoder_weights is not None and _names_a_file(self.encoder_weights) else None

    def kwargs(self) -> dict[str, Any]:
        """The options that create_model takes: those set, less a file's encoder_weights, which
        checkpoints.initial_model loads into the built model, and its digest."""
        excluded = {"name", "encoder_weights_sha256"} | ({"encoder_weights"} if self.encoder_weights_file else set())
        return {k: v for k, v in self.model_dump(exclude=excluded).items() if v is not None}


def _names_a_file(weights: str) -> bool:
    """Whether model.encoder_weights is a file: smp's names (imagenet, ssl, imagenet+5k, noisy-student,
    ...) hold neither a / nor a ."""
    return "/" in weights or "." in weights


class LossConfig(_Section):
    name: str = "bce"
    class_weights: list[float] | Literal["inverse_frequency"] | None = Field(
        None, description="one weight per class (binary: [background, road]), or inverse_frequency from the manifest"
    )


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="for sgd")
    schedule: Literal["constant", "cosine", "onecycle", "poly"] = Field(
        "constant", description="learning-rate shape over the run, stepped every batch"
    )
    warmup_epochs: float = Field(0, ge=0, description="linear warm-up from 0 to lr (fractions allowed)")


class EarlyStoppingConfig(_Section):
    metric: str | None = Field(None, description="default: search.metric, in search.mode")
    patience: int | None = Field(None, ge=1, description="epochs without improvement before the run stops; off if unset")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")


class TrainConfig(_Section):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(2, ge=1, description="DDP workers per run")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0, description="used when use_gpu is true; fractions allowed")
    seed: int = Field(
        0,
        description=(
            "seeds weight init, each epoch's file order, the local shuffle buffer, each sample's augmentation "
            "(from seed, epoch and sample id) and search sampling: the same seed, data and config give the same "
            "run on CPU. Not covered: GPU kernels' nondeterminism; and a run that restarts from a checkpoint "
            "(worker-group restart, resume, PBT) counts epochs from 0 again for file order and augmentation"
        ),
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it (else fp16), fp32 on CPU"
    )
    channels_last: bool | None = Field(None, description="NHWC memory layout; default on GPU only")
    compile: bool = Field(False, description="torch.compile the model")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    ema: float | None = Field(
        None, gt=0, lt=1,
        description="decay of an exponential moving average of the weights (e.g. 0.99): the average is what is "
        "evaluated, checkpointed as model.pt and loaded; warmed up as timm's ModelEmaV3",
    )
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    checkpoints_to_keep: int = Field(
        2, ge=1, description="checkpoints kept: the best K by search.metric, or with search.select last or mean_last the latest K"
    )
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint")
    storage_path: str = Field("~/raytrain_results", description="local directory or URI (s3://...)")
    tracking: Literal["none", "mlflow"] = Field(
        "none", description="mlflow: params, per-epoch metrics and the best checkpoint of each run or trial "
        "(pip install 'raytrain[mlflow]')"
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite:///EXPERIMENT/mlflow.db, a database in each experiment"
    )

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_store(cls, uri: str | None) -> str | None:
        # Ray Train's controller runs in another directory: a relative store means the one the user typed it in.
        if uri is None:
            return None
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().resolve()}"
        return uri if is_uri(uri) else str(Path(uri).expanduser().resolve())

    @model_validator(mode="after")
    def _tracking_store(self) -> "TrainConfig":
        # The default store is a SQLite file inside the experiment, which needs a local experiment directory.
        remote = is_uri(self.storage_path) and not self.storage_path.startswith("file://")
        if self.tracking == "mlflow" and self.tracking_uri is None and remote:
            raise ValueError(
                f"tracking mlflow with storage_path {self.storage_path}: set train.tracking_uri "
                "(an MLflow server, or sqlite:///PATH on this machine)"
            )
        return self


SearchKind = Literal["choice", "grid", "uniform", "loguniform", "randint"]
# Which score stands for a trial (search.select): its best epoch's, its last epoch's, or the mean of its
# last search.last_k epochs' (selection.trial_score).
Select = Literal["best", "last", "mean_last"]
SELECTS = typing.get_args(Select)
# The group of `val_iou@worst`: the lowest score of the val groups, so no group may have this name.
WORST_GROUP = "worst"


class SchedulerConfig(_Section):
    name: Literal["fifo", "asha", "hyperband", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1, description="asha, hyperband: epochs before a trial can be stopped")
    reduction_factor: float = Field(2, gt=1, description="asha, hyperband")
    perturbation_interval: int = Field(
        2, ge=1, description="pbt: epochs between the moments when the worst trials copy the best"
    )
    mutate: list[str] | None = Field(
        None, description="pbt: searched keys that change within a trial (default: all but model.* and optim.name)"
    )
    synch: bool = Field(False, description="pbt: the whole population waits at every perturbation (Tune's synch)")


class SearchConfig(_Section):
    metric: str = Field(
        "val_iou", description="what ranks trials and checkpoints; val_iou@worst (val_f1@worst): the worst val "
        "group's, on a dataset sharded with --group-by"
    )
    mode: Literal["min", "max"] = "max"
    select: Select = Field(
        "best", description="which score stands for a trial: best (its best epoch), last (its last epoch), "
        "mean_last (the mean of its last last_k epochs); its checkpoint: the best epoch's for best, else the last epoch's"
    )
    last_k: int = Field(3, ge=1, description="mean_last: how many of a trial's last epochs are averaged (all it has, when fewer)")
    num_samples: int = Field(1, ge=1)
    algorithm: Literal["random", "optuna"] = Field(
        "random", description="random (with grid) sampling, or Optuna's TPE (pip install 'raytrain[optuna]')"
    )
    max_concurrent_trials: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(
        None, gt=0, description="wall-clock seconds after which the search stops every trial still running "
        "(Tune's time_budget_s); the checkpoints kept so far stand"
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    space: dict[str, dict[SearchKind, list[Any]]] = Field(
        default_factory=dict,
        description="dotted config key -> {choice|grid: [values]} or {uniform|loguniform|randint: [low, high]}",
    )

    @field_validator("space")
    @classmethod
    def _one_kind_per_key(cls, space: dict) -> dict:
        for key, spec in space.items():
            if len(spec) != 1:
                raise ValueError(f"{key}: give exactly one of choice, grid, uniform, loguniform, randint")
            (kind, values), = spec.items()
            if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"{key}: {kind} takes [low, high]")
            if not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
        return space

    @model_validator(mode="after")
    def _grid_needs_random(self) -> "SearchConfig":
        grids = [key for key, spec in self.space.items() if "grid" in spec]
        if grids and self.algorithm != "random":
            raise ValueError(f"space.{grids[0]}: grid works with algorithm random only; use choice with {self.algorithm}")
        if self.scheduler.name == "pbt":
            if self.algorithm != "random":
                raise ValueError(f"scheduler.name pbt samples its own values: use algorithm random, not {self.algorithm}")
            if self.max_concurrent_trials is not None:
                raise ValueError(
                    "max_concurrent_trials: pbt trains its whole population together (trials wait for resources "
                    "and take turns); leave it unset"
                )
            for key in self.scheduler.mutate or []:
                if key not in self.space:
                    raise ValueError(f"scheduler.mutate: {key} is not a key of search.space")
                if not _mutable(key):
                    raise ValueError(f"scheduler.mutate: {key} cannot change within a trial (the weights depend on it)")
            if not self.pbt_mutations:
                raise ValueError("scheduler.name pbt needs a searched key it can change, such as optim.lr, in search.space")
        return self

    @property
    def num_trials(self) -> int:
        """num_samples of every grid combination."""
        return self.num_samples * math.prod(len(spec["grid"]) for spec in self.space.values() if "grid" in spec)

    @property
    def pbt_mutations(self) -> list[str]:
        """The searched keys PBT changes when a trial copies a better one; the rest come along unchanged."""
        if self.scheduler.mutate is not None:
            return self.scheduler.mutate
        return [key for key in self.space if _mutable(key)]


def _mutable(key: str) -> bool:
    """A trial continues from another's weights and optimiser state: the architecture and the
    optimiser type must stay what that state was made with."""
    return not key.startswith("model.") and key != "optim.name"


class Config(_Section):
    name: str = Field("raytrain", pattern=r"^[A-Za-z0-9_.-]+$", description="run or experiment name")
    classes: list[str] = Field(["road"], min_length=1, description="class names; ['road'] is binary road")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()

    @property
    def num_classes(self) -> int:
        """Output channels: one (sigmoid) for a single class, else one per class (softmax)."""
        return 1 if len(self.classes) == 1 else len(self.classes)

    @model_validator(mode="after")
    def _grace_within_epochs(self) -> "Config":
        scheduler = self.search.scheduler
        if scheduler.name in ("asha", "hyperband") and scheduler.grace_period > self.train.epochs:
            raise ValueError(
                f"search.scheduler.grace_period {scheduler.grace_period} is more than train.epochs {self.train.epochs}: "
                "no trial could be stopped early; lower grace_period or use scheduler fifo"
            )
        return self

    @model_validator(mode="after")
    def _space_keys_exist(self) -> "Config":
        for key in self.search.space:
            if key.startswith("search."):
                raise ValueError(f"search.space.{key}: the search settings themselves cannot be searched")
            try:
                _check_dotted_key(self.model_dump(), key)
            except ValueError:
                raise ValueError(f"search.space.{key}: unknown key") from None
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        """A new validated config with dotted keys replaced ({"optim.lr": 1e-3})."""
        data = self.model_dump()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return _validate(data, source="overrides")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_dotted_key(data: dict, key: str) -> None:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"unknown key {key!r}")
        node = node[part]


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = node[part]
    # New keys are allowed here only so that pydantic reports them as unknown with the full path.
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=3")
    try:
        value = yaml_value(raw)
    except ValueError as err:
        raise ConfigError(f"--set {text!r}: {err}") from None
    return key.strip(), value


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "value_error":
        msg = str(first["ctx"]["error"])  # our validators' own words, without pydantic's "Value error, "
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    where = f"{loc}: " if loc else ""  # a whole-config validator has no location: its message names the key
    return f"{source}: {where}{msg}{more}"


def _validate(data: Any, source: str) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def shipped_configs() -> dict[str, resources.abc.Traversable]:
    """The configs that ship inside the package, by name (file name without .yaml)."""
    folder = resources.files("raytrain") / "tune_configs"
    return {entry.name.removesuffix(".yaml"): entry for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def config_file(source: str | os.PathLike):
    """A config's file: the path itself when there is one (not a folder), else the shipped config
    of that name. What the path is (a FIFO, a device) is the reader's to refuse, in words."""
    path = Path(source).expanduser()
    try:
        if path.exists() and not path.is_dir():
            return path
    except OSError as err:  # a folder on the way that cannot be searched
        raise ConfigError(f"{source}: cannot read it ({err.strerror or err})") from None
    shipped = shipped_configs()
    name = os.fspath(source).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"{source}: config file not found, nor a config shipped with raytrain ({', '.join(shipped)})")


def load_config(source: str | os.PathLike | dict | Config, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """A config from a YAML path, a dict or a Config, with dotted overrides applied.

    Relative `data.path` and `train.storage_path` in a YAML file are taken relative to the current
    directory, as a user typing a command expects.
    """
    if isinstance(source, Config):
        config, name = source, "config"
    elif isinstance(source, dict):
        config, name = _validate(copy.deepcopy(source), "config"), "config"
    else:
        path = config_file(source)
        name = str(source)
        config = _validate(load_yaml_file(path), name)
    if overrides:
        if isinstance(overrides, list):
            overrides = dict(parse_override(o) for o in overrides)
        data = config.model_dump()
        try:
            for key, value in overrides.items():
                _set_dotted(data, key, value)
        except ConfigError as err:
            raise ConfigError(f"{name}: --set {err}") from None
        config = _validate(data, f"{name} with --set {', '.join(overrides)}")
    _check_search_space(config, name)
    return config


def _check_search_space(config: Config, source: str) -> None:
    """Every value a search can pick must make a valid config: fail now, not in trial 37."""
    for key, spec in config.search.space.items():
        (kind, values), = spec.items()
        for value in values:
            try:
                config.with_overrides({key: value})
            except ConfigError as err:
                reason = str(err).split(": ", 2)[-1]
                raise ConfigError(f"{source}: search.space.{key}: {kind} value {value!r}: {reason}") from None
