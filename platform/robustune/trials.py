"""The one Tune trainable that searches and studies share: a trial is one run, resumed in place when its folder
exists, otherwise created from what the search or study asks for (`TrialPlan`).

A one-worker run executes inside the trial (the trial reserves the run's CPUs/GPU; Tune reuses trial actors,
so the process, its imports, its dataset and its MLflow client carry over from trial to trial). A
multi-worker run starts a TorchTrainer from the trial, whose workers hold the resources.

`TrialOutcomes` (a Tune callback in the driver) ends each trial's MLflow run in the state that matches what
happened: FINISHED (the run finished itself), KILLED with the stop reason (ASHA or the compute budget stopped
it between epochs), FAILED with the error.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from robustune import progress, tracking
from robustune.cluster import run_resources
from robustune.config import Config
from robustune.resolve import resolve_config
from robustune.run import Run, run_id_of

ROBUST_METRIC = "val/pgd_acc"
CLEAN_METRIC = "val/clean_acc"


@dataclass
class TrialRun:
    """What one trial trains: a run folder, and the config, parent and tags to create it with."""

    run_dir: Path
    config: dict[str, Any]
    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    display_name: str | None = None  # its name in the MLflow UI (default: the run folder's name)


class TrialPlan:
    """Maps a trial (its Tune config and id) to the run it trains. Subclasses are plain data: Tune ships them
    to the trial processes."""

    min_clean: float | None = None  # the constrained objective's clean-accuracy floor

    def trial_run(self, params: dict[str, Any], trial_id: str) -> TrialRun:
        raise NotImplementedError

    def run_dir(self, params: dict[str, Any], trial_id: str) -> Path:
        return self.trial_run(params, trial_id).run_dir


def objective_value(metrics: dict[str, Any], min_clean: float | None) -> float:
    """The scalar Tune and ASHA optimize. Constrained mode: robust accuracy when validation clean accuracy
    reaches `min_clean`, otherwise below every feasible trial (-1 + how close it came)."""
    robust = float(metrics.get(ROBUST_METRIC, 0.0))
    if min_clean is None:
        return robust
    clean = float(metrics.get(CLEAN_METRIC, 0.0))
    return robust if clean >= min_clean else -1.0 + clean / max(min_clean, 1e-9)


def train_trial(params: dict[str, Any], *, plan: TrialPlan) -> None:
    """Tune's trainable: resume the trial's run or create it, then train it, reporting every epoch."""
    from ray import tune

    from robustune.training import execute_here, execute_with_trainer

    trial_run = plan.trial_run(params, tune.get_context().get_trial_id())
    quiet = lambda text: None  # noqa: E731 - the search or study prints its own progress
    resume = Run.exists(trial_run.run_dir)
    if resume:
        run = Run.open(trial_run.run_dir)
        if run.finished:  # finished before an interruption: report its last epoch again for the searcher
            tune.report({**_last_epoch(run, plan.min_clean), "run_finished": True})
            return
        run.prepare_resume(quiet)
        tracking.set_status(run.tracking_uri, run.run_id, "RUNNING")
    else:
        run = Run.create(resolve_config(trial_run.config), extra_tags=trial_run.tags,
                         parent_run_id=trial_run.parent_run_id, display_name=trial_run.display_name)

    def forward(result: dict[str, Any]) -> None:
        tune.report({**result, "objective": objective_value(result, plan.min_clean)})

    try:
        if run.config.resources.num_workers > 1:
            execute_with_trainer(run, resume=resume, callbacks=[_trainer_report_callback(plan.min_clean)])
        else:
            execute_here(run, forward, resume=resume, log=quiet)
    except Exception as error:
        tracking.set_tag(run.tracking_uri, run.run_id, "stop_reason", "failed")
        tracking.set_tag(run.tracking_uri, run.run_id, "error", first_error_line(error))
        tracking.set_status(run.tracking_uri, run.run_id, "FAILED")
        raise


def _last_epoch(run: Run, min_clean: float | None) -> dict[str, float]:
    """The last epoch a run checkpointed, with its objective."""
    from robustune.checkpoints import load_checkpoint

    newest = run.latest_checkpoint()
    history = load_checkpoint(newest)["history"] if newest is not None else []
    metrics = dict(history[-1]) if history else {}
    return {**metrics, "objective": objective_value(metrics, min_clean)}


def _trainer_report_callback(min_clean: float | None):
    """A Ray Train callback forwarding each epoch's rank-0 metrics to Tune, plus the objective."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            first["objective"] = objective_value(first, min_clean)
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ObjectiveReport()


