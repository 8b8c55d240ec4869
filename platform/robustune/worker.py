"""The one worker function that runs a run, on either path:

- in process (`LocalSession`): a one-worker run executes right in the Ray process scheduled for it (a reused
  Tune trial actor in a search or study, a Ray task for `robustune train`); checkpoints go straight to the
  run folder (the two newest are kept);
- data-parallel (`TrainSession`): each Ray Train worker of a TorchTrainer runs it; Ray Train persists the
  checkpoints into the run folder and restarts the worker group from them (resources.max_failures).

Per epoch, in this order: train + validate, checkpoint (in process; Ray Train persists it with the report),
log to MLflow (and the `diagnostic` tag once a training diagnostic fired: robustune.loop.diagnosis), report.
Nothing is reported before it is logged and checkpointed: Tune may end a trial right after any report. A run
without a final evaluation (search trials, study runs) also writes its final model and report and ends its
MLflow run FINISHED before its last report; a run with one (`robustune train`) evaluates after it, where
nothing stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from robustune import tracking
from robustune.checkpoints import (STATE_FILE, CheckpointError, CheckpointWriteError, checkpoint_folders,
                                   disk_full_cause, load_checkpoint, save_checkpoint, write_failure_message)
from robustune.resolve import resolve_config
from robustune.evaluation import evaluate_deployed, format_report
from robustune.loop import TrainingLoop, describe_diagnosis, diagnosis, format_epoch
from robustune.run import Run
from robustune.storage import Location, location, remove_tree

KEEP_CHECKPOINTS = 2
FIRST_EPOCH_AT = "timing/first_epoch_at"  # in Tune results only: when this process started its first epoch


def write_line(text: str) -> None:
    # Not print(): Ray Train patches print in workers and the driver would show every line twice.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ sessions
class LocalSession:
    """One worker in this process: rank 0 of 1. `forward` passes each reported epoch on (to Tune)."""

    rank, world_size = 0, 1
    execution = "in_process"

    def __init__(self, run_dir: Location, device: torch.device, forward: Callable[[dict[str, Any]], None] | None):
        self.run_dir, self.device, self.forward = run_dir, device, forward

    def restored_checkpoint(self):
        return None  # the run folder's own checkpoints are the record

    def save(self, state: dict[str, Any], epoch: int) -> None:
        folder = self.run_dir / f"epoch_{epoch:03d}"
        try:
            save_checkpoint(state, folder / STATE_FILE)
        except CheckpointWriteError:
            with contextlib.suppress(OSError):
                folder.rmdir()  # nothing half-written stays to be resumed from
            raise
        for old in sorted(self.run_dir.glob("epoch_*"))[:-KEEP_CHECKPOINTS]:
            remove_tree(old)

    def report(self, metrics: dict[str, Any]) -> None:
        if self.forward is not None:
            self.forward(metrics)


class TrainSession:
    """One Ray Train worker of a TorchTrainer; Ray Train copies rank 0's checkpoint into the run folder."""

    execution = "torch_trainer"

    def __init__(self, run_dir: Location, use_gpu: bool):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.run_dir = run_dir
        self.pending: tuple[dict[str, Any], int] | None = None
        if use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")

    def restored_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def save(self, state: dict[str, Any], epoch: int) -> None:
        self.pending = (state, epoch)  # Ray Train persists it with the report

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        if self.pending is None:
            ray.train.report(metrics)
        else:
            state, epoch = self.pending
            self.pending = None
            report_with_checkpoint(state, metrics, self.run_dir, f"epoch_{epoch:03d}")


