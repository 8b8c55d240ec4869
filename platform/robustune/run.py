"""One training run's lifecycle: its folder and files, create / open / resume, and "the model and defense of
this run". Training, search trials, study runs, `robustune evaluate` and EAE's calibration all go through it.

    <tracking.output_dir>/<run name>/   (a local or shared folder, or an object-store prefix: robustune.storage)
        run.json              MLflow run id, tracking URI, run name (what --resume needs)
        config.yaml           the resolved config (with the real tracking URI: --resume needs it)
        epoch_NNN/state.pt    the two newest checkpoints (model, optimizer, defense, history, best weights)
        final.pt              the selected weights, the defense's state and the shared config (+ evaluation)
        report.json           how training ended (+ the evaluation when it ran): written last
        mlflow_outbox.jsonl   tracking writes that waited for an unreachable server (`robustune sync`)
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from torch import nn

from robustune import tracking
from robustune.checkpoints import (STATE_FILE, CheckpointError, check_weights_fit, latest_checkpoint,
                                   load_checkpoint, model_weights_from, set_aside_unreadable_checkpoints)
from robustune.config import Config, ConfigError
from robustune.resolve import resolve_config
from robustune.defense import Defense
from robustune.loop import build_model, build_setup, load_weights
from robustune.storage import Location, location, output_root, write_atomic

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"
FINAL_MODEL_FILE = "final.pt"


def new_run_name(config: Config) -> str:
    return f"{config.method_name}-{config.data.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class Run:
    """A run folder (in the storage: a local path or an object-store location) and its MLflow run."""

    path: Location
    config: Config
    run_id: str

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.tracking_uri

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------------ create / open
    @staticmethod
    def exists(path: str | Location) -> bool:
        return (location(path) / RUN_FILE).is_file()

    @classmethod
    def create(cls, config: Config, *, extra_tags: dict[str, str] | None = None,
               parent_run_id: str | None = None, display_name: str | None = None) -> Run:
        """Fix the places (absolute tracking URI and output folder), create the MLflow run and the run folder.
        `display_name`: the run's name in the MLflow UI (default: its folder name, the run name)."""
        config.tracking.tracking_uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
        root = output_root(config.tracking.output_dir)
        config.tracking.output_dir = str(root)
        run_name = config.tracking.run_name or new_run_name(config)
        path = root / run_name
        # A folder with nothing but a config is what a process killed while creating this run left: take it over.
        if path.exists() and {p.name for p in path.iterdir()
                              if not p.name.startswith(f".{RUN_FILE}.tmp")} - {CONFIG_FILE}:
            raise ConfigError(f"run folder {path} already exists; choose another tracking.run_name, "
                              f"or continue it with --resume {path}")
        config.tracking.run_name = run_name
        run_id = tracking.create_run(config, run_name, extra_tags=extra_tags, parent_run_id=parent_run_id,
                                     run_folder=str(path), display_name=display_name)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        # run.json last, whole or not at all: it is what makes the folder a run.
        write_atomic(path / RUN_FILE, json.dumps({"run_id": run_id, "tracking_uri": config.tracking.tracking_uri,
                                                  "run_name": run_name}).encode())
        return cls(path, config, run_id)

    @classmethod
    def open(cls, path: str | Location) -> Run:
        """The config and MLflow run of an existing run folder (for --resume)."""
        path = location(path).resolve()
        if not (path / RUN_FILE).is_file() or not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {path}: not a robustune run folder (no {RUN_FILE} / {CONFIG_FILE}); "
                              "pass the folder `robustune train` printed at its start")
        config = resolve_config(yaml.safe_load((path / CONFIG_FILE).read_text()))
        return cls(path, config, json.loads((path / RUN_FILE).read_text())["run_id"])

    def prepare_resume(self, log: Callable[[str], None]) -> None:
        """Before a resumed run trains again: set aside unreadable newest checkpoints (with a warning), check
        the weights it will load, and send the tracking records that waited in its outbox."""
        set_aside_unreadable_checkpoints(self.path, log)
        check_weights_sources(self.config, self.path)
        tracking.check_server(self.tracking_uri)
        tracking.use_outbox(self.run_id, self.path)
        if tracking.read_outbox(self.path):  # records kept while the server was away go first
            log(f"sent {tracking.replay_outbox(self.path)} MLflow records queued in {tracking.outbox_path(self.path)}")

    # ------------------------------------------------------------------------------------ files
    @property
    def report_path(self) -> Location:
        return self.path / REPORT_FILE

    @property
    def final_model_path(self) -> Location:
        return self.path / FINAL_MODEL_FILE

    @property
    def finished(self) -> bool:
        """Training ended and its report was written (the last thing a run writes)."""
        return finished_report(self.path) is not None

    def report(self) -> dict[str, Any]:
        return json.loads(self.report_path.read_text())

    def write_report(self, report: dict[str, Any]) -> None:
        write_atomic(self.report_path, json.dumps(report, indent=2).encode())

    def latest_checkpoint(self) -> Location | None:
        return latest_checkpoint(self.path)


