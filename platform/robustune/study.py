"""Studies: several defenses trained, tuned and evaluated the same way, then compared on one leaderboard.

A study definition is YAML (`search_spaces/studies/<name>.yaml`; `default.yaml` when none is given):

    name: default
    dataset: fashion-mnist        # data.name
    model: small_cnn              # model.name
    epsilon: 0.1
    epochs: 4                     # training epochs of every final run
    seeds: [0, 1]                 # every final run is repeated over these seeds
    base: {data: {train_subset: 4000}}    # any other run setting shared by every defense
    evaluation: {protocol: quick, points: 500, workers: 2}   # EvalConfig fields; points per seed: seed k is
                                  # attacked on test points k*500..(k+1)*500 (seed_slices: false: all on the same);
                                  # checks: true (every model), false, or first_seed (each defense's first seed)
    search: {samples: 4, epochs: 2}       # defaults of every searched defense
    featured: las_at              # the headline compares this entry with the best baseline at equal budget
    defenses:
      - {defense: las_at}                               # its own defaults, not tuned
      - {defense: pgd, tune: true, budget: las_at}      # search compute capped at LAS-AT's training compute
      - {defense: eae, tune: true, init_from: standard} # warm start from the `standard` entry (same seed)
      - {defense: standard}

Entry keys: defense, label (default: the defense, plus " (tuned)" when tuned), tune, set (run settings for
this entry, dotted keys), space (a search-space file), samples, epochs (per trial), searcher, scheduler,
budget (label of an untuned entry), init_from (label of an untuned entry).

How it runs (every stage resumes: `robustune study --resume STUDY_DIR`):
  1. untuned entries, every seed: training runs on Ray Train, several at once through Ray Tune;
  2. each tuned entry: a search on validation data (`robustune.search`), its compute capped by `budget`;
  3. tuned entries, every seed: the best config retrained (same data, same model selection as untuned ones);
     refits far below the trial that chose their config, or with a failed run, get the next-best config
     refitted too, and the entry keeps the one with fewer failed runs, then the better on validation
     (`_refit_next_best_if_short`);
  4. every final run evaluated on the test split by the study's protocol, several at once (a Ray task each),
     each as soon as its run is trained: beside the stages still training, so slots do not idle (`Evaluations`);
  5. the leaderboard (`robustune.leaderboard`): Markdown, CSV, Parquet, two plots, on the study's MLflow run.
Trials and final runs train on the training split and select their epoch on the validation split; the
test split is touched only in stage 4.

A search that names no winner (every trial collapsed to chance accuracy, or failed: robustune.search) fails its
entry, loudly, and the study goes on: the entry is not retrained with some fallback config (that would rank a
defense by settings the search rejected). The study's log and MLflow parent run (tag `no_winner/<entry>`) say
so, and so does the entry's leaderboard row (no numbers, the reason in its diagnostics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml
from ray.tune import Callback

from robustune import progress
from robustune.config import ConfigError, EvalConfig, apply_override, build_dataclass, merge
from robustune.resolve import resolve_config
from robustune.study_state import (DEFINITION_FILE, FIRST_SEED, Entry, RunRecord, SearchRecord, Study, StudyState,
                                   is_study_dir)
from robustune.run import FINAL_MODEL_FILE, finished_report, run_id_of, train_seconds_spent
from robustune.storage import Location, check_nodes_see, check_storage, location, output_root, ray_storage
from robustune.trials import (TrialOutcomes, TrialPlan, TrialProgress, TrialRun, first_error_line, trainable,
                              tune_failures)

SEED_SLICES = "seed_slices"  # evaluation key: each seed attacked on its own test slice (default true)
STUDY_KEYS = {"name", "description", "dataset", "model", "epsilon", "epochs", "seeds", "base", "evaluation",
              "search", "defenses", "featured", "max_concurrent"}
ENTRY_KEYS = {"defense", "label", "tune", "set", "space", "samples", "epochs", "searcher", "scheduler", "budget",
              "init_from"}
SEARCH_KEYS = {"samples", "epochs", "searcher", "scheduler", "grace_period", "reduction_factor", "objective",
               "min_clean", "seed", "grid_points"}


def default_study_path() -> Path:
    return Path(str(resources.files("robustune.search_spaces") / "studies" / "default.yaml"))


def load_study(path: str | Path | None = None, overrides: list[str] | None = None) -> Study:
    """Read and validate a study definition; every problem is a ConfigError naming the file and the key."""
    from robustune.config import parse_override

    path = Path(path) if path else default_study_path()
    if not path.is_file():
        raise ConfigError(f"study definition {path} does not exist (the shipped ones are in "
                          f"{default_study_path().parent})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"study definition {path} is not valid YAML: {error}") from error
    where = f"study definition {path}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(STUDY_KEYS)}")
    unknown = sorted(set(data) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("name", "defenses"):
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")

    base = dict(data.get("base") or {})
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base must be a mapping of run settings")
    for key, parts in (("dataset", ["data", "name"]), ("model", ["model", "name"]), ("epsilon", ["epsilon"]),
                       ("epochs", ["train", "epochs"])):
        if key in data:
            base = apply_override(base, parts, data[key])
    for text in overrides or []:
        base = apply_override(base, *parse_override(text))
    name = str(data["name"])
    base = merge(base, {"study": name, "eval": {"enabled": False}})

    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    evaluation = dict(data.get("evaluation") or {})
    seed_slices = evaluation.get(SEED_SLICES, True)
    if not isinstance(seed_slices, bool):
        raise ConfigError(f"{where}: evaluation.{SEED_SLICES} must be true or false, got {seed_slices!r}")
    if "first_point" in evaluation:
        raise ConfigError(f"{where}: evaluation.first_point is set by the study (each seed's slice, see "
                          f"evaluation.{SEED_SLICES}); drop it")
    checks = evaluation.get("checks", True)
    if not (isinstance(checks, bool) or checks == FIRST_SEED):
        raise ConfigError(f"{where}: evaluation.checks must be true (gradient-masking checks on every model), false "
                          f"or {FIRST_SEED} (on each defense's first seed), got {checks!r}")
    try:
        eval_config = build_dataclass(EvalConfig, seed_evaluation_settings(evaluation, checked=True), "evaluation")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error
    test_points = base.get("data", {}).get("test_subset")
    wanted = eval_config.points * (len(seeds) if seed_slices else 1)
    if eval_config.protocol != "full" and test_points is not None and wanted > test_points:
        raise ConfigError(f"{where}: evaluation needs {wanted} test points ({eval_config.points} per seed"
                          + (f" x {len(seeds)} seeds, each its own slice" if seed_slices else "")
                          + f") but data.test_subset is {test_points}: lower evaluation.points or raise test_subset")
    search_defaults = dict(data.get("search") or {})
    unknown = sorted(set(search_defaults) - SEARCH_KEYS)
    if unknown:
        raise ConfigError(f"{where}: search: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SEARCH_KEYS))}")

    entries = [_parse_entry(raw, i, where, search_defaults) for i, raw in enumerate(data["defenses"] or [])]
    if not entries:
        raise ConfigError(f"{where}: defenses is empty")
    labels = [e.label for e in entries]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"{where}: two defenses share the label {duplicates[0]!r}; give one a `label`")
    untuned = {e.label for e in entries if not e.tune}
    for entry in entries:
        for key in ("budget", "init_from"):
            target = getattr(entry, key)
            if target is not None and target not in untuned:
                raise ConfigError(f"{where}: defense {entry.label!r}: {key}: {target!r} is not the label of an "
                                  f"untuned defense of this study (untuned: {', '.join(sorted(untuned)) or 'none'})")
    featured = data.get("featured")
    if featured is not None and featured not in labels:
        raise ConfigError(f"{where}: featured: {featured!r} is not a defense label of this study")
    study = Study(name=name, description=str(data.get("description", "")).strip(), source=str(path), base=base,
                  seeds=seeds, evaluation=evaluation, entries=entries, featured=featured,
                  max_concurrent=data.get("max_concurrent"))
    _check_runs_resolve(study, where)
    return study


def _parse_entry(raw: Any, index: int, where: str, search_defaults: dict[str, Any]) -> Entry:
    from robustune.defense import list_defenses

    if isinstance(raw, str):
        raw = {"defense": raw}
    if not isinstance(raw, dict) or "defense" not in raw:
        raise ConfigError(f"{where}: defenses[{index}] must be a mapping with a `defense` key, got {raw!r}")
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: defenses[{index}] ({raw['defense']}): unknown key {unknown[0]!r}; allowed: "
                          f"{', '.join(sorted(ENTRY_KEYS))}")
    defense = raw["defense"]
    if defense not in list_defenses():
        raise ConfigError(f"{where}: defenses[{index}]: unknown defense {defense!r}; known: "
                          f"{', '.join(list_defenses())}")
    tune = bool(raw.get("tune", False))
    overrides: dict[str, Any] = {}
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: defenses[{index}] ({defense}): set must map dotted keys to values")
    for key, value in settings.items():
        overrides = apply_override(overrides, str(key).split("."), value)
    search = {**search_defaults, **{k: raw[k] for k in ("samples", "epochs", "searcher", "scheduler") if k in raw}}
    search_only = [k for k in ("samples", "epochs", "searcher", "scheduler", "space", "budget") if k in raw]
    if not tune and search_only:
        raise ConfigError(f"{where}: defenses[{index}] ({defense}): {search_only[0]} only applies to a searched "
                          "defense; add tune: true")
    label = str(raw.get("label") or (f"{defense} (tuned)" if tune else defense))
    return Entry(defense=defense, label=label, tune=tune, overrides=overrides, space=raw.get("space"),
                 search=search, budget=raw.get("budget"), init_from=raw.get("init_from"))


def _check_runs_resolve(study: Study, where: str) -> None:
    """Every final run and every search must make a valid config before anything starts."""
    from robustune.data import check_available
    from robustune.search import SearchSettings
    from robustune.search_space import check_samples_resolve, load_space

    for entry in study.entries:
        data = study.run_config(entry, study.seeds[0])
        try:
            config = resolve_config(data)
        except ConfigError as error:
            raise ConfigError(f"{where}: defense {entry.label!r}: {error}") from error
        if entry.tune:
            space_path = _space_path(entry, study)
            try:
                SearchSettings(defense=entry.defense, space_file=space_path, **entry.search).check()
                space = load_space(entry.defense, space_path)
                check_samples_resolve(space, data)
            except (ConfigError, TypeError) as error:
                raise ConfigError(f"{where}: defense {entry.label!r}: {error}") from error
        check_available(config.data.name, config.data.data_dir, config.data.download)


def _space_path(entry: Entry, study: Study) -> str | None:
    """A relative `space:` is looked up next to the study file, then in the shipped spaces."""
    if entry.space is None:
        return None
    candidates = [Path(study.source).parent / entry.space, Path(entry.space),
                  Path(str(resources.files("robustune.search_spaces"))) / entry.space]
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


# --------------------------------------------------------------------------------------------- running
def start_study(study: Study, log: Callable[[str], None] = print,
                detail: Callable[[str], None] | None = None) -> Location:
    """Create the study folder and its MLflow parent run, then run every stage. `log` gets the study's lines,
    `detail` each evaluation's own (default: `log` too)."""
    from robustune import tracking
    from robustune.cluster import check_cluster_fits, ensure_ray, share_cpus

    config = resolve_config(study.base)
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    output_dir = output_root(config.tracking.output_dir)
    check_storage(output_dir)  # an object store that does not answer, or has no such bucket, before Ray starts
    instance = f"study-{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    study_dir = output_dir / instance
    if study_dir.exists():
        raise ConfigError(f"study folder {study_dir} already exists; continue it with --resume {study_dir}")
    ensure_ray(meanwhile=lambda: tracking.load_modules(uri))  # MLflow loads while Ray starts
    check_cluster_fits(config)  # every run of the study has the base's resources
    check_nodes_see(output_dir)
    # Runs at once, and CPUs per worker so that many fit: fixed now, so a resumed study places runs alike.
    slots = share_cpus(config, study.max_concurrent)
    study.base = apply_override(study.base, ["resources", "cpus_per_worker"], config.resources.cpus_per_worker)
    config.study = instance
    config.tracking.tracking_uri, config.tracking.output_dir = uri, str(output_dir)
    parent_run_id = tracking.create_run(config, instance, extra_tags={"kind": "study", "study_name": study.name},
                                        display_name=f"study {study.name}")
    tracking.log_params(uri, parent_run_id, {"study.seeds": study.seeds, "study.source": study.source,
                                             "study.defenses": [e.label for e in study.entries]})
    tracking.log_text(uri, parent_run_id, Path(study.source).read_text(), "study/study.yaml")
    study_dir.mkdir(parents=True)
    (study_dir / DEFINITION_FILE).write_text(Path(study.source).read_text())
    StudyState(path=study_dir, instance=instance, study=study, parent_run_id=parent_run_id, tracking_uri=uri,
               output_dir=str(output_dir), started=time.time(), slots=slots).save()
    log(f"study {instance}: {len(study.entries)} defenses x {len(study.seeds)} seed(s), {slots} run(s) at once; "
        f"MLflow parent run {parent_run_id} at {tracking.redact_uri(uri)}")
    log(f"study folder {study_dir} (continue an interrupted study with: robustune study --resume {study_dir})")
    return run_stages(study_dir, log, detail)


