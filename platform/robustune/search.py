"""Search: Ray Tune + Optuna (TPE, seeded) + ASHA over any defense's knobs, tracked in MLflow and Parquet.

TPE starts from the defense's defaults and 4 points of a scrambled Sobol design (one in each quarter of every
knob's range; `space_filling_points`) before it models anything: at the budgets of a study, a search is
mostly its start-up points. `--searcher random` stays independent random points, as a baseline.

Each Tune trial is one training run (`robustune.trials`: in the trial's own reused process for one worker,
a TorchTrainer for several), its own MLflow child run under the search's parent run; every epoch is logged
and checkpointed, then reported to Tune, so ASHA can stop a hopeless trial after any epoch without losing
what it measured; by default its first rung is the first epoch where the learning rate has fallen to half its
peak (`robustune.loop.annealed_epoch`), since a model judged earlier in a cyclic schedule ranks poorly. Trials
validate on the held-out split and never evaluate on test. A search folder holds everything needed to resume it:

    <output_dir>/<search name>/
        search.json        settings, base config, MLflow parent run id
        space.yaml         the validated space
        tune/              Ray Tune's experiment state (searcher included), for --resume
        trials/trial-*/    one training run folder per trial (checkpoints; a resumed trial continues here)
        results.parquet    one row per trial
        summary.json       when it ends: counts, the best trial and its config, or why there is none

A trial whose model ended at chance (`collapsed`: robustune.loop.diagnosis, validation clean accuracy at most
1.5 x chance at its last epoch) is kept in the results (column `collapsed`, its diagnostics in `diagnostics`,
its MLflow run tagged `diagnostic`) but never wins: a search whose every trial collapsed or failed names no
best, says why in its summary (`no_winner`) and its MLflow parent run (tag `no_winner`), and refits nothing.

Reproducible: the same search run twice on one machine suggests the same knobs in the same order, trains them
to the same validation accuracies (CPU training is bit-reproducible for a seed and a thread count) and names
the same winner, whichever trial happens to finish first. The searcher suggests trials in batches of
`max_concurrent` and sees a batch's results only once all of it finished (`SuggestionBatches`); the scheduler
judges a trial at a rung only against earlier batches (`BatchedSuccessiveHalving`); rows are in suggestion
order (`trial_index`), and equal objectives go to the trial suggested first. What can still vary (a wall-clock
compute budget, GPU kernels, a resume) is named in the summary's `nondeterministic` and the parent run's tag
`nondeterministic` (`what_varies`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import yaml
from ray.tune import Stopper
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from robustune import progress
from robustune.config import ConfigError, apply_override, merge
from robustune.loop import annealed_epoch, describe_diagnosis, diagnosis
from robustune.resolve import resolve_config
from robustune.search_space import Distribution, check_samples_resolve, load_space, space_filling_points
from robustune.run import run_id_of
from robustune.storage import Location, location, output_root, ray_storage, read_parquet, write_parquet
from robustune.trials import (CLEAN_METRIC, ROBUST_METRIC, TrialOutcomes, TrialPlan, TrialProgress, TrialRun,
                              first_error_line, trainable, tune_failures)

SEARCH_FILE = "search.json"
RESULTS_FILE = "results.parquet"
# TPE's start-up points after the defaults: 4 Sobol points put one point in each quarter of every knob's range.
TPE_SPACE_FILLING_POINTS = 4
SUMMARY_FILE = "summary.json"  # written when the search ends: best trial, its config, compute
Objective = Literal["robust", "pareto", "constrained"]


@dataclass
class SearchSettings:
    defense: str
    samples: int = 8
    # Trials at once, and the size of a suggestion batch: None, as many trials as the cluster's CPUs fit (so
    # another cluster suggests in other batches and can choose other knobs).
    max_concurrent: int | None = None
    epochs: int | None = None  # per trial; None: the config's train.epochs
    objective: Objective = "robust"
    min_clean: float | None = None  # constrained: validation clean accuracy must reach this
    seed: int = 0
    searcher: Literal["tpe", "random", "grid"] = "tpe"
    grid_points: int = 3  # grid: values per uniform/loguniform/int knob (choices: all); samples = the grid's size
    scheduler: Literal["asha", "none"] = "asha"
    # Successive halving: epochs every trial gets before it can be stopped. None: the first epoch where the
    # learning-rate schedule has annealed (robustune.loop.annealed_epoch), as early as trials rank fairly.
    grace_period: int | None = None
    reduction_factor: float = 2.0
    include_default: bool = True  # the defense's defaults are the first point evaluated
    space_file: str | None = None
    # Compute budget in worker-seconds of training epochs (validation included): the search ends once its
    # trials have spent it (a study sets it to another defense's training cost). None: only `samples` limits it.
    budget_s: float | None = None

    def check(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.objective == "constrained" and (self.min_clean is None or not 0 <= self.min_clean <= 1):
            raise ConfigError("--objective constrained needs --min-clean X with X in [0, 1]")
        if self.searcher not in ("tpe", "random", "grid"):
            raise ConfigError(f"searcher must be 'tpe', 'random' or 'grid', got {self.searcher!r}")
        if self.grid_points < 1:
            raise ConfigError(f"--grid-points must be >= 1, got {self.grid_points}")
        if (self.grace_period is not None and self.grace_period < 1) or self.reduction_factor <= 1:
            raise ConfigError("ASHA needs grace_period >= 1 and reduction_factor > 1")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"the search's compute budget must be > 0 worker-seconds, got {self.budget_s}")


@dataclass
class SearchPlan(TrialPlan):
    """A search trial trains the base config with the sampled knobs in trials/trial-<id>/."""

    base: dict[str, Any]
    search_dir: str
    parent_run_id: str
    search_name: str
    min_clean: float | None = None

    def trial_run(self, params: dict[str, Any], trial_id: str) -> TrialRun:
        trials_dir = location(self.search_dir) / "trials"
        run_dir = trials_dir / f"trial-{trial_id}"
        data = self.base
        for key, value in params.items():
            data = apply_override(data, key.split("."), value)
        data = merge(data, {"tracking": {"run_name": run_dir.name, "output_dir": str(trials_dir)},
                            "eval": {"enabled": False}})
        return TrialRun(run_dir, data, self.parent_run_id,
                        {"search": self.search_name, "search_trial_id": trial_id},
                        display_name=f"{data['method']['name']} trial {current_trial_index() or trial_id}")

    def run_dir(self, params: dict[str, Any], trial_id: str) -> Location:
        return location(self.search_dir) / "trials" / f"trial-{trial_id}"


class ComputeBudget(Stopper):
    """The search's compute budget: worker-seconds inside the trials' training epochs. A running trial stops at
    an epoch report (the way ASHA stops a trial) when its next epoch, as long as its last one, would overrun the
    budget, and `SuggestionBatches` starts no trial that the budget would stop before it can be judged: one
    starts only while `judged_epochs` typical epochs still fit (its first rung, or all its epochs when it has
    none): epochs that no rung and no final result ever judge are spent for nothing. So a search ends under its
    budget, give or take the epoch that another trial has in progress at the time.
    (Tune's stop_all would kill running trials mid-start and can leave their workers' resources reserved.)"""

    def __init__(self, budget_s: float | None, workers: int, judged_epochs: int = 1):
        self.budget_s, self.workers, self.judged_epochs = budget_s, workers, judged_epochs
        self.seconds: dict[str, float] = {}  # trial id -> its time/total_s so far
        self.last_epoch_s: dict[str, float] = {}  # trial id -> its last epoch's time/total_s increase
        self.stopped: set[str] = set()  # trials this budget stopped before they finished

    def __call__(self, trial_id: str, result: dict) -> bool:
        previous = self.seconds.get(trial_id, 0.0)
        total = max(previous, float(result.get("time/total_s") or 0.0))
        if total > previous:  # Tune hands a trial's last report to the stopper twice: it is no 0-s epoch
            self.last_epoch_s[trial_id] = total - previous
        self.seconds[trial_id] = total
        stop = self._overrun(self.last_epoch_s.get(trial_id, 0.0)) and not result.get("run_finished")
        if stop:
            self.stopped.add(trial_id)
        if self.budget_s is not None:  # the stopper runs in the driver, where the display is
            progress.current().budget(self.spent_s, self.budget_s, self.trials_affordable())
        return stop

    def stop_reason(self, trial_id: str) -> str:
        """Why a trial that did not finish was stopped: the budget, or else ASHA."""
        return "budget_stopped" if trial_id in self.stopped else "asha_stopped"

    @property
    def spent_s(self) -> float:
        return sum(self.seconds.values()) * self.workers

    def _overrun(self, next_epoch_s: float) -> bool:
        return self.budget_s is not None and self.spent_s + next_epoch_s * self.workers > self.budget_s

    def _typical_epoch_s(self) -> float:
        """The median of the epochs seen so far (0 before any)."""
        epochs = sorted(self.last_epoch_s.values())
        return epochs[len(epochs) // 2] if epochs else 0.0

    def fits_trials(self, count: int) -> bool:
        """Room left for `count` more trials to reach the epoch where they are judged, in typical epochs."""
        return not self._overrun(count * self.judged_epochs * self._typical_epoch_s())

    def trials_affordable(self) -> int | None:
        """The most trials for which `fits_trials` holds (None before an epoch was measured, or without a
        budget): what the search can still start, counting those of the current batch."""
        trial_s = self.judged_epochs * self._typical_epoch_s() * self.workers
        if self.budget_s is None or trial_s <= 0:
            return None
        return max(0, int((self.budget_s - self.spent_s) // trial_s))

    def stop_all(self) -> bool:
        return False


class SuggestionBatches(ConcurrencyLimiter):
    """The searcher, suggesting trials in batches of `batch_size` (the trials that run at once): trials
    1..batch_size, then the next batch once all of those finished, and so on; it is told a batch's results
    together, in suggestion order, once the whole batch has finished. Nothing is suggested once `budget` has no
    room for another trial to reach the epoch where it is judged.

    Tune's plain ConcurrencyLimiter tells the searcher each result as it arrives and suggests the next trial at
    once, so what TPE suggested depended on which trial happened to finish first: the same search chose other
    knobs on another run. Here every suggestion is made from the same finished trials on every run. (TPE reads
    trials in Optuna's trial-number order, which is the suggestion order, whatever order they were told in;
    telling them in that order keeps any other searcher right too.) The price: a batch waits for its slowest
    trial, so the slot of a trial that ended early (ASHA, a failure) idles until then.
    Subclassing ConcurrencyLimiter makes Tune keep a whole batch pending at once (its max pending trials)."""

    def __init__(self, searcher: Searcher, batch_size: int, samples: int, budget: ComputeBudget):
        super().__init__(searcher, max_concurrent=batch_size)
        self.batch_size, self.samples, self.budget = batch_size, samples, budget
        self.suggested = 0  # trials suggested so far
        self.batch: list[str] = []  # the current batch's trial ids, in suggestion order
        self.finished: dict[str, tuple[dict | None, bool]] = {}  # its finished trials: (result, error)

    def suggest(self, trial_id: str):
        if len(self.batch) == self.batch_size:
            return None  # the next batch is suggested once all of this one has finished
        # A batch is suggested at once, before any of it has run: this trial and the batch's others, whole.
        if not self.budget.fits_trials(len(self.batch) + 1):
            return Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.batch.append(trial_id)
            self.suggested += 1
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id not in self.batch:
            return
        self.finished[trial_id] = (result, error)
        complete = len(self.batch) == self.batch_size or self.suggested == self.samples  # no trial joins it
        if not complete or len(self.finished) < len(self.batch):
            return  # the searcher sees none of a batch before all of it has finished
        for batch_trial in self.batch:
            batch_result, batch_error = self.finished[batch_trial]
            self.searcher.on_trial_complete(batch_trial, result=batch_result, error=batch_error)
        self.batch, self.finished = [], {}

    def get_state(self) -> dict:
        # Tune saves this with its experiment state; the budget is the Stopper's own object, not a copy to restore.
        state = super().get_state()
        del state["budget"]
        return state


def suggestion_number(experiment_tag: str) -> int:
    """A trial's place in the order of suggestions (1, 2, ...): Tune's experiment tag starts with it
    ("3_method.alpha_ratio=0.7,train.lr=0.05"). Unlike the trial id (random), it is the same on every run."""
    return int(experiment_tag.split("_", 1)[0])


def current_trial_index() -> int | None:
    """Inside a Tune trial: its suggestion number, from its folder's name <trial name>_<experiment tag>_<date>
    (Tune does not hand a trial its experiment tag); None outside a trial."""
    from ray import tune

    context = tune.get_context()
    folder, name = context.get_trial_dir(), context.get_trial_name()
    if not folder or not name or not Path(folder).name.startswith(f"{name}_"):
        return None
    return suggestion_number(Path(folder).name[len(name) + 1:])


class BatchedSuccessiveHalving(FIFOScheduler):
    """Successive halving (ASHA's rungs and cutoff) whose decisions do not depend on which trial reports first.

    Ray's ASHA judges a trial at a rung against whichever trials reached that rung before it, so the same trial
    was stopped on one run and kept on the next. Here a trial at a rung is judged only against the trials of
    earlier suggestion batches (`SuggestionBatches`), which had all finished before its batch was suggested:
    the same trials, the same cutoff, whatever the order within its batch. A synchronous HyperBand would also
    compare a batch's trials with each other, but only by pausing trials at every rung until their batch
    caught up. The price here: a trial is never compared with its own batch, so the first batch (all trials
    when samples <= the trials at once) is never stopped."""

    _supports_buffered_results = False  # every epoch's report reaches `on_trial_result` on its own

    def __init__(self, objective_key: str, max_t: int, grace_period: int, reduction_factor: float,
                 batch_size: int):
        super().__init__()
        self.objective_key, self.reduction_factor, self.batch_size = objective_key, reduction_factor, batch_size
        # ASHA's rungs: grace_period x reduction_factor^k epochs, maximizing the objective; at max_t a trial is done.
        milestones = []
        while grace_period * reduction_factor ** len(milestones) < max_t:
            milestones.append(grace_period * reduction_factor ** len(milestones))
        self.rungs: dict[float, dict[str, tuple[int, float]]] = {m: {} for m in milestones}  # trial -> (batch, value)
        self.batch_of: dict[str, int] = {}  # trial id -> its suggestion batch (0, 1, ...)

    def on_trial_add(self, tune_controller, trial) -> None:
        self.batch_of[trial.trial_id] = (suggestion_number(trial.experiment_tag) - 1) // self.batch_size

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        epoch, value = result["training_iteration"], result.get(self.objective_key)
        reached = [m for m, recorded in self.rungs.items() if m <= epoch and trial.trial_id not in recorded]
        if value is None or not reached:
            return self.CONTINUE
        batch = self.batch_of[trial.trial_id]
        recorded = self.rungs[max(reached)]  # as ASHA: a report is judged at the highest rung it reached
        earlier = [v for b, v in recorded.values() if b < batch]
        recorded[trial.trial_id] = (batch, float(value))
        if earlier and float(value) < np.nanpercentile(earlier, (1 - 1 / self.reduction_factor) * 100):
            return self.STOP
        return self.CONTINUE


class SearchProgress(TrialProgress):
    """The search's trials on the progress display, and a line as each ends (robustune.trials.TrialProgress)."""

    prefix = "search"

    def what(self, trial) -> str:
        return format_params(trial.config)


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _make_tuner(settings: SearchSettings, space: dict[str, Distribution], base: dict[str, Any], search_dir: Location,
                parent_run_id: str, search_name: str, log: Callable[[str], None], restore: bool,
                budget: ComputeBudget, callbacks: list | None = None):
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    epochs = base["train"]["epochs"]
    plan = SearchPlan(base=base, search_dir=str(search_dir), parent_run_id=parent_run_id, search_name=search_name,
                      min_clean=settings.min_clean if settings.objective == "constrained" else None)
    config = resolve_config(base)
    trial_trainable = trainable(plan, config)
    outcomes = TrialOutcomes(plan, config.tracking.tracking_uri, budget.stop_reason)
    run_config = tune.RunConfig(name="tune", **ray_storage(search_dir), verbose=0, stop=budget,
                                callbacks=[SearchProgress(), outcomes, *(callbacks or [])],
                                failure_config=tune.FailureConfig(max_failures=tune_failures(config)))
    if restore:
        where = ray_storage(search_dir / "tune")
        return tune.Tuner.restore(where.pop("storage_path"), trial_trainable, resume_unfinished=True,
                                  resume_errored=False, **where)

    if settings.objective == "pareto":
        metric, mode = ["objective", CLEAN_METRIC], ["max", "max"]
    else:
        metric, mode = "objective", "max"
    sampler, start_points = optuna_sampler(settings, space, base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "A new study created" says nothing to a user
    searcher = OptunaSearch(space={k: d.to_optuna() for k, d in space.items()}, metric=metric, mode=mode,
                            sampler=sampler, points_to_evaluate=start_points or None)
    batch_size = settings.max_concurrent
    scheduler = FIFOScheduler()
    if settings.scheduler == "asha":
        scheduler = BatchedSuccessiveHalving("objective", max_t=epochs,
                                             grace_period=first_judged_epoch(settings, base),
                                             reduction_factor=settings.reduction_factor, batch_size=batch_size)
        log(describe_rungs(sorted(scheduler.rungs), epochs, chosen=settings.grace_period is not None))
    searcher = SuggestionBatches(searcher, batch_size, settings.samples, budget)
    # reuse_actors: a one-worker trial runs in its actor, so the next trial skips the process start, the
    # imports, the dataset decoding and the MLflow store opening. The searcher limits the trials at once.
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=settings.samples,
                                  reuse_actors=True)
    return tune.Tuner(trial_trainable, tune_config=tune_config, run_config=run_config)


def optuna_sampler(settings: SearchSettings, space: dict[str, Distribution], base: dict[str, Any]):
    """The search's Optuna sampler and the points it evaluates first, in order (benchmarks/search_landscape.py
    replays the same searcher offline)."""
    import optuna

    # A grid is the grid: the defaults are not added to it.
    defaults = (default_point(settings.defense, space, base)
                if settings.include_default and settings.searcher != "grid" else None)
    start_points = [defaults] if defaults else []
    if settings.searcher == "grid":
        return optuna.samplers.GridSampler(grid_values(space, settings.grid_points), seed=settings.seed), []
    if settings.searcher == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed), start_points
    # TPE's start-up: the defaults, then a space-filling design instead of independent random points (a
    # search on a few trials' budget is mostly its start-up; see space_filling_points).
    design_size = min(TPE_SPACE_FILLING_POINTS, settings.samples - len(start_points))
    start_points += space_filling_points(space, design_size, settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(1, len(start_points))), start_points


