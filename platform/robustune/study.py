"""Studies: several defenses trained, tuned and evaluated the same way, then compared on one leaderboard.

A study definition is YAML (`search_spaces/studies/<name>.yaml`; `default.yaml` when none is given):

    name: default
    dataset: fashion-mnist        # data.name
    model: small_cnn              # model.name
    epsilon: 0.1
    epochs: 4                     # training epochs of every final run
    seeds: [0, 1]                 # every final run is repeated over these seeds
    base: {data: {train_subset: 4000}}    # any other run setting shared by every defense
    evaluation: {protocol: quick, points: 500, workers: 2}   # EvalConfig fields
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
  4. every final run evaluated on the test split by the study's protocol (AutoAttack sharded over Ray tasks);
  5. the leaderboard (`robustune.leaderboard`): Markdown, CSV, Parquet, two plots, on the study's MLflow run.
Trials and final runs train on the training split and select their epoch on the validation split; the
test split is touched only in stage 4.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from robustune.config import ConfigError, EvalConfig, apply_override, build_dataclass, merge, resolve_config

STUDY_FILE = "study.json"
DEFINITION_FILE = "study.yaml"
STUDY_KEYS = {"name", "description", "dataset", "model", "epsilon", "epochs", "seeds", "base", "evaluation",
              "search", "defenses", "featured", "max_concurrent"}
ENTRY_KEYS = {"defense", "label", "tune", "set", "space", "samples", "epochs", "searcher", "scheduler", "budget",
              "init_from"}
SEARCH_KEYS = {"samples", "epochs", "searcher", "scheduler", "grace_period", "reduction_factor", "objective",
               "min_clean", "seed", "grid_points"}


@dataclass
class Entry:
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
    try:
        build_dataclass(EvalConfig, evaluation, "evaluation")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error
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
def start_study(study: Study, log: Callable[[str], None] = print) -> Path:
    """Create the study folder and its MLflow parent run, then run every stage."""
    from robustune import tracking
    from robustune.training import check_cluster_fits, ensure_ray

    config = resolve_config(study.base)
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    output_dir = Path(config.tracking.output_dir).resolve()
    instance = f"study-{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    study_dir = output_dir / instance
    if study_dir.exists():
        raise ConfigError(f"study folder {study_dir} already exists; continue it with --resume {study_dir}")
    ensure_ray()
    check_cluster_fits(config)  # every run of the study has the base's resources
    config.study = instance
    config.tracking.tracking_uri, config.tracking.output_dir = uri, str(output_dir)
    parent_run_id = tracking.create_run(config, instance, extra_tags={"kind": "study", "study_name": study.name})
    tracking.log_params(uri, parent_run_id, {"study.seeds": study.seeds, "study.source": study.source,
                                             "study.defenses": [e.label for e in study.entries]})
    tracking.log_text(uri, parent_run_id, Path(study.source).read_text(), "study/study.yaml")
    study_dir.mkdir(parents=True)
    (study_dir / DEFINITION_FILE).write_text(Path(study.source).read_text())
    _save_state(study_dir, {"instance": instance, "study": asdict(study), "parent_run_id": parent_run_id,
                            "tracking_uri": uri, "output_dir": str(output_dir), "started": time.time(),
                            "runs": {}, "searches": {}})
    log(f"study {instance}: {len(study.entries)} defenses x {len(study.seeds)} seed(s); MLflow parent run "
        f"{parent_run_id} at {tracking.redact_uri(uri)}")
    log(f"study folder {study_dir} (continue an interrupted study with: robustune study --resume {study_dir})")
    return run_stages(study_dir, log)


def resume_study(study_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    from robustune import tracking
    from robustune.training import ensure_ray

    study_dir = Path(study_dir).resolve()
    if not (study_dir / STUDY_FILE).is_file():
        raise ConfigError(f"--resume {study_dir}: not a robustune study folder (no {STUDY_FILE}); pass the folder "
                          "`robustune study` printed at its start")
    state = _load_state(study_dir)
    ensure_ray()
    tracking.set_status(state["tracking_uri"], state["parent_run_id"], "RUNNING")
    log(f"resuming study {state['instance']} (MLflow parent run {state['parent_run_id']})")
    return run_stages(study_dir, log)


def run_stages(study_dir: Path, log: Callable[[str], None]) -> Path:
    from robustune import leaderboard, tracking

    state = _load_state(study_dir)
    study = _study_from_dict(state["study"])
    uri, parent = state["tracking_uri"], state["parent_run_id"]
    try:
        untuned = [e for e in study.entries if not e.tune]
        tuned = [e for e in study.entries if e.tune]
        log(f"[study] stage 1/5: {len(untuned)} untuned defense(s) x {len(study.seeds)} seed(s)")
        _train_final_runs(study_dir, study, untuned, {}, log)
        for entry in tuned:
            log(f"[study] stage 2/5: search for {entry.label}")
            _search(study_dir, study, entry, log)
        log(f"[study] stage 3/5: {len(tuned)} tuned defense(s) retrained with their best config x "
            f"{len(study.seeds)} seed(s)")
        best = {e.label: _load_state(study_dir)["searches"][e.label]["best_params"] for e in tuned}
        _train_final_runs(study_dir, study, tuned, best, log)
        log("[study] stage 4/5: evaluation on the test split")
        _evaluate_final_runs(study_dir, study, log)
        log("[study] stage 5/5: leaderboard")
        table = leaderboard.build(study_dir, log=log)
    except BaseException:
        tracking.set_status(uri, parent, "FAILED")
        raise
    tracking.set_status(uri, parent, "FINISHED")
    state = _load_state(study_dir)
    log(f"study finished in {time.time() - state['started']:.0f}s since it started "
        f"({len(table)} leaderboard rows); MLflow parent run {parent}")
    log(f"  see it with: mlflow ui --backend-store-uri {tracking.redact_uri(uri)}   (then open http://127.0.0.1:5000)")
    return study_dir


def _final_run_dir(study_dir: Path, entry: Entry, seed: int) -> Path:
    return study_dir / "runs" / f"{entry.slug}-seed{seed}"


def _entry_config(study_dir: Path, study: Study, entry: Entry, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    state = _load_state(study_dir)
    data = study.run_config(entry, seed)
    for key, value in params.items():
        data = apply_override(data, key.split("."), value)
    if entry.init_from is not None:
        source = _final_run_dir(study_dir, study.entry(entry.init_from), seed)
        data = apply_override(data, ["train", "init_from"], str(source / "final.pt"))
    return merge(data, {"study": state["instance"], "tracking": {"tracking_uri": state["tracking_uri"]}})


def _train_final_runs(study_dir: Path, study: Study, entries: list[Entry], best: dict[str, dict[str, Any]],
                      log: Callable[[str], None]) -> None:
    from robustune.training import REPORT_FILE

    jobs = []
    for entry in entries:
        for seed in study.seeds:
            run_dir = _final_run_dir(study_dir, entry, seed)
            if (run_dir / REPORT_FILE).is_file():
                continue  # finished before an interruption
            data = _entry_config(study_dir, study, entry, seed, best.get(entry.label, {}))
            data = merge(data, {"tracking": {"output_dir": str(run_dir.parent), "run_name": run_dir.name}})
            jobs.append({"run_dir": str(run_dir), "config": data, "label": entry.label, "seed": seed})
    if jobs:
        run_many(jobs, study_dir, _load_state(study_dir)["parent_run_id"], _concurrency(study), log)
    state = _load_state(study_dir)
    for entry in entries:
        for seed in study.seeds:
            run_dir = _final_run_dir(study_dir, entry, seed)
            # Keep what a resumed study already knows of this run (its evaluation, above all).
            record = {**state["runs"].get(f"{entry.label}|{seed}", {}),
                      "label": entry.label, "defense": entry.defense, "seed": seed, "run_dir": str(run_dir)}
            record.pop("failed", None)
            if (run_dir / "run.json").is_file():
                record["run_id"] = json.loads((run_dir / "run.json").read_text())["run_id"]
            if (run_dir / REPORT_FILE).is_file():
                record["training"] = json.loads((run_dir / REPORT_FILE).read_text())
            else:
                record["failed"] = True
                log(f"[study] {entry.label} seed {seed} failed (see its run folder {run_dir}); the study goes on")
            state["runs"][f"{entry.label}|{seed}"] = record
    _save_state(study_dir, state)


def _concurrency(study: Study) -> int:
    """Trainings at once: what the cluster's CPUs fit (each takes num_workers x cpus_per_worker)."""
    import ray

    if study.max_concurrent:
        return study.max_concurrent
    config = resolve_config(study.base)
    per_run = config.resources.num_workers * (config.resources.cpus_per_worker or 1)
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // per_run)