def finished_report(path: str | Location) -> dict[str, Any] | None:
    """The report of a finished run folder, or None while it has none (not started, running, failed)."""
    report = location(path) / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else None


def train_seconds_spent(path: str | Location) -> float:
    """Seconds inside training epochs of a run folder: its report's, or for a run that failed (no report) its newest
    checkpoint's running total (the epoch it failed in is lost), or 0 when it saved none (or it does not load)."""
    report = finished_report(path)
    if report is not None:
        return float(report["train_seconds"])
    newest = latest_checkpoint(path)
    if newest is None:
        return 0.0
    try:
        return float(load_checkpoint(newest).get("total_seconds", 0.0))
    except CheckpointError:
        return 0.0


def run_id_of(path: str | Location) -> str | None:
    """The MLflow run id of a run folder, or None when it has not been created yet."""
    run_file = location(path) / RUN_FILE
    return json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None


# ------------------------------------------------------------------------------- the model of a run
def check_weights_sources(config: Config, run_dir: Location | None = None) -> None:
    """Before any work: the warm-start weights (train.init_from) and, for a resume, the run's newest checkpoint
    must load safely and fit the configured model (CheckpointError naming the file and the keys otherwise)."""
    sources = [config.train.init_from] if config.train.init_from else []
    newest = latest_checkpoint(run_dir) if run_dir is not None else None
    if newest is not None:
        sources.append(newest / STATE_FILE)
    if not sources:
        return
    expected = build_model(config).state_dict()
    for source in sources:
        check_weights_fit(model_weights_from(source), expected, source, config.model_name)


@dataclass
class TrainedModel:
    """A finished run's model and defense (with its state), rebuilt from a checkpoint, ready to evaluate."""

    config: Config
    model: nn.Module
    defense: Defense
    splits: Any  # the run's data (DataSplits: train, val, test)
    checkpoint: Location
    device: torch.device


def load_trained(checkpoint: str | Location, overrides: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 device: torch.device | str | None = None) -> TrainedModel:
    """The model and defense of a run from its final.pt, a checkpoint folder (epoch_NNN) or a run folder (its
    final.pt, else its newest checkpoint). The config is the one saved with the weights; `overrides` may
    change it (a data folder on this machine, say). The weights come from the checkpoint, not train.init_from.
    `device` None: a GPU when the run trained on one and this machine has one, else the CPU."""
    path = location(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    defense_state = None
    if path.is_dir() and (path / CONFIG_FILE).is_file():  # a run folder: its final weights, else its newest
        config_data = yaml.safe_load((path / CONFIG_FILE).read_text())
        source = path / FINAL_MODEL_FILE if (path / FINAL_MODEL_FILE).is_file() else latest_checkpoint(path)
        if source is None:
            raise CheckpointError(f"{path} holds no {FINAL_MODEL_FILE} and no checkpoint yet")
        state = load_checkpoint(source)
    else:
        source, state = path, load_checkpoint(path)
        config_data = state.get("config")
    if "model" not in state:
        raise CheckpointError(f"checkpoint {source} holds no model weights")
    if not isinstance(config_data, dict):
        raise CheckpointError(f"checkpoint {source} holds no run config; pass a final.pt, a checkpoint folder "
                              "or a run folder written by `robustune train`")
    defense_state = state.get("defense")
    config_data = dict(config_data)
    config_data["train"] = {**config_data.get("train", {}), "init_from": None}
    if overrides is not None:
        config_data = overrides(config_data)
    config = resolve_config(config_data)
    if device is None:
        device = "cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    # The defense set up as in training, minus the one-time work its saved state holds (init_from is gone).
    setup = build_setup(config, rank=0, world_size=1, device=device, restoring=bool(defense_state), training=False)
    load_weights(setup.model, state["model"], source, config.model_name)
    if defense_state:
        setup.defense.load_state_dict(defense_state)
    setup.model.eval()
    return TrainedModel(config, setup.model, setup.defense, setup.splits, location(source), device)