def first_judged_epoch(settings: SearchSettings, base: dict[str, Any]) -> int:
    """The epoch where a trial is first judged: ASHA's first rung (the grace period, by default the first epoch
    where the learning rate has annealed), or its last epoch without ASHA."""
    epochs = base["train"]["epochs"]
    if settings.scheduler != "asha":
        return epochs
    return min(settings.grace_period or annealed_epoch(resolve_config(base).train, epochs), epochs)


def describe_rungs(rungs: list[float], epochs: int, chosen: bool) -> str:
    """The search log's line on where ASHA judges trials (`chosen`: the grace period was set, not derived)."""
    why = "" if chosen else " (the learning rate has fallen to half its peak; an earlier epoch ranks configs poorly)"
    if not rungs:
        if chosen:
            return f"ASHA: grace period of {epochs} epoch(s): every trial runs all {epochs}"
        return (f"ASHA stops no trial early: the learning rate falls to half its peak only in the last of {epochs} "
                "epochs, and an earlier epoch ranks configs poorly (set grace_period to judge earlier anyway)")
    at = ", ".join(f"{rung:g}" for rung in rungs)
    return f"ASHA judges trials after epoch(s) {at} of {epochs}{why}"


def grid_values(space: dict[str, Distribution], points: int) -> dict[str, list[Any]]:
    return {key: dist.grid(points) for key, dist in space.items()}


