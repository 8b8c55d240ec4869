"""Checkpoint files: state dicts only, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "robustune-checkpoint/1"
STATE_FILE = "state.pt"  # inside each Ray Train checkpoint folder


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not what the caller needs; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash or a full disk mid-write leaves
    any previous file at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a robustune checkpoint (a state file, or a folder holding one) without executing pickled code."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded (truncated, corrupted, or not a "
                              f"weights-only robustune checkpoint): {first_line}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a robustune checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest Ray Train checkpoint folder (epoch_NNN) of a run folder, or None if it has none yet."""
    folders = sorted(p for p in Path(run_dir).glob("epoch_*") if (p / STATE_FILE).is_file())
    return folders[-1] if folders else None


def model_weights_from(path: str | Path) -> dict[str, Any]:
    """Model weights from a checkpoint file, a checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no robustune checkpoint (no {STATE_FILE}, no epoch_*/ folders)")
        path = newest
    state = load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    return state["model"]