# Tune saves its experiment state at most every 10 s by default. Trials now end and the next one starts within
# a second, so a driver killed in that gap would forget trials that finished (and train them again on
# --resume). Once a second costs little next to an epoch.
EXPERIMENT_STATE_PERIOD_S = "1"


def trainable(plan: TrialPlan, config: Config):
    """`train_trial` bound to `plan`, reserving what a run of `config`'s resources needs."""
    import os

    from ray import tune

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)
    # Tune's newer console output prints its "Configuration for experiment" box and a TensorBoard hint whatever
    # the verbosity; the classic output at verbose=0 prints nothing. Searches and studies print their own lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    return tune.with_resources(tune.with_parameters(train_trial, plan=plan), run_resources(config))


def tune_failures(config: Config) -> int:
    """Tune's retries of a trial: a one-worker run's worker is the trial itself, so a trial whose process died
    is restarted (resuming from its run folder) resources.max_failures times; Ray Train restarts a
    multi-worker run's workers itself."""
    return config.resources.max_failures if config.resources.num_workers == 1 else 0


def first_error_line(error: BaseException) -> str:
    """The innermost non-Ray error line of a trial's (Ray-wrapped) exception, e.g. the NaN-loss message."""
    lines = [line.strip() for line in str(error).splitlines()]
    ours = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line) and not line.startswith("ray.")]
    return (ours or [line for line in lines if line] or [type(error).__name__])[-1][:500]


class TrialOutcomes(Callback):
    """Ends every trial's MLflow run in the state that matches what happened to it. `stopped_by(trial_id)`
    names who stopped a trial early ("budget_stopped" when the compute budget did; otherwise ASHA)."""

    def __init__(self, plan: TrialPlan, uri: str, stopped_by: Callable[[str], str] | None = None):
        self.plan, self.uri = plan, uri
        self.stopped_by = stopped_by or (lambda trial_id: "asha_stopped")

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = run_id_of(self.plan.run_dir(trial.config, trial.trial_id))
        if run_id is None or (trial.last_result or {}).get("run_finished"):
            return  # the run finished itself (FINISHED, its own stop reason)
        tracking.set_tag(self.uri, run_id, "stop_reason", self.stopped_by(trial.trial_id))
        tracking.set_status(self.uri, run_id, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = run_id_of(self.plan.run_dir(trial.config, trial.trial_id))
        if run_id is None:
            return
        tracking.set_tag(self.uri, run_id, "stop_reason", "failed")
        tracking.set_status(self.uri, run_id, "FAILED")


class TrialProgress(Callback):
    """Counts trials on the progress display (robustune.progress) as they start and end, keeps the best objective
    so far (a trial whose latest epoch is at chance cannot win) and prints one line as each ends. The display
    is reached through `progress.current()`: Tune pickles its callbacks."""

    prefix = "trials"

    def __init__(self):
        self.started = time.time()

    def name(self, trial) -> str:
        return f"trial {trial.trial_id}"

    def what(self, trial) -> str:
        """What a trial tried, next to the best objective."""
        return trial.trial_id

    def on_trial_start(self, iteration, trials, trial, **info):
        progress.current().unit_started(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        progress.current().best(self._best(trials))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "finished" if (trial.last_result or {}).get("run_finished") else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "FAILED")

    def _ended(self, trials, trial, what: str) -> None:
        shown = progress.current()
        shown.unit_finished(trial.trial_id, ok=what != "FAILED")
        shown.best(self._best(trials))
        last = trial.last_result or {}
        score = f": val PGD {last[ROBUST_METRIC]:.4f}" if last.get(ROBUST_METRIC) is not None else ""
        shown.log(f"[{self.prefix}] {self.name(trial)} {what}{score} ({time.time() - self.started:.0f}s)")

    def _best(self, trials) -> str | None:
        scores = [(t.last_result["objective"], t) for t in trials if t.last_result and "objective" in t.last_result
                  and not t.last_result.get("diag/collapsed")]
        if not scores:
            return None
        value, trial = max(scores, key=lambda pair: pair[0])
        return f"{value:.4f} ({self.what(trial)})"
