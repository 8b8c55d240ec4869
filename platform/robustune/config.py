"""Run configuration: typed sections, YAML + `--set a.b=c` overrides, validated once with errors naming the key.

A configuration is plain data: this module is its schema (typed sections, coercion, YAML files, overrides)
and imports nothing else of robustune. `robustune.resolve.resolve_config` turns a nested dict into a `Config`,
checking every value, the defense's fields and the dataset and model names; anything wrong raises
`ConfigError` naming the dotted key, before any data is loaded or any Ray worker starts. The `method` and
`model` sections carry the chosen name plus free keys that the defense (a dataclass in methods/) or the model
registry validates.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names it and says what is valid."""


# ----------------------------------------------------------------------------------------------- values
def parse_number(value: Any, key: str) -> float:
    """A float from a number or a fraction string such as '8/255' (how epsilons are usually written)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}: expected a number such as 0.1 or 8/255, got {value!r}")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation (the subset configs use) and convert it; ConfigError if wrong."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: a value is required, got null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of: " + "; ".join(errors))
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is float:
        result = parse_number(value, key)
        if result != result or result in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return result
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {annotation!r}")


def build_dataclass(cls: type, data: dict[str, Any] | None, key: str) -> Any:
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys and coercing every field by its type."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        sub_key = f"{key}.{name}" if key else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = build_dataclass(annotation, value, sub_key)
        else:
            values[name] = coerce(value, annotation, sub_key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from error


# --------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    data_dir: Optional[str] = None  # None: ROBUSTUNE_DATA_DIR, then the dataset's standard places
    val_size: int = 5000  # held out from the training split for validation, early stopping and search
    train_subset: Optional[int] = None  # use only this many training examples (quick runs)
    test_subset: Optional[int] = None
    augment: Optional[bool] = None  # None: the dataset's default (pad-crop + flip on CIFAR)
    download: bool = False  # CIFAR only, through torchvision when it is importable

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0, got {self.val_size}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{name} must be a positive number of examples, got {value}")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate of the schedule
    schedule: Literal["cyclic", "multistep", "cosine", "constant"] = "cyclic"
    lr_peak_fraction: float = 0.4  # cyclic: where the triangle peaks, as a fraction of training (fast-AT: 2/5)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep: fractions of training
    lr_decay: float = 0.1  # multistep: factor at each milestone
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: Optional[float] = None  # max global gradient norm; None = off
    init_from: Optional[str] = None  # warm start: model weights from a robustune checkpoint file or run folder
    keep_best: bool = True  # final weights = the epoch with the best select_metric
    # The validation metric that picks the kept epoch: robustness for a defense; standard training (the
    # clean-accuracy reference) sets val/clean_acc in its train_defaults.
    select_metric: Literal["val/pgd_acc", "val/clean_acc"] = "val/pgd_acc"
    early_stop_on_overfit: bool = False  # stop when the overfitting alarm fires (weights of the best epoch kept)
    overfit_drop: float = 0.2  # alarm when the overfit metric falls this much below its best so far
    overfit_metric: str = "val/pgd_acc"  # any per-epoch metric, e.g. a defense's own robustness estimate

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 < self.lr_peak_fraction < 1.0:
            raise ConfigError(f"train.lr_peak_fraction must be in (0, 1), got {self.lr_peak_fraction}")
        if any(not 0.0 < m < 1.0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"train.milestones must be increasing fractions in (0, 1), got {self.milestones}")
        if not 0.0 < self.overfit_drop <= 1.0:
            raise ConfigError(f"train.overfit_drop must be in (0, 1], got {self.overfit_drop}")


@dataclass
class ValidationConfig:
    """Per-epoch check on the held-out validation split (never the test split)."""

    examples: int = 1000  # validation examples attacked each epoch (a fixed, deterministic subset)
    pgd_steps: int = 10
    pgd_alpha_ratio: float = 0.25  # PGD step size in units of epsilon

    def __post_init__(self) -> None:
        if self.examples < 1 or self.pgd_steps < 1 or self.pgd_alpha_ratio <= 0:
            raise ConfigError("validation.examples and validation.pgd_steps must be >= 1 and "
                              f"validation.pgd_alpha_ratio > 0, got {self}")


@dataclass
class EvalConfig:
    """Final evaluation on the test split, by a fixed, versioned protocol (see robustune.evaluation).

    `quick` and `full` fix every attack setting, so numbers are comparable across runs and studies; the attack
    fields below apply only to `protocol: custom` (their defaults are quick's settings)."""

    enabled: bool = True  # search trials turn it off: a search never touches the test split
    protocol: Literal["quick", "full", "custom"] = "quick"
    points: int = 1000  # quick/custom: attacks run on N test examples from first_point (full: the whole test set)
    first_point: int = 0  # quick/custom: where the attacked slice starts (a study gives each seed its own slice)
    checks: bool = True  # gradient-masking checks (more steps, larger eps, unbounded, black-box vs white-box)
    workers: int = 1  # AutoAttack shards as Ray tasks (`robustune evaluate`; a study's evaluation runs in one task)
    batch_size: int = 500
    # custom protocol only:
    pgd_steps: int = 20
    pgd_restarts: int = 1
    pgd_alpha_ratio: float = 0.25  # PGD step size in units of epsilon
    cw_steps: int = 0  # PGD on the CW margin loss; 0 = not run
    autoattack: Literal["fast", "standard", "none"] = "fast"  # fast = APGD-CE + APGD-T

    CUSTOM_ONLY = ("pgd_steps", "pgd_restarts", "pgd_alpha_ratio", "cw_steps", "autoattack")

    def __post_init__(self) -> None:
        if self.pgd_steps < 1 or self.pgd_restarts < 1 or self.points < 1 or self.batch_size < 1 \
                or self.workers < 1 or self.cw_steps < 0 or self.first_point < 0:
            raise ConfigError(f"eval: steps, restarts, points, workers and batch size must be >= 1 "
                              f"(cw_steps and first_point >= 0), got {self}")
        if self.protocol == "full" and self.first_point:
            raise ConfigError(f"eval.first_point={self.first_point}: the full protocol attacks the whole test set; "
                              "a slice needs eval.protocol=quick or custom")
        if self.pgd_alpha_ratio <= 0:
            raise ConfigError(f"eval.pgd_alpha_ratio must be > 0, got {self.pgd_alpha_ratio}")
        if self.protocol != "custom":
            changed = [name for name in self.CUSTOM_ONLY
                       if getattr(self, name) != EvalConfig.__dataclass_fields__[name].default]
            if changed:
                raise ConfigError(f"eval.{changed[0]} only applies to eval.protocol=custom: the {self.protocol} "
                                  f"protocol fixes every attack setting (set eval.protocol=custom to choose)")


@dataclass
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers (data-parallel)
    use_gpu: bool = False
    cpus_per_worker: Optional[int] = None  # None: the machine's CPUs shared among the workers
    max_failures: int = 0  # Ray Train restarts the worker group from the last checkpoint this many times

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"resources.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ConfigError(f"resources.cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"resources.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")