def resume_study(study_dir: str | Location, log: Callable[[str], None] = print,
                 detail: Callable[[str], None] | None = None) -> Location:
    from robustune import tracking
    from robustune.cluster import ensure_ray

    study_dir = location(study_dir).resolve()
    check_storage(study_dir.parent)
    if not is_study_dir(study_dir):
        raise ConfigError(f"--resume {study_dir}: not a robustune study folder (no study.json); pass the folder "
                          "`robustune study` printed at its start")
    ensure_ray()
    check_nodes_see(study_dir.parent)
    state = StudyState.load(study_dir)
    tracking.set_status(state.tracking_uri, state.parent_run_id, "RUNNING")
    log(f"resuming study {state.instance} (MLflow parent run {state.parent_run_id})")
    return run_stages(study_dir, log, detail)


def run_stages(study_dir: Location, log: Callable[[str], None],
               detail: Callable[[str], None] | None = None) -> Location:
    from robustune import leaderboard, tracking
    from robustune.search import no_winner

    started = time.time()
    state = StudyState.load(study_dir)
    study = state.study
    uri, parent = state.tracking_uri, state.parent_run_id
    shown = progress.current()
    global _live_evaluations
    evaluations = _live_evaluations = Evaluations(state, log, detail or log)
    seeds, slots = len(study.seeds), state.slots
    untuned = [e for e in study.entries if not e.tune]
    tuned = [e for e in study.entries if e.tune]
    # What is still to come after each stage, for the display's estimate of the time left.
    searches = [(int(e.search.get("samples", 8)), "trial", slots) for e in tuned]

    def evaluated() -> int:  # evaluations done (some run beside the training stages, or before a resume)
        return sum(r.evaluation is not None for r in state.runs.values())

    def testing() -> tuple[int, str, int]:  # the evaluations still to do
        return len(study.entries) * seeds - evaluated(), "evaluation", slots

    try:
        evaluations.poll(force=True)  # a resumed study's trained runs still to evaluate
        shown.plan([*searches, (len(tuned) * seeds, "run", slots), testing()])
        _train_final_runs(state, untuned, {}, log,
                          stage=(1, f"{len(untuned)} untuned defense(s) x {seeds} seed(s)"))
        for index, entry in enumerate(tuned):
            evaluations.poll(force=True)
            shown.plan(searches[index + 1:] + [(len(tuned) * seeds, "run", slots), testing()])
            log(f"[study] stage 2/5: search for {entry.label}")
            _search(state, entry, log, stage=(2, 5, f"search for {entry.label} ({index + 1} of {len(tuned)})"))
        evaluations.poll(force=True)
        lost = {e.label: reason for e in tuned if (reason := no_winner(state.searches[e.label].search_dir))}
        tuned = [e for e in tuned if e.label not in lost]
        shown.plan([testing()])
        for label, reason in lost.items():
            log(f"[study] {label} FAILED: its search named no winner ({reason}); not retrained, no leaderboard "
                "numbers")
        _train_final_runs(state, tuned, {e.label: state.searches[e.label].best_params for e in tuned}, log,
                          stage=(3, f"{len(tuned)} tuned defense(s) retrained with their best config x {seeds} "
                                    "seed(s)"))
        for entry in tuned:
            _refit_next_best_if_short(state, entry, log)
        shown.plan([])
        log("[study] stage 4/5: evaluation on the test split")
        shown.stage(4, 5, "evaluation on the test split", units=len(state.runs), kind="evaluation",
                    at_once=slots, done=evaluated(), ranked=False)
        evaluations.finish()
        state.wall_s += time.time() - started
        started = time.time()
        usage = utilization(state)
        state.save()
        log("[study] stage 5/5: leaderboard")
        shown.stage(5, 5, "leaderboard", units=1, kind="leaderboard", ranked=False)
        table = leaderboard.build(study_dir, log=log)
    except BaseException:
        evaluations.cancel()
        state.wall_s += time.time() - started
        state.save()
        tracking.set_status(uri, parent, "FAILED")
        raise
    finally:
        _live_evaluations = None
        shown.close()  # the summary below is the last thing printed
    tracking.log_metrics(uri, parent, {"study/utilization": usage["utilization"], "study/wall_s": state.wall_s,
                                       "study/busy_worker_s": usage["busy_s"]}, step=0)
    tracking.set_status(uri, parent, "FINISHED")
    log(f"study finished: {state.wall_s:.0f}s of wall time ({len(table)} leaderboard rows); MLflow parent run "
        f"{parent}")
    log(f"  utilization {usage['utilization']:.0%}: {usage['busy_s']:.0f} busy worker-seconds (training epochs "
        f"{usage['training_s']:.0f}, search trials {usage['search_s']:.0f}, evaluation {usage['evaluation_s']:.0f}) "
        f"of {state.wall_s:.0f}s x {state.slots} slot(s)")
    experiment = tracking.client(uri).get_run(parent).info.experiment_id
    log(f"  leaderboard: {study_dir / leaderboard.FOLDER / 'leaderboard.md'}; report to share: "
        f"{study_dir / leaderboard.FOLDER / leaderboard.HTML_FILE}")
    if uri.startswith(("http://", "https://")):  # a tracking server shows it itself
        log(f"  MLflow: {tracking.ui_link(tracking.redact_uri(uri), experiment, parent)}")
    else:
        log(f"  MLflow: mlflow ui --backend-store-uri {tracking.redact_uri(uri)}   then open "
            f"{tracking.ui_link('http://127.0.0.1:5000', experiment, parent)}")
    return study_dir


