"""Config resolution: a nested dict (defaults <- YAML files <- --set overrides) validated into a `Config`,
with the dataset-dependent defaults filled in (epsilon, model) and the defense's own fields checked and stored
back resolved, so the resolved config alone reproduces the run. It checks names and arguments; it builds
nothing (the run builds its model, before any work).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from robustune.config import Config, ConfigError, build_dataclass, merge, raw_config
from robustune.data import DataError, dataset_info
from robustune.defense import create_defense, defense_class
from robustune.models import ModelError, check_model_arguments, default_model_for


def resolve_config(data: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config: types, ranges, the defense's own fields, dataset and model names.

    Fills the dataset-dependent defaults (epsilon, model) so the resolved config reproduces the run alone.
    """
    data = dict(data)
    for section, default in (("method", {"name": "fgsm_rs"}), ("model", {"name": "auto"})):
        value = data.get(section, default)
        if isinstance(value, str):  # `method: pgd` is short for `method: {name: pgd}`
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a name or a mapping with 'name', got {value!r}")
        data[section] = merge(default, value)
    # The defense's own training settings where the config leaves them unset (a malformed `train` is left for
    # build_dataclass to name).
    name = data["method"].get("name")
    own_train = defense_class(name).train_defaults if isinstance(name, str) else {}
    if own_train and isinstance(data.get("train", {}), dict):
        data["train"] = {**own_train, **data.get("train", {})}
    config = build_dataclass(Config, data, "")

    try:
        info = dataset_info(config.data.name)
    except DataError as error:
        raise ConfigError(f"data.name: {error}") from error
    if config.epsilon is None:
        config.epsilon = info.default_epsilon
    if not 0.0 <= config.epsilon <= 1.0:
        raise ConfigError(f"epsilon must be in [0, 1] (inputs live in [0, 1]), got {config.epsilon}")

    # The defense validates its own fields; store them back resolved (defaults filled) for reproducibility.
    defense = create_defense(config.method_name, config.method_params)
    config.method = {"name": config.method_name, **dataclasses.asdict(defense)}

    if config.model_name == "auto":
        config.model["name"] = default_model_for(info.input_shape)
    try:  # name, arguments and input shape, on the meta device: no weights are built here
        check_model_arguments(config.model_name, config.model_kwargs, num_classes=info.num_classes,
                              input_shape=info.input_shape, mean=info.mean, std=info.std)
    except ModelError as error:
        raise ConfigError(f"model: {error}") from error
    return config


def load_config(method: str | None = None, config_files: list[str] | None = None,
                overrides: list[str] | None = None) -> Config:
    return resolve_config(raw_config(method, config_files, overrides))