@dataclass
class TrackingConfig:
    experiment: str = "robustune"
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    # Every run's files (and Ray Train / Tune storage), one folder per run: a local folder, a path every node
    # mounts, or an object store (s3://bucket/prefix, gs://bucket/prefix). None: $ROBUSTUNE_OUTPUT_DIR, else runs.
    output_dir: Optional[str] = None
    run_name: Optional[str] = None  # None: <method>-<dataset>-<timestamp>


@dataclass
class Config:
    method: dict[str, Any] = field(default_factory=lambda: {"name": "fgsm_rs"})  # name + the defense's fields
    model: dict[str, Any] = field(default_factory=lambda: {"name": "auto"})  # name + the model's kwargs
    epsilon: Optional[float] = None  # L-infinity radius in [0, 1]; None: the dataset's usual value
    seed: int = 0
    study: Optional[str] = None  # tag linking this run to a study
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def method_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ files, overrides
def load_yaml_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at the top, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=3' -> (['train', 'epochs'], 3); values are YAML scalars/lists ('8/255' stays a string)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in parts):
        raise ConfigError(f"--set {text!r}: expected key=value with a dotted key, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {error}") from error
    return parts, value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, everything else replaces."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return merge(data, nested)


def raw_config(method: str | None = None, config_files: list[str] | None = None,
               overrides: list[str] | None = None) -> dict[str, Any]:
    """The nested dict from defaults <- config files <- --set overrides <- the method named on the command line."""
    data: dict[str, Any] = {}
    for path in config_files or []:
        data = merge(data, load_yaml_file(path))
    for text in overrides or []:
        data = apply_override(data, *parse_override(text))
    if method is not None:
        data = apply_override(data, ["method", "name"], method)
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1} (MLflow params, Parquet columns)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
