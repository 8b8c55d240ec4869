"""Checkpoint files: state dicts only, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import errno
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from robustune.storage import Location, ObjectPath, location

CHECKPOINT_FORMAT = "robustune-checkpoint/1"
STATE_FILE = "state.pt"  # inside each Ray Train checkpoint folder


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not what the caller needs; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, no permission); any previous file at the path is intact."""


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, quota exceeded, file size limit


def os_error_in(error: BaseException, errnos: set[int] | None = None) -> OSError | None:
    """The first OSError (with one of `errnos`, if given) in `error`'s chain of causes and contexts."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and (errnos is None or seen.errno in errnos):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full_cause(error: BaseException) -> OSError | None:
    """The OSError saying the disk (or quota, or file size limit) is full, anywhere in `error`'s chain."""
    return os_error_in(error, DISK_FULL_ERRNOS)


def write_failure_message(path: str | Path, error: OSError) -> str:
    """One line: which checkpoint could not be written, why, and what to do."""
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL_ERRNOS:
        what = ("the file exceeds the file size limit" if error.errno == errno.EFBIG else "the disk is full")
        return (f"cannot write checkpoint {path}: {what} ({reason}); free space on the file system holding "
                f"{location(path).parent} or point tracking.output_dir elsewhere, then continue with --resume "
                "(the previous checkpoint is intact)")
    return f"cannot write checkpoint {path}: {reason}"


def save_checkpoint(state: dict[str, Any], path: str | Location) -> Location:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a crash or a full disk
    mid-write leaves any previous file at `path` intact and no temporary file behind. A failed write raises
    CheckpointWriteError naming the path (and saying so when the disk is full). In an object store: one PUT."""
    path = location(path)
    if isinstance(path, ObjectPath):
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
        try:
            path.write_bytes(buffer.getvalue())
        except OSError as error:
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {str(error).strip()[:300]}") from error
        return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a Python file object: a failed write surfaces as OSError(ENOSPC, ...), not torch's opaque
        # "unexpected pos" RuntimeError from its own file writer.
        with open(tmp, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as error:
        # torch's zip writer turns the OSError into a RuntimeError ("unexpected pos") on its way out.
        cause = disk_full_cause(error) or os_error_in(error)
        if cause is None:
            raise
        raise CheckpointWriteError(write_failure_message(path, cause)) from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Location, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a robustune checkpoint (a state file, or a folder holding one) without executing pickled code."""
    path = location(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        source = io.BytesIO(path.read_bytes()) if isinstance(path, ObjectPath) else path
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # garbage bytes can fail torch's unpickler in any way (IndexError, KeyError, ...)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first_line = first_line.split(". ")[0]  # torch goes on with several sentences of advice
        if not isinstance(error, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError)):
            first_line = f"{type(error).__name__}: {first_line}"
        raise CheckpointError(f"checkpoint {path} cannot be loaded (truncated, corrupted, or not a "
                              f"weights-only robustune checkpoint): {first_line}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a robustune checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def set_aside_unreadable_checkpoints(run_dir: str | Location, warn: Callable[[str], None]) -> Location | None:
    """Before a resume: the newest checkpoint folder (epoch_NNN) of `run_dir` that loads. In newer ones that do
    not (truncated, overwritten) the state file is renamed to state.pt.unreadable[-k], with a warning naming it,
    so nothing resumes from it and nothing overwrites it (the folder stays: Ray Train's run snapshot refers to
    it). Raises CheckpointError naming every bad file, and renames nothing, when no checkpoint loads; returns
    None when the run has no checkpoint yet."""
    run_dir = location(run_dir)
    folders = checkpoint_folders(run_dir)[::-1]
    bad: list[tuple[Location, CheckpointError]] = []
    for folder in folders:
        try:
            load_checkpoint(folder)
        except CheckpointError as error:
            bad.append((folder / STATE_FILE, error))
            continue
        for bad_file, error in bad:
            aside, count = bad_file.with_name(f"{STATE_FILE}.unreadable"), 1
            while aside.exists():
                count += 1
                aside = bad_file.with_name(f"{STATE_FILE}.unreadable-{count}")
            bad_file.rename(aside)
            warn(f"warning: {error}; moved it aside to {aside} and resuming from {folder} instead")
        return folder
    if bad:
        files = ", ".join(str(bad_file) for bad_file, _ in bad)
        raise CheckpointError(f"no checkpoint of {run_dir} loads: {files} cannot be loaded (truncated or "
                              "corrupted), so the run cannot continue; start a new one with the same settings: "
                              f"robustune train METHOD --config {run_dir / 'config.yaml'} --set tracking.run_name=NEW")
    return None


def checkpoint_folders(run_dir: str | Location) -> list[Location]:
    """A run folder's checkpoint folders (epoch_NNN) that hold a state file, oldest first."""
    return sorted(p for p in location(run_dir).glob("epoch_*") if (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | Location) -> Location | None:
    """The newest Ray Train checkpoint folder (epoch_NNN) of a run folder, or None if it has none yet."""
    folders = checkpoint_folders(run_dir)
    return folders[-1] if folders else None


def model_weights_from(path: str | Location) -> dict[str, Any]:
    """Model weights from a checkpoint file, a checkpoint folder, or a run folder (its latest checkpoint)."""
    path = location(path)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no robustune checkpoint (no {STATE_FILE}, no epoch_*/ folders)")
        path = newest
    state = load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    return state["model"]


def check_weights_fit(weights: Any, expected: dict[str, Any], source: Any, model_name: str) -> None:
    """CheckpointError naming `source` and the mismatching keys when `weights` (a state dict from a checkpoint)
    cannot load into a model whose state dict is `expected` (before torch's long load_state_dict error)."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {source}: its model weights are a {type(weights).__name__}, "
                              "not a state dict")

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")

    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{key} {tuple(getattr(weights[key], 'shape', ()))} vs {tuple(expected[key].shape)} expected"
              for key in sorted(set(weights) & set(expected))
              if tuple(getattr(weights[key], "shape", ())) != tuple(expected[key].shape)]
    problems = ([f"missing keys: {few(missing)}"] if missing else []) + \
               ([f"unexpected keys: {few(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch: {few(shapes)}"] if shapes else [])
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit model {model_name!r} ({'; '.join(problems)}); "
                              f"it was saved from another model or model settings: pass a checkpoint of this "
                              f"model, or set model.* to the checkpoint's model")
