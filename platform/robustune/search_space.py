"""Search spaces as data: `search_spaces/<defense>.yaml`, validated against the defense and the config.

A space maps dotted config keys (`method.<field>` of the defense, or a run setting such as `train.lr`) to
a distribution:

    method.alpha_ratio:          # step / epsilon
      type: uniform              # uniform | loguniform | int | choice
      low: 0.5
      high: 2.0
    method.update_every: {type: int, low: 5, high: 60, step: 5}
    method.prior: {type: choice, values: [batch, epoch, momentum]}

Every problem (unknown key, a key the defense does not have, an empty or inverted range, a value of the
wrong type) is a `ConfigError` naming the file, the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from robustune.config import Config, ConfigError
from robustune.storage import location

DISTRIBUTION_FIELDS = {
    "uniform": {"low", "high"},
    "loguniform": {"low", "high"},
    "int": {"low", "high", "step"},
    "choice": {"values"},
}


@dataclass(frozen=True)
class Distribution:
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    values: tuple[Any, ...] = ()

    def to_optuna(self):
        import optuna.distributions as od

        if self.type == "uniform":
            return od.FloatDistribution(self.low, self.high)
        if self.type == "loguniform":
            return od.FloatDistribution(self.low, self.high, log=True)
        if self.type == "int":
            return od.IntDistribution(self.low, self.high, step=self.step or 1)
        return od.CategoricalDistribution(list(self.values))

    def from_unit(self, u: float) -> Any:
        """The value at quantile-like position u in [0, 1] of the range: linear for uniform, on the log scale for
        loguniform, one of the equally likely values for int and choice (maps a unit-cube design to the space)."""
        u = min(max(float(u), 0.0), 1.0)
        if self.type in ("choice", "int"):
            values = self.values if self.type == "choice" else self._int_values()
            return values[min(int(u * len(values)), len(values) - 1)]
        return self._between(u)

    def grid(self, points: int) -> list[Any]:
        """Evenly spaced values (for grid-search baselines)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            values = self._int_values()
            stride = max(1, len(values) // points)
            return values[::stride][:points]
        if points == 1:
            return [(self.low + self.high) / 2]
        return [self._between(i / (points - 1)) for i in range(points)]

    def _int_values(self) -> list[int]:
        return list(range(int(self.low), int(self.high) + 1, self.step or 1))

    def _between(self, t: float) -> float:
        """The point at position t in [0, 1] of a uniform (linear) or loguniform (log scale) range."""
        if self.type == "loguniform":
            value = self.low * (self.high / self.low) ** t
        else:
            value = self.low + (self.high - self.low) * t
        return float(min(max(value, self.low), self.high))  # rounding must not step outside the range


def default_space_path(defense: str) -> Path:
    return Path(str(resources.files("robustune.search_spaces") / f"{defense}.yaml"))


def _config_key_exists(key: str, defense_fields: set[str]) -> bool:
    parts = key.split(".")
    if parts[0] == "method":
        return len(parts) == 2 and parts[1] in defense_fields
    if parts[0] == "model":
        return len(parts) == 2  # model kwargs are checked when the sampled config is resolved
    cls: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return not dataclasses.is_dataclass(cls)


def _number(value: Any, where: str, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def parse_space(data: Any, source: str, defense: str) -> dict[str, Distribution]:
    """Validate a loaded YAML mapping into distributions; `source` names the file in errors."""
    from robustune.defense import defense_class

    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space {source}: expected a non-empty mapping of config keys to distributions")
    fields = {f.name for f in dataclasses.fields(defense_class(defense))}
    space: dict[str, Distribution] = {}
    for key, spec in data.items():
        where = f"search space {source}, key {key!r}"
        if not isinstance(key, str) or not _config_key_exists(key, fields):
            hint = (f"defense {defense!r} has fields: {', '.join(sorted(fields)) or '(none)'}"
                    if str(key).startswith("method.") else "expected method.<field> or a run setting such as train.lr")
            raise ConfigError(f"{where}: not a knob of this run ({hint})")
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: expected a mapping with 'type' (one of {', '.join(DISTRIBUTION_FIELDS)})")
        kind = spec["type"]
        if kind not in DISTRIBUTION_FIELDS:
            raise ConfigError(f"{where}: unknown type {kind!r}; expected one of {', '.join(DISTRIBUTION_FIELDS)}")
        unknown = set(spec) - DISTRIBUTION_FIELDS[kind] - {"type"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} for type {kind!r}; "
                              f"expected {', '.join(sorted(DISTRIBUTION_FIELDS[kind]))}")
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: 'values' must be a non-empty list")
            space[key] = Distribution("choice", values=tuple(values))
            continue
        missing = {"low", "high"} - set(spec)
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(sorted(missing))}")
        integer = kind == "int"
        low, high = _number(spec["low"], where, integer), _number(spec["high"], where, integer)
        if low > high or (low == high and not integer):
            raise ConfigError(f"{where}: empty or inverted range low={low} high={high} (need low < high)")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        step = spec.get("step")
        if step is not None and (not integer or _number(step, where, True) < 1):
            raise ConfigError(f"{where}: 'step' must be an integer >= 1 (int type only), got {step!r}")
        space[key] = Distribution(kind, low, high, step)
    return space


def load_space(defense: str, path: str | Path | None = None) -> dict[str, Distribution]:
    """The defense's shipped space, or the file `path`."""
    path = location(path) if path else default_space_path(defense)
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist"
                          + ("" if path != default_space_path(defense) else
                             f"; defense {defense!r} ships no search space: pass --space FILE"))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"search space {path} is not valid YAML: {error}") from error
    return parse_space(data, str(path), defense)


def check_samples_resolve(space: dict[str, Distribution], base: dict[str, Any]) -> None:
    """Every extreme of every range must give a valid config (e.g. a ratio the defense refuses)."""
    from robustune.config import apply_override
    from robustune.resolve import resolve_config

    for key, dist in space.items():
        for value in (dist.values if dist.type == "choice" else (dist.low, dist.high)):
            try:
                resolve_config(apply_override(base, key.split("."), value))
            except ConfigError as error:
                raise ConfigError(f"search space key {key!r}: the value {value!r} makes an invalid run: {error}") from error


def space_filling_points(space: dict[str, Distribution], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` points spread over the whole space: a scrambled Sobol design (seeded) mapped through each knob's
    distribution. Why: a search on a few trials' budget is mostly its start-up points, and independent random
    points often leave a whole end of a range untried (3 random points miss the top quarter of a learning-rate
    range 42% of the time). The first 4 Sobol points put exactly one point in each quarter of every knob's
    range and, for 2 knobs, one in each quadrant of the pair."""
    from scipy.stats import qmc

    if count < 1 or not space:
        return []
    keys = list(space)
    # Sobol needs a power-of-2 count for its balance; take the first `count` of the next power of 2.
    design = qmc.Sobol(d=len(keys), scramble=True, seed=seed).random(1 << max(0, (count - 1).bit_length()))
    return [{key: space[key].from_unit(row[i]) for i, key in enumerate(keys)} for row in design[:count]]