def grid_size(space: dict[str, Distribution], points: int) -> int:
    return math.prod(len(values) for values in grid_values(space, points).values())


def default_point(defense: str, space: dict[str, Distribution], base: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved base config's value for every searched key, if each lies inside its range."""
    resolved = resolve_config(base).to_dict()
    point = {}
    for key, dist in space.items():
        value: Any = resolved
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        inside = (value in dist.values) if dist.type == "choice" else (
            value is not None and dist.low <= value <= dist.high)
        if not inside:
            return None
        point[key] = value
    return point


def start_search(settings: SearchSettings, base_data: dict[str, Any], log: Callable[[str], None] = print,
                 refit: bool = False, parent_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None, callbacks: list | None = None,
                 stage: tuple[int, int, str] | None = None) -> dict[str, Any]:
    """Validate everything, create the search folder and MLflow parent run, run the search. `callbacks`:
    more Ray Tune callbacks for this run of the search (after the search's own; not kept for --resume).
    `stage`: (k, n, name) of the stage this search is on the progress display (default: its own stages)."""
    from robustune import tracking
    from robustune.data import check_available
    from robustune.cluster import check_cluster_fits, ensure_ray, share_cpus
    from robustune.storage import check_nodes_see, check_storage

    settings.check()
    base_data = merge(base_data, {"method": {"name": settings.defense}})
    full_epochs = resolve_config(base_data).train.epochs  # what --refit trains for
    if settings.epochs is not None:
        base_data = apply_override(base_data, ["train", "epochs"], settings.epochs)
    base = resolve_config(base_data)
    space = load_space(settings.defense, settings.space_file)
    check_samples_resolve(space, base.to_dict())
    if settings.searcher == "grid":  # the whole grid, once (a compute budget can still end it early)
        settings.samples = grid_size(space, settings.grid_points)
    check_available(base.data.name, base.data.data_dir, base.data.download)

    base.tracking.tracking_uri = tracking.resolve_tracking_uri(base.tracking.tracking_uri)
    root = output_root(base.tracking.output_dir)
    check_storage(root)  # an object store that does not answer, or has no such bucket, before Ray starts
    base.tracking.output_dir = str(root)
    search_name = base.tracking.run_name or f"search-{settings.defense}-{time.strftime('%Y%m%d-%H%M%S')}"
    search_dir = root / search_name
    if search_dir.exists():
        raise ConfigError(f"search folder {search_dir} already exists; continue it with --resume {search_dir}")
    base.tracking.run_name = None
    uri = base.tracking.tracking_uri

    ensure_ray(meanwhile=lambda: tracking.load_modules(uri))  # MLflow loads while Ray starts
    settings.max_concurrent = share_cpus(base, settings.max_concurrent)
    check_cluster_fits(base)  # before the parent run exists: a run that can never start is refused now
    check_nodes_see(root)
    parent_run_id = tracking.create_run(base, search_name, parent_run_id=parent_run_id,
                                        extra_tags={"kind": "search", "search": search_name, **(extra_tags or {})},
                                        display_name=f"{settings.defense} search")
    tracking.log_params(uri, run_id=parent_run_id,
                        params={f"search.{k}": v for k, v in asdict(settings).items()})
    space_text = yaml.safe_dump({k: {key: value for key, value in asdict(d).items() if value not in (None, ())}
                                 for k, d in space.items()}, sort_keys=False)
    tracking.log_text(uri, parent_run_id, space_text, "search/space.yaml")
    search_dir.mkdir(parents=True)
    (search_dir / "space.yaml").write_text(space_text)
    (search_dir / SEARCH_FILE).write_text(json.dumps({
        "settings": asdict(settings), "base": base.to_dict(), "parent_run_id": parent_run_id,
        "search_name": search_name, "refit_epochs": full_epochs}, indent=2))
    log(f"search {search_name}: {settings.samples} trials of {settings.defense} over "
        f"{', '.join(space)}; {settings.max_concurrent} at a time; MLflow parent run {parent_run_id}")
    log(f"search folder {search_dir} (continue an interrupted search with: robustune search --resume {search_dir})")
    return _run(search_dir, log, restore=False, refit=refit, callbacks=callbacks, stage=stage)


def resume_search(search_dir: str | Location, log: Callable[[str], None] = print,
                  refit: bool = False, stage: tuple[int, int, str] | None = None) -> dict[str, Any]:
    from ray import tune

    from robustune import tracking
    from robustune.cluster import ensure_ray
    from robustune.storage import check_nodes_see, check_storage

    search_dir = location(search_dir).resolve()
    check_storage(search_dir.parent)
    if not (search_dir / SEARCH_FILE).is_file():
        raise ConfigError(f"--resume {search_dir}: not a robustune search folder (no {SEARCH_FILE}); "
                          "pass the folder `robustune search` printed at its start")
    ensure_ray()
    check_nodes_see(search_dir.parent)
    state = json.loads((search_dir / SEARCH_FILE).read_text())
    tracking.set_status(state["base"]["tracking"]["tracking_uri"], state["parent_run_id"], "RUNNING")
    log(f"resuming search {state['search_name']} (MLflow parent run {state['parent_run_id']})")
    where = ray_storage(search_dir / "tune")
    restore = tune.Tuner.can_restore(where.pop("storage_path"), **where)
    if not restore:  # interrupted before Tune first saved its state: the trials start over
        log(f"search {state['search_name']}: Tune saved no state before the interruption; starting its trials")
    return _run(search_dir, log, restore=restore, refit=refit, stage=stage)


def _run(search_dir: Location, log: Callable[[str], None], restore: bool, refit: bool,
         callbacks: list | None = None, stage: tuple[int, int, str] | None = None) -> dict[str, Any]:
    from robustune import tracking

    state = json.loads((search_dir / SEARCH_FILE).read_text())
    settings = SearchSettings(**state["settings"])
    base, parent_run_id, search_name = state["base"], state["parent_run_id"], state["search_name"]
    space = load_space(settings.defense, search_dir / "space.yaml")
    uri = base["tracking"]["tracking_uri"]
    started = time.time()
    budget = ComputeBudget(settings.budget_s, base["resources"]["num_workers"], first_judged_epoch(settings, base))
    if settings.budget_s is not None:
        log(f"search {search_name}: compute budget {settings.budget_s:.0f} worker-seconds of training epochs")
    shown = progress.current()
    number, of, name = stage or (1, 2 if refit else 1, f"search {settings.defense}")
    shown.stage(number, of, name, units=settings.samples, kind="trial", at_once=settings.max_concurrent or 1)
    if settings.budget_s is not None:
        shown.budget(budget.spent_s, settings.budget_s, budget.trials_affordable())
    tuner = _make_tuner(settings, space, base, search_dir, parent_run_id, search_name, log, restore, budget,
                        callbacks)
    results = tuner.fit()
    table = collect_results(results, settings, base, space, search_dir, budget)
    end_orphaned_trials(uri, parent_run_id, {row["run_id"] for row in table if row["run_id"]}, log)
    write_results(table, search_dir / RESULTS_FILE)
    tracking.log_file(uri, parent_run_id, search_dir / RESULTS_FILE, "search")
    summary = summarize(table, settings, time.time() - started)
    summary["budget_s"] = settings.budget_s
    summary["nondeterministic"] = what_varies(settings, base, resumed=restore)
    if summary["nondeterministic"]:
        tracking.set_tag(uri, parent_run_id, "nondeterministic", summary["nondeterministic"][:5000])
    best = summary.get("best")
    if not best:
        tracking.set_tag(uri, parent_run_id, "no_winner", summary["no_winner"][:5000])
    if best:
        tracking.log_params(uri, parent_run_id, {f"best.{k}": v for k, v in best["params"].items()})
        tracking.log_metrics(uri, parent_run_id, {f"best/{k}": v for k, v in best["metrics"].items()
                                                  if isinstance(v, (int, float))}, step=0)
        tracking.set_tag(uri, parent_run_id, "best_trial_id", best["trial_id"])
        if best.get("run_id"):
            tracking.set_tag(uri, best["run_id"], "best_trial", "true")
        best_config = base
        for key, value in best["params"].items():
            best_config = apply_override(best_config, key.split("."), value)
        tracking.log_text(uri, parent_run_id, yaml.safe_dump(tracking.public_config(best_config), sort_keys=False),
                          "search/best_config.yaml")
        summary["best_config"] = best_config
    tracking.log_dict(uri, parent_run_id, {k: v for k, v in summary.items() if k != "best_config"},
                      "search/summary.json")
    tracking.set_status(uri, parent_run_id, "FINISHED")
    summary.update({"search_dir": str(search_dir), "parent_run_id": parent_run_id, "tracking_uri": uri,
                    "refit_epochs": state["refit_epochs"]})
    (search_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    log(format_summary(summary, table))
    if refit and best:
        shown.stage(2, 2, "refit of the best config", units=1, kind="run", ranked=False)
        summary["refit"] = refit_best(summary, log)
    elif refit:
        log(f"no refit: the search named no winner ({summary['no_winner']})")
    return summary


def what_varies(settings: SearchSettings, base: dict[str, Any], resumed: bool) -> str | None:
    """What can differ between two runs of this search on one machine with the same settings and seed, or None:
    then every trial's knobs, its validation accuracies and the winner are the same on every run (trial ids,
    run ids and times always differ). Another machine can differ anyway where it runs another number of trials
    at once (`suggestion_batch`) or another number of torch threads per worker (float rounding)."""
    reasons = []
    if settings.budget_s is not None:
        reasons.append("trial count set by a wall-clock compute budget: how many trials run, and after which "
                       "epoch the budget stops them, depends on the machine's speed and load")
    if base["resources"]["use_gpu"]:
        reasons.append("trained on GPUs, whose kernels are not bit-reproducible: accuracies can differ slightly "
                       "from run to run, and with them the scheduler's and the searcher's choices")
    if resumed and settings.scheduler == "asha":
        reasons.append("resumed after an interruption: Tune does not save the scheduler's rung records, so the "
                       "trials after the resume were judged without those of the trials before it")
    return "; ".join(reasons) or None


def collect_results(results, settings: SearchSettings, base: dict[str, Any], space: dict[str, Distribution],
                    search_dir: Location, budget: ComputeBudget) -> list[dict[str, Any]]:
    """One row per trial, in suggestion order (`trial_index`: 1, 2, ...): knobs, final and best validation
    metrics, epochs, stop reason, time, compute, and the training diagnostics (`collapsed`: its last epoch at
    chance; `diagnostics`: what fired, with epochs). The status is the one its MLflow run ended with
    (`TrialOutcomes` set it when the trial ended)."""
    from robustune import tracking

    mlflow_client = tracking.client(base["tracking"]["tracking_uri"])
    epochs = base["train"]["epochs"]
    workers = base["resources"]["num_workers"]
    rows = []
    for result in results:
        metrics = result.metrics or {}
        # Tune names a trial's folder <trainable>_<trial id>_<experiment tag>_<date>: a trial that failed before
        # its first report has no metrics to read them from.
        from_path = re.match(r"^[a-z_]+?_([0-9a-f]+)_(\d+_.*)$", Path(result.path).name) if result.path else None
        trial_id = metrics.get("trial_id") or (from_path.group(1) if from_path else None)
        experiment_tag = metrics.get("experiment_tag") or (from_path.group(2) if from_path else None)
        history = result.metrics_dataframe
        run = _child_run(mlflow_client, search_dir, trial_id)
        epochs_run = int(metrics.get("epoch", 0) or 0)
        if result.error is not None:
            reason = "failed"
        elif run is not None and run.data.tags.get("stop_reason") == "overfit":
            reason = "overfit_alarm"
        elif epochs_run < epochs and not metrics.get("run_finished"):
            reason = budget.stop_reason(trial_id)
        else:
            reason = "completed"
        wall = float(metrics.get("time_total_s") or 0.0)
        fired = diagnosis(history.to_dict("records")) if history is not None and "epoch" in history else {}
        row = {"trial_id": trial_id, "trial_index": suggestion_number(experiment_tag) if experiment_tag else None,
               "status": reason, "run_id": run.info.run_id if run else None,
               "epochs_run": epochs_run, "epochs_planned": epochs, "wall_s": wall,
               "epochs_s": float(metrics.get("time/total_s") or 0.0),  # inside training epochs (+ validation)
               "worker_s": wall * workers,
               "error": first_error_line(result.error) if result.error is not None else None,
               "collapsed": "collapsed" in fired, "diagnostics": describe_diagnosis(fired) or None}
        row.update({f"param.{k}": result.config.get(k) for k in space})
        for key in (ROBUST_METRIC, CLEAN_METRIC, "objective", "train/loss", "alarm/overfit"):
            row[f"final.{key}"] = _float(metrics.get(key))
            row[f"best.{key}"] = (_float(history[key].max()) if history is not None and key in history else None)
        rows.append(row)
    return sorted(rows, key=suggestion_order)


def suggestion_order(row: dict[str, Any]) -> tuple[bool, int]:
    """Sort key of a results row: its place among the suggestions (the same on every run, unlike trial ids);
    a trial whose place Tune did not record goes last."""
    return row.get("trial_index") is None, row.get("trial_index") or 0


def end_orphaned_trials(uri: str, parent_run_id: str, kept_run_ids: set[str], log: Callable[[str], None]) -> None:
    """A search killed just after starting a trial can leave an MLflow run that is no trial's run in the resumed
    search: Tune had not yet saved the trial (it starts another in its place), or the trial was killed between
    creating its MLflow run and writing run.json (the resumed trial creates a new run). Such a run would stay
    RUNNING forever: it ends KILLED, with stop_reason `interrupted`; its folder stays under trials/."""
    from robustune import tracking

    mlflow_client = tracking.client(uri)
    experiment = mlflow_client.get_run(parent_run_id).info.experiment_id
    for run in mlflow_client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                       "and attributes.status = 'RUNNING'"):
        if run.info.run_id not in kept_run_ids:
            tracking.set_tag(uri, run.info.run_id, "stop_reason", "interrupted")
            tracking.set_status(uri, run.info.run_id, "KILLED")
            log(f"trial {run.data.tags.get('search_trial_id')} was cut short when the search was interrupted and "
                f"its MLflow run {run.info.run_id} is not part of the resumed search: it ends KILLED (interrupted)")


def _child_run(mlflow_client, search_dir: Location, trial_id: str | None):
    run_id = run_id_of(search_dir / "trials" / f"trial-{trial_id}") if trial_id else None
    return mlflow_client.get_run(run_id) if run_id else None


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def write_results(rows: list[dict[str, Any]], path: Location) -> None:
    import pyarrow as pa

    columns = sorted({key for row in rows for key in row}, key=lambda k: (not k.startswith(("trial", "status")), k))
    table = pa.table({c: [_plain(row.get(c)) for row in rows] for c in columns})
    write_parquet(table, path)


def _plain(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials not dominated in (best validation PGD accuracy, its clean accuracy)."""
    points = [r for r in rows if r["status"] != "failed" and not r.get("collapsed")
              and r[f"final.{ROBUST_METRIC}"] is not None]
    front = []
    for r in points:
        a, b = r[f"best.{ROBUST_METRIC}"], r[f"final.{CLEAN_METRIC}"]
        dominated = any((o[f"best.{ROBUST_METRIC}"] >= a and o[f"final.{CLEAN_METRIC}"] >= b)
                        and (o[f"best.{ROBUST_METRIC}"] > a or o[f"final.{CLEAN_METRIC}"] > b) for o in points)
        if not dominated:
            front.append(r)
    return front


def summarize(rows: list[dict[str, Any]], settings: SearchSettings, wall_s: float) -> dict[str, Any]:
    """Counts and compute, and the best trial among those that neither failed nor collapsed (a model at chance
    is no candidate, whatever its objective); without one, `no_winner` says why. Equal objectives go to the
    trial suggested first, so the same trials name the same winner on every run."""
    usable = [r for r in rows if r["status"] != "failed" and r["best.objective"] is not None]
    ranked = candidates(rows)
    best = ranked[0] if ranked else None
    summary: dict[str, Any] = {
        "defense": settings.defense, "objective": settings.objective, "trials": len(rows),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "wall_s": wall_s, "worker_s": sum(r["worker_s"] for r in rows),
        # Share of the trial slots (wall time x concurrent trials) not spent in training epochs:
        # Ray, Tune and worker start-up, MLflow, checkpoints, idle slots.
        "overhead_share": 1 - sum(r["epochs_s"] for r in rows) / max(wall_s * (settings.max_concurrent or 1), 1e-9),
        "collapsed_trials": [r["trial_id"] for r in rows if r.get("collapsed")],
        "suggestion_batch": settings.max_concurrent,  # trials suggested together (SuggestionBatches)
    }
    if best is None:
        summary["no_winner"] = no_winner_reason(rows, usable)
    if best:
        summary["best"] = {"trial_id": best["trial_id"], "trial_index": best.get("trial_index"),
                           "run_id": best["run_id"],
                           "params": trial_params(best),
                           "metrics": {"val_pgd_acc": best[f"best.{ROBUST_METRIC}"],
                                       "val_clean_acc": best[f"final.{CLEAN_METRIC}"],
                                       "objective": best["best.objective"]}}
    if settings.objective == "pareto":
        summary["pareto_front"] = [r["trial_id"] for r in pareto_front(rows)]
    return summary


def candidates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that can win, best first: neither failed nor collapsed (a model at chance is no candidate,
    whatever its objective), by objective; equal objectives go to the trial suggested first."""
    ok = [r for r in rows if r["status"] != "failed" and r["best.objective"] is not None and not r.get("collapsed")]
    return sorted(ok, key=lambda r: (-r["best.objective"], suggestion_order(r)))


def trial_params(row: dict[str, Any]) -> dict[str, Any]:
    """A results row's knobs, as the search space names them."""
    return {k[len("param."):]: v for k, v in row.items() if k.startswith("param.")}


def next_best(search_dir: str | Location) -> dict[str, Any] | None:
    """The best trial whose knobs differ from the winner's (its trial id, knobs and validation PGD accuracy), or
    None when no other config can win."""
    path = location(search_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    ranked = candidates(read_parquet(path).to_pylist())
    others = [r for r in ranked[1:] if ranked and trial_params(r) != trial_params(ranked[0])]
    if not others:
        return None
    return {"trial_id": others[0]["trial_id"], "params": trial_params(others[0]),
            "val_pgd_acc": others[0][f"best.{ROBUST_METRIC}"]}


def no_winner_reason(rows: list[dict[str, Any]], usable: list[dict[str, Any]]) -> str:
    collapsed = sum(bool(r.get("collapsed")) for r in usable)
    failed = sum(r["status"] == "failed" for r in rows)
    if rows and collapsed == len(rows):
        return (f"every trial collapsed: all {len(rows)} ended with validation clean accuracy at chance; "
                "the defense did not work with any of these settings")
    if collapsed:
        return (f"no trial that worked: {collapsed} of {len(rows)} trials collapsed (validation clean accuracy at "
                f"chance), {failed} failed, {len(rows) - collapsed - failed} reported no validation result")
    return f"no usable trial: {failed} of {len(rows)} trials failed, the others reported no validation result"


def read_summary(search_dir: str | Location) -> dict[str, Any] | None:
    """A search's summary.json, or None before the search finished."""
    path = location(search_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def no_winner(search_dir: str | Location) -> str | None:
    """Why a search named no best trial (its summary's `no_winner`), or None when it has one."""
    summary = read_summary(search_dir)
    if summary is None:
        return f"the search has not finished ({location(search_dir) / SUMMARY_FILE} is missing)"
    return None if summary.get("best") else summary.get("no_winner", "no usable trial")


def format_summary(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    params = sorted({k for r in rows for k in r if k.startswith("param.")})
    lines = [f"search of {summary['defense']}: {summary['trials']} trials {summary['statuses']}, "
             f"{summary['wall_s']:.0f}s wall, {summary['worker_s']:.0f} worker-seconds, "
             f"{summary['overhead_share']:.0%} of trial slots outside training epochs",
             "  trial      status         epochs  best val PGD  val clean  " + "  ".join(p[6:] for p in params)]
    def show(value: Any, spec: str = "") -> str:
        return "-" if value is None else format(value, spec) if isinstance(value, float) and spec else str(value)

    for r in sorted(rows, key=lambda r: -(r["best.objective"] if r["best.objective"] is not None else -9)):
        values = "  ".join(show(r.get(p), ".4g") for p in params)
        lines.append(f"  {show(r['trial_id']):<10} {r['status']:<14} {r['epochs_run']:>6}  "
                     f"{show(r[f'best.{ROBUST_METRIC}'], '.4f'):>12}  {show(r[f'final.{CLEAN_METRIC}'], '.4f'):>9}  "
                     f"{values}" + (f"  ({r['error']})" if r.get("error") else "")
                     + (f"  [{r['diagnostics']}]" if r.get("diagnostics") else ""))
    best = summary.get("best")
    if best:
        lines.append(f"best: trial {best['trial_id']} ({format_params(best['params'])}) "
                     f"val PGD {best['metrics']['val_pgd_acc']:.4f}")
    else:
        lines.append(f"NO WINNER: {summary['no_winner']}")
    if summary.get("collapsed_trials"):
        lines.append(f"collapsed (model at chance, never the winner): {', '.join(summary['collapsed_trials'])}")
    if "pareto_front" in summary:
        lines.append(f"Pareto front (val PGD vs val clean): {', '.join(summary['pareto_front'])}")
    return "\n".join(lines)


def refit_best(summary: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Retrain the best config on training + validation data and run the final evaluation on test."""
    from robustune.training import run_training

    data = merge(summary["best_config"], {"data": {"val_size": 0}, "eval": {"enabled": True},
                                          "train": {"epochs": summary["refit_epochs"]},
                                          "tracking": {"run_name": None}})
    data = apply_override(data, ["tracking", "output_dir"], str(location(summary["search_dir"]) / "refit"))
    log(f"refit: training the best config on training + validation data for {data['train']['epochs']} epochs")
    outcome = run_training(resolve_config(data), log=log, extra_tags={"kind": "refit",
                                                                       "search_run_id": summary["parent_run_id"]})
    from robustune import tracking

    tracking.set_tag(summary["tracking_uri"], summary["parent_run_id"], "refit_run_id", outcome.run_id)
    return {"run_id": outcome.run_id, "report": outcome.report}
