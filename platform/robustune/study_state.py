"""A study's definition and its state, as typed objects: what `robustune study` writes to <study>/study.json
after every step (so it resumes), and what the leaderboard reads. No running code lives here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from robustune.config import apply_override, merge
from robustune.storage import Location, location, output_root, write_atomic

FIRST_SEED = "first_seed"  # evaluation.checks: gradient-masking checks on each defense's first seed's model only

STUDY_FILE = "study.json"
DEFINITION_FILE = "study.yaml"


@dataclass
class Entry:
    """One defense of a study definition."""

    defense: str
    label: str
    tune: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # nested run settings for this entry
    space: str | None = None
    search: dict[str, Any] = field(default_factory=dict)  # SearchSettings fields
    budget: str | None = None
    init_from: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label).strip("-").lower()


@dataclass
class Study:
    """A validated study definition."""

    name: str
    description: str
    source: str
    base: dict[str, Any]  # the run config every entry starts from
    seeds: list[int]
    evaluation: dict[str, Any]
    entries: list[Entry]
    featured: str | None = None
    max_concurrent: int | None = None

    def entry(self, label: str) -> Entry:
        return next(e for e in self.entries if e.label == label)

    def run_config(self, entry: Entry, seed: int) -> dict[str, Any]:
        data = merge(self.base, entry.overrides)
        data = apply_override(data, ["method", "name"], entry.defense)
        return apply_override(data, ["seed"], seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Study:
        return cls(**{**data, "entries": [Entry(**e) for e in data["entries"]]})


@dataclass
class RunRecord:
    """One final run (a defense at one seed): its folder, how training ended, its test evaluation."""

    label: str
    defense: str
    seed: int
    run_dir: str
    run_id: str | None = None
    training: dict[str, Any] | None = None  # the run's report.json
    evaluation: dict[str, Any] | None = None  # the protocol's report
    evaluation_file: str | None = None
    evaluation_s: float | None = None  # wall seconds of the evaluation
    evaluation_slots: int | None = None  # workers' shares it held (None: it ran in the driver, on every slot)
    failed: bool = False

    @property
    def key(self) -> str:
        return f"{self.label}|{self.seed}"


@dataclass
class SearchRecord:
    search_dir: str
    parent_run_id: str
    best_params: dict[str, Any]
    budget_s: float | None
    trials: int
    # When the winner's refits fell short of its trial, the next-best config was refitted too (study.py,
    # `_refit_next_best_if_short`): its trial id, knobs and trial's validation PGD, both refits' mean validation
    # PGD, which one the entry kept, and the other one's training compute (worker-seconds, still spent).
    next_best: dict[str, Any] | None = None
    refit_checked: bool = False  # the refits were compared with their trial (the final runs are settled)

    @property
    def final_params(self) -> dict[str, Any]:
        """The knobs of the entry's final runs: the winner's, or the next-best's when its refits did better."""
        return self.next_best["params"] if self.next_best and self.next_best["kept"] else self.best_params


@dataclass
class StudyState:
    """Everything a study knows about itself; `save()` after every step."""

    path: Location  # the study folder (a local or shared path, or an object-store location)
    instance: str
    study: Study
    parent_run_id: str
    tracking_uri: str
    output_dir: str
    started: float
    slots: int = 1  # runs at once
    wall_s: float = 0.0  # wall time of every invocation (a resumed study adds to it)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    searches: dict[str, SearchRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Location) -> StudyState:
        path = location(path)
        data = json.loads((path / STUDY_FILE).read_text())
        return cls(path=path, instance=data["instance"], study=Study.from_dict(data["study"]),
                   parent_run_id=data["parent_run_id"], tracking_uri=data["tracking_uri"],
                   output_dir=data["output_dir"], started=data["started"], slots=data.get("slots", 1),
                   wall_s=data.get("wall_s", 0.0),
                   runs={k: RunRecord(**v) for k, v in data.get("runs", {}).items()},
                   searches={k: SearchRecord(**v) for k, v in data.get("searches", {}).items()})

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        write_atomic(self.path / STUDY_FILE, json.dumps(data, indent=2, default=str).encode())

    def runs_of(self, label: str) -> list[RunRecord]:
        return [r for r in self.runs.values() if r.label == label]


def is_study_dir(path: str | Location) -> bool:
    return (location(path) / STUDY_FILE).is_file()


def find_study_dir(name_or_dir: str | None, output_dir: str | None = None) -> Location:
    """A study folder given as a path, as a study instance or study name (the newest), or the newest of all."""
    from robustune.config import ConfigError

    if name_or_dir and is_study_dir(name_or_dir):
        return location(name_or_dir).resolve()
    root = output_root(output_dir)
    states = sorted((StudyState.load(p.parent) for p in root.glob(f"study-*/{STUDY_FILE}")),
                    key=lambda s: s.started)
    if name_or_dir:
        states = [s for s in states if s.path.name == name_or_dir or s.study.name == name_or_dir]
    if not states:
        what = f"named {name_or_dir!r} " if name_or_dir else ""
        raise ConfigError(f"no study {what}under {root}: pass a study folder "
                          "(printed by `robustune study`) or run `robustune study` first")
    return states[-1].path.resolve()