def report_with_checkpoint(state: dict[str, Any], metrics: dict[str, Any], run_dir: Location, name: str) -> None:
    """Report an epoch to Ray Train with its checkpoint, which Ray copies to RUN_DIR/<name>. When the disk is
    full (here in the local temporary folder, or in the run folder during Ray's copy), the run fails with a
    message naming the file, and no partial checkpoint file stays behind to be resumed from."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(state, Path(folder) / STATE_FILE)
        try:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        except Exception as error:
            full = disk_full_cause(error)
            if full is None:
                raise
            # Ray's copy stopped half-way: remove the partial file. The folder goes too when nothing else is in
            # it (it can hold a state.pt.unreadable, and Ray's run snapshot may refer to it: then it stays).
            (run_dir / name / STATE_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (run_dir / name).rmdir()
            raise CheckpointWriteError(write_failure_message(run_dir / name / STATE_FILE, full)) from error


def newest_state(ray_checkpoint, resume_path: str | None, device: torch.device,
                 warn: Callable[[str], None] = write_line, run_dir: Location | None = None) -> tuple[dict | None, Any]:
    """The newest checkpoint that loads among Ray Train's restored checkpoint (after a worker failure, or a rerun
    of the same run), the folder named by --resume, and the run folder's own epoch_NNN folders.

    Ray's record lags the last report by up to one poll of its controller: a worker killed just after reporting
    epoch N comes back with epoch N-1's record while epoch N's folder is on disk, and resuming from the record
    would train epoch N again. (Every rank scans the same folder: Ray Train's storage is shared by all nodes,
    and nothing writes to it while the worker group starts.) A checkpoint that does not load (cut short by a
    kill during the copy, or set aside by --resume as unreadable) is skipped with a warning."""
    candidates = []
    if ray_checkpoint is not None:
        try:
            with ray_checkpoint.as_directory() as folder:
                candidates.append((load_checkpoint(Path(folder) / STATE_FILE, map_location=device),
                                   ray_checkpoint.path))
        except (CheckpointError, OSError) as error:
            warn(f"warning: not resuming from Ray Train's checkpoint record {ray_checkpoint.path}: {error}")
    paths = [location(resume_path)] if resume_path else []
    if run_dir is not None:
        paths += checkpoint_folders(run_dir)[::-1]
    # Ray's record is one of the run folder's checkpoint folders (Ray names it a path inside its filesystem).
    seen = {Path(ray_checkpoint.path).name if ray_checkpoint is not None else None}
    for path in paths:
        if path.name in seen:
            continue
        seen.add(path.name)
        try:
            candidates.append((load_checkpoint(path, map_location=device), path))
        except CheckpointError as error:
            warn(f"warning: not resuming from {path}: {error}")
    if not candidates:
        return None, None
    return max(candidates, key=lambda pair: pair[0]["epoch"])


DIAGNOSTIC_TAG = "diagnostic"  # what fired, with epochs: "collapsed@3; label_leak@1-3; overfit@2"


def tag_diagnosis(uri: str, run_id: str, history: list[dict[str, float]], previous: str | None) -> str:
    """Set the run's `diagnostic` tag from its history when it changes; returns the text. A run that was
    collapsed and learned again gets "none" (the tag cannot be removed through the outbox)."""
    text = describe_diagnosis(diagnosis(history))
    if text != (previous or "") and (text or previous):
        tracking.set_tag(uri, run_id, DIAGNOSTIC_TAG, text or "none")
    return text


def log_new_epochs(uri: str, run_id: str, records: list[dict[str, float]]) -> None:
    """Log epochs MLflow does not have yet: a rerun after a crash never logs an epoch twice."""
    logged = tracking.logged_steps(uri, run_id, "epoch")
    for record in records:
        if int(record["epoch"]) not in logged:
            tracking.log_metrics(uri, run_id, record, step=int(record["epoch"]))


# -------------------------------------------------------------------------------------- the function
def run_worker(request: dict[str, Any], session, log: Callable[[str], None] = write_line) -> None:
    """Train the run `request` describes (config, run_dir, run_id, threads, resume_path) in `session`."""
    config = resolve_config(request["config"])
    torch.set_num_threads(request["threads"])
    rank, world_size, device = session.rank, session.world_size, session.device
    is_chief = rank == 0
    log = log if is_chief else (lambda text: None)
    uri, run_id, run_dir = config.tracking.tracking_uri, request["run_id"], location(request["run_dir"])
    tracking.use_outbox(run_id, run_dir)  # a tracking server gone mid-run: records wait in the run folder

    loop = TrainingLoop(config, rank=rank, world_size=world_size, device=device, log=log)
    if world_size > 1:  # same start on every worker even if a custom init draws differently
        for tensor in loop.model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    run = Run(run_dir, config, run_id)
    evaluates = config.eval.enabled
    if is_chief:  # which path ran it, for whoever reads the run
        workers = f"{world_size} worker{'s' if world_size > 1 else ''}"
        tracking.set_tag(uri, run_id, "execution", f"{session.execution} ({workers})")

    state, source = newest_state(session.restored_checkpoint(), request.get("resume_path"), device, warn=log,
                                 run_dir=run_dir)
    if state is not None:
        loop.load_state_dict(state, source)
        log(f"resumed from {source} after epoch {loop.epoch}")
        if is_chief:  # epochs checkpointed before an interruption but never logged reach MLflow now
            log_new_epochs(uri, run_id, loop.history)
        if loop.finished and loop.history:
            # Interrupted after its last epoch: finish, and report it again so a listener (Tune) sees the result.
            if is_chief and not evaluates:
                finish_run(run, loop, report=None, log=log)
            session.report(_tune_result(loop.history[-1], loop, None))

    first_epoch_at = None
    diagnostic = None  # the `diagnostic` tag as last set (finish_run sets it again in any case)
    while not loop.finished:
        first_epoch_at = first_epoch_at or time.time()
        metrics = loop.run_epoch()
        log(format_epoch(metrics, loop.epochs))
        if is_chief:
            session.save(loop.state_dict(), loop.epoch)
            log_new_epochs(uri, run_id, [metrics])
            diagnostic = tag_diagnosis(uri, run_id, loop.history, diagnostic)
            if loop.finished and not evaluates:
                finish_run(run, loop, report=None, log=log)
        session.report(_tune_result(metrics, loop, first_epoch_at))

    if is_chief and evaluates:
        loop.model.load_state_dict(loop.final_weights())
        # The evaluation runs here, unsharded (this worker holds the CPUs that shards would need).
        eval_config = dataclasses.replace(config.eval, workers=1)
        report = evaluate_deployed(loop.model, loop.defense, loop.splits.test, epsilon=config.epsilon,
                                   eval_config=eval_config, device=device, seed=config.seed, state_dir=run_dir,
                                   log=log)
        log(format_report(report))
        finish_run(run, loop, report=report, log=log)


def _tune_result(metrics: dict[str, float], loop: TrainingLoop, first_epoch_at: float | None) -> dict[str, Any]:
    """What Tune sees of an epoch: its metrics, whether the run is over, when this process began training."""
    result: dict[str, Any] = {**metrics, "run_finished": loop.finished}
    if first_epoch_at is not None:
        result[FIRST_EPOCH_AT] = first_epoch_at
    return result


def finish_run(run: Run, loop: TrainingLoop, report: dict[str, Any] | None, log: Callable[[str], None]) -> None:
    """The end of a run (rank 0): the selected weights into final.pt, the stop reason and the selected epoch as
    tags, the MLflow run FINISHED, then the report. report.json is written last: it marks the run done, and a
    resumed run or study skips a run that has it, so its MLflow run must already be FINISHED (a kill between
    the two leaves no report, and the resumed run finishes again)."""
    if loop.stop_reason == "overfit":
        log(f"early stop at epoch {loop.epoch}: overfitting alarm; keeping epoch {loop.best_epoch}'s weights")
    config, uri, run_id = run.config, run.tracking_uri, run.run_id
    fired = diagnosis(loop.history)
    if fired:
        log(f"training diagnostics fired: {describe_diagnosis(fired)}")
        tracking.set_tag(uri, run_id, DIAGNOSTIC_TAG, describe_diagnosis(fired))
    summary = {"epochs_run": loop.epoch, "selected_epoch": loop.selected_epoch, "stop_reason": loop.stop_reason,
               "train_seconds": loop.total_seconds, "diagnostics": fired}
    tracking.set_tag(uri, run_id, "stop_reason", loop.stop_reason)
    tracking.set_tag(uri, run_id, "selected_epoch", str(loop.selected_epoch))
    final = {"model": loop.final_weights(), "defense": loop.defense.state_dict(),
             "config": tracking.public_config(config)}  # final.pt is logged to MLflow: no URI password
    if report is None:
        report = {"evaluated": False, **summary}
        save_checkpoint(final, run.final_model_path)  # for a later `robustune evaluate` or a study
    else:
        report = {**report, "evaluated": True, **summary}
        save_checkpoint({**final, "report": report}, run.final_model_path)
        tracking.log_evaluation(uri, run_id, report, step=loop.epoch)
        tracking.log_file(uri, run_id, run.final_model_path, "checkpoint")
    tracking.set_status(uri, run_id, "FINISHED")
    run.write_report(report)


def train_worker(request: dict[str, Any]) -> None:
    """Ray Train's per-worker function (the data-parallel path)."""
    quiet_ray_train_reports()
    config = request["config"]
    session = TrainSession(location(request["run_dir"]), use_gpu=bool(config["resources"]["use_gpu"]))
    run_worker(request, session)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report (all metrics) at INFO from a logger named after its file; that drowns
    the one progress line per epoch."""
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: the lines stay, nothing else changes
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