def train_job(params: dict[str, Any], jobs: list[dict[str, Any]], parent_run_id: str) -> None:
    """A Tune trainable running one final training (resumed in place if its folder exists)."""
    from robustune.training import RUN_FILE, run_training

    job = jobs[params["index"]]
    run_dir = Path(job["run_dir"])
    quiet = lambda text: None  # noqa: E731 - the study prints its own progress
    if (run_dir / RUN_FILE).is_file():
        run_training(resume_dir=run_dir, log=quiet)
    else:
        run_training(resolve_config(job["config"]), log=quiet, parent_run_id=parent_run_id,
                     extra_tags={"kind": "study_run", "study_entry": job["label"]})


def _run_progress_class():
    from ray import tune

    class RunProgress(tune.Callback):
        """One line per finished or failed training (stdout: Tune pickles its callbacks, a logger may not be)."""

        def __init__(self, jobs: list[dict[str, Any]]):
            self.jobs, self.started = jobs, time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

        def _line(self, trial, what: str) -> None:
            job = self.jobs[trial.config["index"]]
            sys.stdout.write(f"[study] {job['label']} seed {job['seed']} {what} ({time.time() - self.started:.0f}s)\n")
            sys.stdout.flush()

    return RunProgress


def run_many(jobs: list[dict[str, Any]], study_dir: Path, parent_run_id: str, max_concurrent: int,
             log: Callable[[str], None]) -> None:
    """Run independent trainings, `max_concurrent` at a time, as Ray Tune trials (a failed one does not stop
    the others; each keeps its own run folder, so an interrupted batch resumes run by run)."""
    from ray import tune

    RunProgress = _run_progress_class()
    trainable = tune.with_resources(tune.with_parameters(train_job, jobs=jobs, parent_run_id=parent_run_id),
                                    {"CPU": 0, "memory": 64 * 1024 * 1024})
    tuner = tune.Tuner(trainable, param_space={"index": tune.grid_search(list(range(len(jobs))))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
                       run_config=tune.RunConfig(name=f"runs-{time.strftime('%H%M%S')}",
                                                 storage_path=str(study_dir / "tune"), verbose=0,
                                                 callbacks=[RunProgress(jobs)],
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    log(f"[study] {len(jobs)} training run(s), {max_concurrent} at a time: "
        + ", ".join(f"{j['label']}/seed {j['seed']}" for j in jobs))
    tuner.fit()


def _search(study_dir: Path, study: Study, entry: Entry, log: Callable[[str], None]) -> None:
    from robustune.search import SUMMARY_FILE, SearchSettings, resume_search, start_search

    state = _load_state(study_dir)
    search_dir = study_dir / "searches" / entry.slug
    if (search_dir / SUMMARY_FILE).is_file():
        summary = json.loads((search_dir / SUMMARY_FILE).read_text())
    elif (search_dir / "search.json").is_file():
        summary = resume_search(search_dir, log=log)
    else:
        budget_s = None
        if entry.budget is not None:
            budget_s = _training_compute(state, entry.budget, resolve_config(study.base).resources.num_workers)
            log(f"[study] {entry.label}: search budget = {entry.budget}'s training compute, "
                f"{budget_s:.0f} worker-seconds (mean over seeds)")
        settings = SearchSettings(defense=entry.defense, space_file=_space_path(entry, study), budget_s=budget_s,
                                  **{"max_concurrent": _concurrency(study), **entry.search})
        data = _entry_config(study_dir, study, entry, study.seeds[0], {})
        data = merge(data, {"tracking": {"output_dir": str(search_dir.parent), "run_name": search_dir.name}})
        summary = start_search(settings, data, log=log, parent_run_id=state["parent_run_id"],
                               extra_tags={"study_entry": entry.label})
    state = _load_state(study_dir)
    best = summary.get("best")
    if not best:
        raise ConfigError(f"the search for {entry.label} produced no usable trial (all failed?); see "
                          f"{search_dir}/results.parquet")
    state["searches"][entry.label] = {"search_dir": str(search_dir), "parent_run_id": summary["parent_run_id"],
                                      "best_params": best["params"], "budget_s": summary.get("budget_s"),
                                      "trials": summary["trials"]}
    _save_state(study_dir, state)


def _training_compute(state: dict[str, Any], label: str, workers: int) -> float:
    """Mean training compute (worker-seconds inside epochs) of an untuned entry's finished runs."""
    values = [r["training"]["train_seconds"] * workers
              for r in state["runs"].values() if r["label"] == label and "training" in r]
    if not values:
        raise ConfigError(f"no finished run of {label!r} to take a compute budget from")
    return sum(values) / len(values)


def _evaluate_final_runs(study_dir: Path, study: Study, log: Callable[[str], None]) -> None:
    from robustune.evaluate_run import evaluate_run

    state = _load_state(study_dir)
    protocol = study.evaluation.get("protocol", "quick")
    for key, record in state["runs"].items():
        if record.get("failed") or "evaluation" in record:
            continue
        log(f"[study] evaluating {record['label']} seed {record['seed']}")
        report = evaluate_run(record["run_dir"], study.evaluation, log=log)
        state = _load_state(study_dir)
        state["runs"][key]["evaluation"] = report
        state["runs"][key]["evaluation_file"] = str(Path(record["run_dir"]) / f"eval-{protocol}" / "report.json")
        _save_state(study_dir, state)


# ---------------------------------------------------------------------------------------------- state
def _save_state(study_dir: Path, state: dict[str, Any]) -> None:
    tmp = study_dir / (STUDY_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(study_dir / STUDY_FILE)


def _load_state(study_dir: Path) -> dict[str, Any]:
    return json.loads((Path(study_dir) / STUDY_FILE).read_text())


def _study_from_dict(data: dict[str, Any]) -> Study:
    return Study(**{**data, "entries": [Entry(**e) for e in data["entries"]]})


def find_study_dir(name_or_dir: str | None, output_dir: str = "runs") -> Path:
    """A study folder given as a path, as a study instance or study name (the newest), or the newest of all."""
    if name_or_dir and Path(name_or_dir, STUDY_FILE).is_file():
        return Path(name_or_dir).resolve()
    folders = sorted((p.parent for p in Path(output_dir).glob(f"study-*/{STUDY_FILE}")),
                     key=lambda p: _load_state(p).get("started", 0))
    if name_or_dir:
        folders = [p for p in folders if p.name == name_or_dir or _load_state(p)["study"]["name"] == name_or_dir]
    if not folders:
        what = f"named {name_or_dir!r} " if name_or_dir else ""
        raise ConfigError(f"no study {what}under {Path(output_dir).resolve()}: pass a study folder "
                          "(printed by `robustune study`) or run `robustune study` first")
    return folders[-1].resolve()