def _train_seconds(record: RunRecord) -> float:
    """Seconds a final run spent inside training epochs; a failed run's up to its last checkpoint."""
    return record.training["train_seconds"] if record.training else train_seconds_spent(record.run_dir)


def utilization(state: StudyState) -> dict[str, float]:
    """Busy worker-seconds (training epochs of final runs, failed ones' too, and of search trials, and evaluation)
    over the study's wall time x its slots. An evaluation counts its wall time x the workers' shares it held (one;
    one recorded without them ran in the driver while its AutoAttack shards filled every slot)."""
    from robustune.leaderboard import search_compute

    workers = resolve_config(state.study.base).resources.num_workers
    training_s = sum(_train_seconds(r) * workers for r in state.runs.values())
    search_s = sum(search_compute(s.search_dir)[1] for s in state.searches.values())
    evaluation_s = sum((r.evaluation_s or 0.0) * (r.evaluation_slots or state.slots) for r in state.runs.values())
    busy = training_s + search_s + evaluation_s
    return {"utilization": busy / max(state.wall_s * state.slots, 1e-9), "busy_s": busy, "training_s": training_s,
            "search_s": search_s, "evaluation_s": evaluation_s}


NEXT_BEST = "next-best"  # the run folders and MLflow tag of a next-best config's refits
UNUSED_REFIT = "study_refit_unused"  # MLflow `kind` of the refits an entry did not keep


def _final_run_dir(state: StudyState, entry: Entry, seed: int, variant: str | None = None) -> Location:
    return state.path / "runs" / (f"{entry.slug}-{variant}-seed{seed}" if variant else f"{entry.slug}-seed{seed}")


def _entry_config(state: StudyState, entry: Entry, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    data = state.study.run_config(entry, seed)
    for key, value in params.items():
        data = apply_override(data, key.split("."), value)
    if entry.init_from is not None:
        source = _final_run_dir(state, state.study.entry(entry.init_from), seed)
        data = apply_override(data, ["train", "init_from"], str(source / FINAL_MODEL_FILE))
    return merge(data, {"study": state.instance, "tracking": {"tracking_uri": state.tracking_uri}})


@dataclass
class StudyPlan(TrialPlan):
    """Study runs as Tune trials: trial `index` trains runs[index]."""

    runs: list[TrialRun]
    labels: list[str]  # "<label> seed <seed>", for progress lines

    def trial_run(self, params: dict[str, Any], trial_id: str) -> TrialRun:
        return self.runs[params["index"]]


def _train_final_runs(state: StudyState, entries: list[Entry], best: dict[str, dict[str, Any]],
                      log: Callable[[str], None], stage: tuple[int, str]) -> None:
    runs, labels = [], []
    for entry in entries:
        for seed in state.study.seeds:
            run_dir = _final_run_dir(state, entry, seed)
            data = _entry_config(state, entry, seed, best.get(entry.label, {}))
            data = merge(data, {"tracking": {"output_dir": str(run_dir.parent), "run_name": run_dir.name}})
            record = state.runs.get(f"{entry.label}|{seed}") or RunRecord(entry.label, entry.defense, seed,
                                                                           str(run_dir))
            state.runs[record.key] = record
            if finished_report(run_dir) is None:  # else: finished before an interruption
                runs.append(TrialRun(run_dir, data, state.parent_run_id,
                                     {"kind": "study_run", "study_entry": entry.label},
                                     display_name=f"{entry.label} seed {seed}"))
                labels.append(f"{entry.label} seed {seed}")
    number, name = stage
    total = len(entries) * len(state.study.seeds)
    log(f"[study] stage {number}/5: {name}")
    progress.current().stage(number, 5, name, units=total, kind="run", at_once=state.slots,
                             done=total - len(runs))
    if runs:
        run_many(StudyPlan(runs=runs, labels=labels), state, log)
    for entry in entries:
        for seed in state.study.seeds:
            # Keep what a resumed study already knows of this run (its evaluation, above all).
            record = state.runs[f"{entry.label}|{seed}"]
            record.run_id = record.run_id or run_id_of(record.run_dir)
            record.training = finished_report(record.run_dir)
            record.failed = record.training is None
            if record.failed:
                log(f"[study] {entry.label} seed {seed} failed (see its run folder {record.run_dir}); "
                    "the study goes on")
    state.save()


class StudyProgress(TrialProgress):
    """The study's training runs on the progress display, and a line as each ends (robustune.trials)."""

    prefix = "study"

    def __init__(self, labels: list[str]):
        super().__init__()
        self.labels = labels

    def name(self, trial) -> str:
        return self.labels[trial.config["index"]]

    def what(self, trial) -> str:
        return self.labels[trial.config["index"]]


def _refit_next_best_if_short(state: StudyState, entry: Entry, log: Callable[[str], None]) -> None:
    """A config is judged on its search trials; when its refits end far below the trial that chose it on
    validation PGD (leaderboard.REFIT_SHORTFALL: the final runs did not reproduce what the search saw, e.g.
    trials shorter than the final runs, or one lucky seed), or when any of them failed (e.g. a non-finite loss:
    a config at the edge of divergence can win its search on the one seed it survived), the search's next-best
    config (the best trial with other knobs) is refitted on every seed too, and the entry keeps the config whose
    final runs failed less often, then the one whose runs score higher on validation PGD (mean over the finished
    seeds; the test split plays no part). Once per entry: the decision is saved
    (SearchRecord.next_best, refit_checked), so a resumed study neither repeats nor forgets it, and the entry's
    runs are evaluated only after it (no unused run is tested); the unused runs keep their folders and MLflow
    runs (tag kind=study_refit_unused, named "... (unused refit)") and their compute (a failed one's up to its last
    checkpoint) counts in the entry's total."""
    from robustune import tracking
    from robustune.leaderboard import refit_shortfall
    from robustune.search import format_params, next_best, read_summary

    search = state.searches[entry.label]
    if search.refit_checked:
        return
    chosen_on = ((read_summary(search.search_dir) or {}).get("best") or {}).get("metrics", {}).get("val_pgd_acc")
    winner_runs = sorted(state.runs_of(entry.label), key=lambda r: r.seed)
    winner_score = _mean_validation_pgd(state, winner_runs)
    winner_failed = _failed_count(winner_runs)
    failures = (f"{winner_failed} of its {len(winner_runs)} final runs failed (see their errors)"
                if winner_failed else None)
    shortfall = "; ".join(filter(None, [refit_shortfall(winner_score, chosen_on), failures])) or None
    runner_up = next_best(search.search_dir) if shortfall else None
    if shortfall and runner_up is None:
        log(f"[study] {entry.label}: {shortfall}; its search has no other config to refit")
    if runner_up is None:
        search.refit_checked = True
        state.save()
        return
    log(f"[study] {entry.label}: {shortfall}; refitting the next-best config ({format_params(runner_up['params'])}; "
        f"its trial {runner_up['trial_id']}: validation PGD {runner_up['val_pgd_acc']:.3f}) on every seed")
    records, runs, labels = [], [], []
    for seed in state.study.seeds:
        run_dir = _final_run_dir(state, entry, seed, NEXT_BEST)
        records.append(RunRecord(entry.label, entry.defense, seed, str(run_dir)))
        if finished_report(run_dir) is None:
            data = _entry_config(state, entry, seed, runner_up["params"])
            data = merge(data, {"tracking": {"output_dir": str(run_dir.parent), "run_name": run_dir.name}})
            runs.append(TrialRun(run_dir, data, state.parent_run_id,
                                 {"kind": "study_run", "study_entry": entry.label, "refit": NEXT_BEST},
                                 display_name=f"{entry.label} seed {seed} ({NEXT_BEST} config)"))
            labels.append(f"{entry.label} seed {seed} ({NEXT_BEST} config)")
    if runs:
        progress.current().stage(3, 5, f"{entry.label}: next-best config refitted", units=len(records), kind="run",
                                 at_once=state.slots, done=len(records) - len(runs))
        run_many(StudyPlan(runs=runs, labels=labels), state, log)
    for record in records:
        record.run_id, record.training = run_id_of(record.run_dir), finished_report(record.run_dir)
        record.failed = record.training is None
    runner_up_score = _mean_validation_pgd(state, records)
    runner_up_failed = _failed_count(records)
    if runner_up_failed != winner_failed:  # a config that trains on more seeds wins, whatever its mean
        kept = runner_up_failed < winner_failed and runner_up_score is not None
    else:
        kept = runner_up_score is not None and (winner_score is None or runner_up_score > winner_score)
    unused = winner_runs if kept else records
    workers = resolve_config(state.study.base).resources.num_workers
    search.next_best = {**runner_up, "winner_refit_val_pgd": winner_score, "refit_val_pgd": runner_up_score,
                        "winner_failed": winner_failed, "refit_failed": runner_up_failed,
                        "kept": kept, "unused_train_s": sum(_train_seconds(r) * workers for r in unused)}
    for record in unused:  # in the MLflow UI: not a final run, and named so
        if record.run_id:
            tracking.set_tag(state.tracking_uri, record.run_id, "kind", UNUSED_REFIT)
            name = tracking.client(state.tracking_uri).get_run(record.run_id).info.run_name
            tracking.set_tag(state.tracking_uri, record.run_id, "mlflow.runName", f"{name} (unused refit)")
    if kept:
        for record in records:
            state.runs[record.key] = record
    search.refit_checked = True
    state.save()
    log(f"[study] {entry.label}: refits' mean validation PGD: winner {_format_score(winner_score)} "
        f"({winner_failed} failed), next-best {_format_score(runner_up_score)} ({runner_up_failed} failed); the "
        f"entry keeps the {'next-best' if kept else 'winner'}'s runs")


def _failed_count(records: list[RunRecord]) -> int:
    """Final runs that ended without a report (a failed training, e.g. a non-finite loss)."""
    return sum(1 for r in records if r.failed or not r.training)


def _mean_validation_pgd(state: StudyState, records: list[RunRecord]) -> float | None:
    """Mean validation PGD accuracy, at the epoch each run deployed, of the finished runs among `records`."""
    from robustune import tracking
    from robustune.leaderboard import validation_pgd

    client = tracking.client(state.tracking_uri)
    scores = [validation_pgd(client, r.run_id, r.training.get("selected_epoch")) for r in records
              if r.training and r.run_id]
    scores = [score for score in scores if score is not None]
    return sum(scores) / len(scores) if scores else None


def _format_score(score: float | None) -> str:
    return "none (no finished run)" if score is None else f"{score:.3f}"


def run_many(plan: StudyPlan, state: StudyState, log: Callable[[str], None]) -> None:
    """Run independent trainings, `state.slots` at a time, as Ray Tune trials in reused trial actors (a failed
    one does not stop the others; each keeps its own run folder, so an interrupted batch resumes run by run)."""
    from ray import tune

    config = resolve_config(plan.runs[0].config)
    tuner = tune.Tuner(trainable(plan, config), param_space={"index": tune.grid_search(list(range(len(plan.runs))))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=state.slots, reuse_actors=True),
                       run_config=tune.RunConfig(name=f"runs-{time.strftime('%H%M%S')}",
                                                 **ray_storage(state.path / "tune"), verbose=0,
                                                 callbacks=[StudyProgress(plan.labels),
                                                            TrialOutcomes(plan, state.tracking_uri),
                                                            EvaluateWhenTrained()],
                                                 failure_config=tune.FailureConfig(max_failures=tune_failures(config))))
    log(f"[study] {len(plan.runs)} training run(s), {state.slots} at a time: " + ", ".join(plan.labels))
    tuner.fit()


def _search(state: StudyState, entry: Entry, log: Callable[[str], None], stage: tuple[int, int, str]) -> None:
    import json

    from robustune.search import SEARCH_FILE, SUMMARY_FILE, SearchSettings, resume_search, start_search

    search_dir = state.path / "searches" / entry.slug
    if (search_dir / SUMMARY_FILE).is_file():
        summary = json.loads((search_dir / SUMMARY_FILE).read_text())
    elif (search_dir / SEARCH_FILE).is_file():
        summary = resume_search(search_dir, log=log, stage=stage)
    else:
        budget_s = None
        if entry.budget is not None:
            budget_s = _training_compute(state, entry.budget)
            log(f"[study] {entry.label}: search budget = {entry.budget}'s training compute, "
                f"{budget_s:.0f} worker-seconds (mean over seeds)")
        settings = SearchSettings(defense=entry.defense, space_file=_space_path(entry, state.study),
                                  budget_s=budget_s, **{"max_concurrent": state.slots, **entry.search})
        data = _entry_config(state, entry, state.study.seeds[0], {})
        data = merge(data, {"tracking": {"output_dir": str(search_dir.parent), "run_name": search_dir.name}})
        summary = start_search(settings, data, log=log, parent_run_id=state.parent_run_id,
                               extra_tags={"study_entry": entry.label}, callbacks=[EvaluateWhenTrained()],
                               stage=stage)
    best = summary.get("best")
    if not best:  # the entry fails (see the module docstring); the record keeps its search compute
        from robustune import tracking

        log(f"[study] {entry.label}: the search named no winner: {summary.get('no_winner')}; see "
            f"{search_dir}/results.parquet")
        tracking.set_tag(state.tracking_uri, state.parent_run_id, f"no_winner/{entry.slug}",
                         str(summary.get("no_winner"))[:5000])
    previous = state.searches.get(entry.label)  # a resumed study keeps what it decided after the refits
    state.searches[entry.label] = SearchRecord(search_dir=str(search_dir), parent_run_id=summary["parent_run_id"],
                                               best_params=best["params"] if best else {},
                                               budget_s=summary.get("budget_s"), trials=summary["trials"],
                                               next_best=previous.next_best if previous else None,
                                               refit_checked=previous.refit_checked if previous else False)
    state.save()


def _training_compute(state: StudyState, label: str) -> float:
    """Mean training compute (worker-seconds inside epochs) of an untuned entry's finished runs."""
    workers = resolve_config(state.study.base).resources.num_workers
    values = [r.training["train_seconds"] * workers for r in state.runs_of(label) if r.training]
    if not values:
        raise ConfigError(f"no finished run of {label!r} to take a compute budget from")
    return sum(values) / len(values)


def seed_evaluation(study: Study, seed: int) -> dict[str, Any]:
    """The evaluation settings of one seed's runs. With seed slices (the default) seed k of the study is
    attacked on its own slice of the test set, points k*N to (k+1)*N, the same slice for every defense: the
    seeds together cover seeds x N points (so the rows' intervals narrow) and every comparison stays paired."""
    settings = seed_evaluation_settings(study.evaluation, checked=seed == study.seeds[0])
    if study.evaluation.get(SEED_SLICES, True) and settings.get("protocol", "quick") != "full":
        points = settings.get("points", EvalConfig.points)
        settings["first_point"] = study.seeds.index(seed) * points
    return settings


def seed_evaluation_settings(evaluation: dict[str, Any], *, checked: bool) -> dict[str, Any]:
    """The study's evaluation settings as EvalConfig fields, for a seed whose model is `checked` by the
    gradient-masking checks when `checks: first_seed` (masking is a property of a defense's training, which every
    seed shares, and the checks cost up to a third of an evaluation)."""
    settings = {k: v for k, v in evaluation.items() if k != SEED_SLICES}
    if settings.get("checks") == FIRST_SEED:
        settings["checks"] = checked
    return settings


# The study's evaluations while its stages run (set by run_stages): Tune pickles its callbacks with its state, so
# the callback below reaches them through this module rather than holding them.
_live_evaluations: Evaluations | None = None


class Evaluations:
    """Stage 4: every final run evaluated on the test split, each as soon as its training has ended (a tuned
    entry's once its refits were compared with their trial), beside the stages still training (the untuned runs
    are evaluated while the searches run, say), so no slot idles while a stage waits for its last run. At most
    `state.slots` evaluations at once, each a Ray task holding what one worker of a run holds
    (`_evaluation_resources`), so on a cluster they spread over nodes; Ray gives each a
    slot as one frees up (Tune keeps a trial's slot for its next trial while it has one, so training goes
    first). The driver records each evaluation as it ends and saves the state, so an interrupted study keeps
    it; `detail` gets the evaluation's own lines then (together), `log` one line. After a failed evaluation no
    new one starts: training goes on, those running finish and are kept, then `finish` raises its error (a
    resumed study retries it)."""

    POLL_EVERY_S = 2.0  # how often a training stage's Tune loop looks in on the evaluations

    def __init__(self, state: StudyState, log: Callable[[str], None], detail: Callable[[str], None]):
        import ray

        from robustune.evaluate_run import evaluate_in_task

        self.state, self.log, self.detail = state, log, detail
        self.task = ray.remote(evaluate_in_task)
        self.running: dict[Any, RunRecord] = {}  # task -> its run
        self.failure: Exception | None = None
        self.counted = False  # on the progress display's stage 4 (before it, evaluations only print lines)
        self.polled = 0.0

    def poll(self, force: bool = False) -> None:
        """Record the evaluations that ended and start those whose run has finished training, without waiting."""
        import ray

        if not force and time.time() - self.polled < self.POLL_EVERY_S:
            return
        self.polled = time.time()
        if self.running:
            done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
            for ref in done:
                self._record(ref)
        self._start()
        self._show_beside()

    def finish(self) -> None:
        """Start every evaluation still to do and wait for all of them; raise the first failure."""
        import ray

        self.counted = True
        progress.current().beside("evaluation", 0)  # from here they are the stage's own units
        for record in self.running.values():
            progress.current().unit_started(f"{record.label} seed {record.seed}")
        self._start()
        while self.running:
            [done], _ = ray.wait(list(self.running), num_returns=1)
            self._record(done)
            self._start()
        if isinstance(self.failure, ray.exceptions.RayTaskError) and self.failure.cause is not None:
            # The evaluation's own exception, as when it ran in the driver (the CLI reports a ConfigError, say).
            raise self.failure.cause from self.failure
        if self.failure is not None:
            raise self.failure

    def cancel(self) -> None:
        """An interrupted driver leaves no evaluation running."""
        import ray

        for ref in self.running:
            ray.cancel(ref, force=True)
        self.running.clear()
        self._show_beside()

    def _settled(self, record: RunRecord) -> bool:
        """A tuned entry's runs are final once compared with their trial (`_refit_next_best_if_short`)."""
        search = self.state.searches.get(record.label)
        return search is None or search.refit_checked

    def _trained(self, record: RunRecord) -> bool:
        return record.training is not None or (not record.failed and finished_report(record.run_dir) is not None)

    def _start(self) -> None:
        if self.failure is not None:
            return
        busy = {record.key for record in self.running.values()}
        waiting = [r for r in self.state.runs.values() if r.evaluation is None and not r.failed
                   and r.key not in busy and self._settled(r) and self._trained(r)]
        for record in waiting[:max(self.state.slots - len(self.running), 0)]:
            resources = _evaluation_resources(self.state, record)
            ref = self.task.options(**resources).remote(record.run_dir, seed_evaluation(self.state.study, record.seed),
                                                        resources["num_cpus"])
            self.running[ref] = record
            self.detail(f"[study] evaluating {record.label} seed {record.seed}")
            if self.counted:
                progress.current().unit_started(f"{record.label} seed {record.seed}")

    def _show_beside(self) -> None:
        """Before stage 4 the evaluations run beside a training stage, in slots its count does not show."""
        if not self.counted:
            progress.current().beside("evaluation", len(self.running))

    def _record(self, ref: Any) -> None:
        import ray

        record = self.running.pop(ref)
        name = f"{record.label} seed {record.seed}"
        try:
            result = ray.get(ref)
        except Exception as error:  # the task's own exception type (Ray's error subclasses it) or a lost worker
            self._fail(name, error, "evaluation FAILED")
            return
        for line in result["lines"]:
            self.detail(line)
        if record.run_id and not self._log_to_mlflow(record, result["report"], name):
            return
        record.evaluation, record.evaluation_s, record.evaluation_slots = result["report"], result["seconds"], 1
        protocol = self.state.study.evaluation.get("protocol", "quick")
        record.evaluation_file = str(location(record.run_dir) / f"eval-{protocol}" / "report.json")
        self.state.save()
        if self.counted:
            progress.current().unit_finished(name)
        else:  # beside a training stage: not its unit, but its time tells stage 4's estimate
            progress.current().measured("evaluation", record.evaluation_s)
        self.log(f"[study] {name} evaluated: {evaluation_line(record.evaluation)} ({record.evaluation_s:.0f}s)")

    def _log_to_mlflow(self, record: RunRecord, report: dict[str, Any], name: str) -> bool:
        """The evaluation in its run's MLflow run, before the state records it (a study interrupted between the
        two evaluates it again, from its saved AutoAttack chunks). An unreachable tracking server queues it in
        the run's outbox (`robustune sync`); another error fails the evaluation, as one in its task would."""
        from robustune import tracking

        tracking.use_outbox(record.run_id, record.run_dir)
        try:
            tracking.log_evaluation(self.state.tracking_uri, record.run_id, report, step=0)
        except Exception as error:
            self._fail(name, error, f"evaluation could not be logged to MLflow ({first_error_line(error)})")
            return False
        return True

    def _fail(self, name: str, error: Exception, what: str) -> None:
        """A failed evaluation: the first failure is raised by `finish`; no new evaluation starts."""
        self.failure = self.failure or error
        if self.counted:
            progress.current().unit_finished(name, ok=False)
        self.log(f"[study] {name} {what}; no new evaluation starts")


class EvaluateWhenTrained(Callback):
    """Lets the study's evaluations start and end while a Tune stage (final runs or a search) trains."""

    def on_step_end(self, iteration, trials, **info):
        if _live_evaluations is not None:
            _live_evaluations.poll()


def _evaluation_resources(state: StudyState, record: RunRecord) -> dict[str, Any]:
    """What an evaluation holds: what one worker of its run holds (its CPUs, and a GPU when the runs train on
    GPUs), since an evaluation is one process on one device; so it fits on any node that fits a worker."""
    from robustune.cluster import worker_threads

    config = resolve_config(state.study.run_config(state.study.entry(record.label), record.seed))
    return {"num_cpus": worker_threads(config), "num_gpus": 1 if config.resources.use_gpu else 0}


def evaluation_line(report: dict[str, Any]) -> str:
    """An evaluation's accuracies on one line (the full report is in its run folder and MLflow run)."""
    parts = [f"clean {report['clean_acc']:.4f}", f"PGD-{report['pgd']['steps']} {report['pgd_acc']:.4f}"]
    if report.get("aa_acc") is not None:
        parts.append(f"AutoAttack {report['aa_acc']:.4f}")
    parts.append(f"every attack {report['robust_acc']:.4f}")
    if report.get("warnings"):
        parts.append(f"{len(report['warnings'])} warning(s)")
    return ", ".join(parts)
