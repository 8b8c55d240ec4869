"""The study leaderboard: one row per defense, built from MLflow (final runs) and the searches' Parquet results.

Columns: defense, tuned knobs, clean / PGD / AutoAttack / all-attacks accuracy as the mean over seeds with a
95% interval (`<key>_ci_low`, `<key>_ci_high`: the Student t interval over the seeds' accuracies, which holds
seed-to-seed and test-point variation, never narrower than the Wilson interval of their points pooled; one
seed: the Wilson interval over its points; robustune.stats.accuracy_interval) and the sample
standard deviation over seeds (`<key>_std`), validation PGD accuracy at the selected epoch (`val_pgd_mean`, what
the headline's baseline is chosen on), training compute per run, search trials and search compute, total compute
(search + every seed's training + a warm start's training), overfitting alarms, evaluation warnings, training
diagnostics and progress. Compute is worker-seconds inside training epochs (validation included), the quantity a
search budget is measured in.

The headline (`headline`) is a paired test: the featured defense against the best tuned baseline at its budget,
that baseline picked on validation accuracy (never on test), their difference in robust accuracy (every attack)
on the same seeds and test points with the t interval of the per-seed differences and the paired t-test's p
(McNemar's with one seed; robustune.stats.paired_difference); it says "better" or "worse" only when the
interval excludes 0. `robustune report --compare A B` runs the same test
for any two rows.

Training diagnostics (`diagnostics`, from each final run's MLflow metric history, by robustune.loop.diagnosis):
collapsed (the model ended at chance), label leak (training inputs that give the label away), overfit (the
catastrophic-overfitting alarm), per seed with epochs; and a tuned entry whose search named no winner, which has
no numbers. Progress (`progress`): for each of the defense class's `progress_metrics` (its own on_epoch_end
metrics, logged as train/<name>), the first and the last epoch's value of each seed's run, e.g.
"policy_entropy 2.30 -> 1.41" (one number when they are equal), so a learned part that never learned shows.
Written as leaderboard.{md,csv,parquet} with two plots (robust vs clean accuracy; robust accuracy vs total
compute) in <study>/leaderboard/, printed, and logged to the study's MLflow parent run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import textwrap
from pathlib import Path
from typing import Any, Callable

from robustune.html_report import write_html
from robustune.stats import accuracy_interval, paired_difference, verdict
from robustune.storage import Location, location, read_parquet, staging
from robustune.study_state import DEFINITION_FILE, FIRST_SEED, RunRecord, StudyState, find_study_dir

FOLDER = "leaderboard"
HTML_FILE = "report.html"
# Row key -> (report accuracy, report count of the points it was measured on). "robust" is the deployed number:
# correct under every attack that ran, per point; the headline and the row order use it.
ACCURACIES = {"clean": ("clean_acc", "n_clean"), "pgd": ("pgd_acc", "n_pgd"), "aa": ("aa_acc", "n_aa"),
              "robust": ("robust_acc", "n_pgd")}
HEADLINE_METRIC = "robust"


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def accuracy_with_interval(reports: list[dict[str, Any]], key: str) -> tuple[float | None, float | None,
                                                                               float | None]:
    """(mean over seeds, 95% low, high) of one accuracy of a row's evaluation reports (t interval over seeds,
    at least the pooled points' Wilson interval; one seed: Wilson). The counts suffice: pairing needs the
    points themselves (`seed_outcomes`)."""
    name, count = ACCURACIES[key]
    measured = [(round(r[name] * int(r[count])), int(r[count])) for r in reports
                if r.get(name) is not None and r.get(count)]
    if not measured:
        return None, None, None
    return accuracy_interval(measured)


def validation_pgd(mlflow_client, run_id: str, selected_epoch: int | None) -> float | None:
    """Validation PGD accuracy at the epoch a run selected (the weights it deployed): what baselines are
    compared on before any test number is looked at."""
    history = {m.step: m.value for m in mlflow_client.get_metric_history(run_id, "val/pgd_acc")}
    if not history:
        return None
    return history.get(selected_epoch, history[max(history)])  # no selection recorded: the last epoch


def search_compute(search_dir: str | Location) -> tuple[int, float]:
    """Trials and worker-seconds inside their training epochs, from the search's results.parquet."""
    search_dir = location(search_dir)
    path = search_dir / "results.parquet"
    if not path.is_file():
        return 0, 0.0
    rows = read_parquet(path).to_pylist()
    workers = json.loads((search_dir / "search.json").read_text())["base"]["resources"]["num_workers"]
    return len(rows), sum(float(r.get("epochs_s") or 0.0) for r in rows) * workers


# A refit whose validation PGD accuracy ends this far below the search trial that chose its config is flagged:
# the config was judged on something the final runs did not reproduce (shorter trials, another seed).
REFIT_SHORTFALL = 0.10


def refit_shortfall(refit_val_pgd: float | None, chosen_on: float | None) -> str | None:
    """The warning for final runs whose validation PGD accuracy fell far below the trial that chose their config."""
    if refit_val_pgd is None or chosen_on is None or refit_val_pgd >= chosen_on - REFIT_SHORTFALL:
        return None
    return (f"refit below its search: validation PGD {refit_val_pgd:.3f} (mean over the final runs) vs "
            f"{chosen_on:.3f} for the trial that chose the config")


def next_best_note(next_best: dict[str, Any], chosen_on: float | None) -> str:
    """What a row says when its search's winner fell short or failed in the refits and the next-best config was
    refitted."""
    knobs = ", ".join(f"{k}={_short(v)}" for k, v in sorted(next_best["params"].items()))
    score = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    failed = next_best.get("winner_failed") or 0  # absent in studies saved before failures counted
    why = f"{failed} of the winner's refits failed" if failed else "the winner's refits fell short of its trial"
    return (f"{why} (validation PGD {score(next_best['winner_refit_val_pgd'])} "
            f"vs {score(chosen_on)}), so the next-best config ({knobs}) was refitted too "
            f"({score(next_best['refit_val_pgd'])}); these are the {'next-best' if next_best['kept'] else 'winner'}'s "
            "runs, chosen on failed runs, then validation PGD")


def run_diagnosis(mlflow_client, run_id: str) -> dict[str, list[int]]:
    """A run's training diagnostics (robustune.loop.diagnosis) from its MLflow metric history."""
    from robustune.loop import DIAGNOSTIC_METRICS, diagnosis

    by_epoch: dict[int, dict[str, float]] = {}
    for key in DIAGNOSTIC_METRICS.values():
        for metric in mlflow_client.get_metric_history(run_id, key):
            by_epoch.setdefault(metric.step, {"epoch": float(metric.step)})[key] = metric.value
    return diagnosis([by_epoch[step] for step in sorted(by_epoch)])


def progress_note(mlflow_client, run_id: str, names: tuple[str, ...]) -> str:
    """'policy_entropy 2.30 -> 1.41, policy_updates 40': each metric's first and last epoch in the run."""
    parts = []
    for name in names:
        history = sorted(mlflow_client.get_metric_history(run_id, f"train/{name}"), key=lambda m: m.step)
        if not history:
            parts.append(f"{name} not logged")
            continue
        first, last = _number(history[0].value), _number(history[-1].value)
        parts.append(f"{name} {first}" if first == last else f"{name} {first} -> {last}")
    return ", ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:#.3g}"  # a count as such, else 2.30


def seed_list(seeds: list[int]) -> str:
    """'seed 3', 'seeds 0, 1', 'seeds 0-9', 'seeds 0-3, 7': runs of three or more consecutive seeds as ranges."""
    runs: list[list[int]] = []
    for seed in sorted(seeds):
        if runs and seed == runs[-1][-1] + 1:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(parts)}"


def by_seed(notes: list[tuple[int, str]]) -> str:
    """Per-seed notes as 'seed 0: a | seed 1: b', the seeds that share a text named once ('seeds 0-9: a'): ten
    seeds that all raise the same warning make one line, not ten."""
    seeds_of: dict[str, list[int]] = {}
    for seed, text in notes:
        seeds_of.setdefault(text, []).append(seed)
    return " | ".join(f"{seed_list(seeds)}: {text}" for text, seeds in seeds_of.items())


def collect_rows(study_dir: Location) -> tuple[list[dict[str, Any]], StudyState]:
    from robustune import tracking
    from robustune.defense import defense_class
    from robustune.loop import describe_diagnosis
    from robustune.run import train_seconds_spent
    from robustune.search import no_winner as search_no_winner, read_summary

    state = StudyState.load(study_dir)
    study = state.study
    mlflow_client = tracking.client(state.tracking_uri)
    workers = study.base.get("resources", {}).get("num_workers", 1)
    per_label: dict[str, dict[str, Any]] = {}
    for entry in study.entries:
        records = state.runs_of(entry.label)
        train_s: list[float] = []
        reports: list[dict[str, Any]] = []
        validation: list[float] = []
        alarms, failed, failed_train_s, protocols = 0, 0, 0.0, set()
        diagnostics: list[str] = []
        # (seed, text) notes, written with the seeds that share a text named once
        warnings, seed_diagnostics, progress = [], [], []
        progress_names = defense_class(entry.defense).progress_metrics
        search = state.searches.get(entry.label)
        no_winner = search_no_winner(search.search_dir) if search else None
        summary = (read_summary(search.search_dir) if search else None) or {}
        varies = summary.get("nondeterministic")
        if no_winner:
            diagnostics.append(f"search named no winner, not retrained: {no_winner}")
        for record in sorted(records, key=lambda r: r.seed):
            if record.failed or record.run_id is None or record.evaluation is None:
                failed += 1
                failed_train_s += train_seconds_spent(record.run_dir) * workers  # spent all the same
                continue
            run = mlflow_client.get_run(record.run_id)
            reports.append(record.evaluation)
            train_s.append(run.data.metrics.get("time/total_s", 0.0) * workers)
            selected = run.data.tags.get("selected_epoch")
            score = validation_pgd(mlflow_client, record.run_id, int(selected) if selected else None)
            if score is not None:
                validation.append(score)
            if run.data.tags.get("eval/warning"):
                warnings.append((record.seed, run.data.tags["eval/warning"]))
            protocols.add(run.data.tags.get("eval/protocol", "?"))
            fired = run_diagnosis(mlflow_client, record.run_id)  # reads alarm/overfit's history too
            alarms += "overfit" in fired
            if fired:
                seed_diagnostics.append((record.seed, describe_diagnosis(fired)))
            if progress_names:
                progress.append((record.seed, progress_note(mlflow_client, record.run_id, progress_names)))
        trials, search_s = search_compute(search.search_dir) if search else (0, 0.0)
        row: dict[str, Any] = {
            "defense": entry.label, "method": entry.defense, "tuned": entry.tune,
            "tuned_knobs": ("none (no winner)" if no_winner else
                            ", ".join(f"{k}={_short(v)}" for k, v in sorted(search.final_params.items()))
                            if search else "defaults"),
            "seeds": len(reports), "failed_runs": failed,
        }
        for key, (name, _) in ACCURACIES.items():
            row[f"{key}_mean"], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = accuracy_with_interval(reports, key)
            row[f"{key}_std"] = _mean_spread([r[name] for r in reports if r.get(name) is not None])[1]
        row["val_pgd_mean"] = _mean_spread(validation)[0]
        if seed_diagnostics:
            diagnostics.append(by_seed(seed_diagnostics))
        chosen_on = (summary.get("best") or {}).get("metrics", {}).get("val_pgd_acc")
        next_best = search.next_best if search else None
        if next_best:
            diagnostics.append(next_best_note(next_best, chosen_on))
            chosen_on = next_best["val_pgd_acc"] if next_best["kept"] else chosen_on
        row["search_val_pgd"] = chosen_on  # validation PGD accuracy of the trial that chose the final runs' knobs
        shortfall = refit_shortfall(row["val_pgd_mean"], chosen_on)
        if shortfall:
            diagnostics.append(shortfall)
        row["points_per_seed"] = int(reports[0]["n_pgd"]) if reports else None
        row["train_s"] = _mean_spread(train_s)[0]
        row["search_trials"], row["search_s"] = trials, search_s
        row["search_budget_s"] = search.budget_s if search else None
        row["total_s"] = (search_s + sum(train_s) + failed_train_s
                          + (next_best["unused_train_s"] if next_best else 0.0))
        row["overfit_alarms"] = alarms
        row["warnings"] = len(warnings)
        row["warning_text"] = by_seed(warnings)
        row["no_winner"] = no_winner  # why a tuned entry's search named no best trial (then it has no runs)
        row["varies"] = varies  # what can make a rerun of its search choose other knobs
        row["diagnostics"] = " | ".join(diagnostics) or None
        row["progress"] = by_seed(progress) or None
        row["protocol"] = ", ".join(sorted(protocols)) or None
        row["init_from"] = entry.init_from
        row["budget_of"] = entry.budget
        per_label[entry.label] = row
    for row in per_label.values():  # a warm start's own training is part of what the defense cost
        if row["init_from"] in per_label:
            row["total_s"] += per_label[row["init_from"]]["total_s"]
    rows = sorted(per_label.values(), key=lambda r: -(r["robust_mean"] if r["robust_mean"] is not None else -1.0))
    return rows, state


# ----------------------------------------------------------------------------------- paired comparisons
def seed_outcomes(state: StudyState, label: str, column: str) -> dict[int, tuple[list[int], list[bool]]]:
    """Per seed of a row: (attacked test indices, outcome per point) from each run's outcomes.parquet."""
    from robustune.evaluation import read_outcomes

    by_seed = {}
    for record in state.runs_of(label):
        path = _outcomes_path(record)
        if path is None:
            continue
        outcomes = read_outcomes(path)
        if column not in outcomes:
            raise ValueError(f"{label} seed {record.seed}: {path} has no {column!r} outcomes "
                             f"(it has {', '.join(sorted(outcomes))})")
        by_seed[record.seed] = (outcomes["test_index"], outcomes[column])
    return by_seed


def _outcomes_path(record: RunRecord) -> Location | None:
    if record.failed or not record.evaluation or not record.evaluation.get("outcomes_path"):
        return None
    path = location(record.evaluation["outcomes_path"])
    return path if path.is_file() else None


def compare(state: StudyState, a: str, b: str, column: str = HEADLINE_METRIC) -> dict[str, Any]:
    """Rows `a` minus `b` on the seeds both have and the same test points (robustune.stats.paired_difference).
    Raises ValueError when they cannot be paired (no per-point outcomes, or different points for a seed)."""
    outcomes_a, outcomes_b = seed_outcomes(state, a, column), seed_outcomes(state, b, column)
    seeds = sorted(set(outcomes_a) & set(outcomes_b))
    if not seeds:
        raise ValueError(f"{a} and {b} share no evaluated seed with per-point outcomes (outcomes.parquet), "
                         "so they cannot be paired")
    for seed in seeds:
        if outcomes_a[seed][0] != outcomes_b[seed][0]:
            raise ValueError(f"seed {seed}: {a} and {b} were attacked on different test points, so they cannot "
                             "be paired (evaluate both with the same evaluation settings)")
    result = paired_difference([outcomes_a[s][1] for s in seeds], [outcomes_b[s][1] for s in seeds])
    return {**result, "seed_list": seeds, "column": column}


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


ROBUST_WORDS = "robust accuracy (every attack)"


def headline(rows: list[dict[str, Any]], featured: str | None, state: StudyState | None = None) -> str:
    """The featured defense against the best tuned baseline at its budget, chosen on validation PGD accuracy,
    as a paired test on the same seeds and test points (words only as strong as the interval)."""
    by_label = {r["defense"]: r for r in rows}
    star = by_label.get(featured) if featured else None
    # Entries without numbers because their search named no winner are named, never silently dropped.
    lost = [r["defense"] for r in rows if r["no_winner"]]
    lost_text = f"; no numbers (search named no winner): {', '.join(lost)}" if lost else ""
    if star is None or star["robust_mean"] is None:
        best = rows[0] if rows and rows[0]["robust_mean"] is not None else None
        parts = [f"{featured}: no evaluated run"] if star is not None else []
        if best:
            parts.append(f"best defense on test: {best['defense']} ({ROBUST_WORDS} {best['robust_mean']:.4f})")
        return "; ".join(parts or ["no results"]) + lost_text
    equal_budget = [r for r in rows if r["budget_of"] == featured and r["robust_mean"] is not None]
    pool = equal_budget or [r for r in rows if r["tuned"] and r["robust_mean"] is not None]
    if not pool:
        return (f"{featured}: {ROBUST_WORDS} {_interval_text(star, HEADLINE_METRIC)}, clean "
                f"{star['clean_mean']:.4f}; no tuned baseline" + lost_text)
    # Never on test: the baseline with the best validation PGD accuracy (its final runs' selected epochs).
    rival = max(pool, key=lambda r: r["val_pgd_mean"] if r["val_pgd_mean"] is not None else -1.0)
    which = "at equal budget" if equal_budget else "(none searched on its budget; best tuned one)"
    chosen = (f"chosen on validation PGD accuracy {rival['val_pgd_mean']:.4f}"
              if rival["val_pgd_mean"] is not None else "no validation numbers: first tuned row")
    try:
        tested = verdict(compare(state, featured, rival["defense"]), featured, rival["defense"], ROBUST_WORDS) \
            if state is not None else None
    except ValueError as error:
        tested = f"{featured} vs {rival['defense']}: not paired ({error})"
    if tested is None:
        tested = f"{featured} vs {rival['defense']}: not paired (no study state)"
    clean_diff = 100 * (star["clean_mean"] - rival["clean_mean"])
    return (f"{tested}; {ROBUST_WORDS} {_interval_text(star, HEADLINE_METRIC)} vs "
            f"{_interval_text(rival, HEADLINE_METRIC)}; baseline: the best tuned one {which}, {rival['defense']} "
            f"({chosen}); clean {star['clean_mean']:.4f} vs {rival['clean_mean']:.4f} ({clean_diff:+.1f} points); "
            f"compute {star['total_s']:.0f} vs {rival['total_s']:.0f} worker-seconds (search "
            f"{rival['search_s']:.0f}" + (f" of a {rival['search_budget_s']:.0f} budget" if rival.get(
                "search_budget_s") else "") + ")" + lost_text)


def _interval_text(row: dict[str, Any], key: str) -> str:
    return f"{row[f'{key}_mean']:.4f} [{row[f'{key}_ci_low']:.4f}, {row[f'{key}_ci_high']:.4f}]"


def _cell(row: dict[str, Any], key: str) -> str:
    """'0.531 [0.497, 0.566]': the mean over seeds and its 95% interval."""
    if row[f"{key}_mean"] is None:
        return "-"
    return f"{row[f'{key}_mean']:.3f} [{row[f'{key}_ci_low']:.3f}, {row[f'{key}_ci_high']:.3f}]"


COLUMNS = ("defense", "tuned knobs", "clean", "PGD", "AutoAttack", "all attacks", "val PGD", "train s/run",
           "search trials", "search s", "total s", "overfit alarms", "warnings", "diagnostics")


def table_cells(r: dict[str, Any]) -> list[str]:
    """One row's cells, in COLUMNS' order, as the Markdown and HTML tables show them."""
    return [r["defense"], r["tuned_knobs"], _cell(r, "clean"), _cell(r, "pgd"), _cell(r, "aa"), _cell(r, "robust"),
            _validation_cell(r), f"{r['train_s'] or 0:.0f}", str(r["search_trials"]), f"{r['search_s']:.0f}",
            f"{r['total_s']:.0f}", str(r["overfit_alarms"]), str(r["warnings"]), _diagnostic_labels(r)]


NOTE_CHARACTERS = 600  # a note under the table is cut here (the CSV and Parquet keep it whole)


def _clip(text: str) -> str:
    """A note cut at a word boundary before NOTE_CHARACTERS, marked as cut."""
    return text if len(text) <= NOTE_CHARACTERS else text[:NOTE_CHARACTERS].rsplit(" ", 1)[0] + " ..."


def sections(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The notes under the table, titled: evaluation warnings, training diagnostics, progress (empty ones too)."""
    return [("Evaluation warnings", [f"{r['defense']}: {_clip(r['warning_text'])}" for r in rows if r["warning_text"]]),
            ("Training diagnostics (collapsed: ended at chance accuracy; label_leak: training inputs give the label "
             "away; overfit: catastrophic-overfitting alarm; @ epochs)",
             [f"{r['defense']}: {_clip(r['diagnostics'])}" for r in rows if r["diagnostics"]]),
            ("Progress (the defense's own metrics, first -> last epoch)",
             [f"{r['defense']}: {_clip(r['progress'])}" for r in rows if r["progress"]]),
            ("What can differ when this study runs again on this machine (everything else is reproducible: same "
             "tuned knobs and, with these seeds, the same accuracies)",
             [f"{r['defense']}: {r['varies']}" for r in rows if r["varies"]])]


def markdown(rows: list[dict[str, Any]], title: str, head: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", f"**{head}**", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    lines += ["", *notes]
    for heading, items in sections(rows):
        if items:
            lines += ["", f"{heading}:"] + [f"- {item}" for item in items]
    return "\n".join(lines) + "\n"


def _validation_cell(row: dict[str, Any]) -> str:
    return f"{row['val_pgd_mean']:.3f}" if row["val_pgd_mean"] is not None else "-"


def _diagnostic_labels(row: dict[str, Any]) -> str:
    """The table cell: which diagnostics fired for the row (details below the table)."""
    labels = ["no winner"] if row["no_winner"] else []
    labels += ["refit below search"] if "refit below its search" in (row["diagnostics"] or "") else []
    labels += [name for name in ("collapsed", "label_leak", "overfit") if f"{name}@" in (row["diagnostics"] or "")]
    return ", ".join(labels) or "-"


def pareto_front(rows: list[dict[str, Any]], x_key: str, y_key: str) -> list[dict[str, Any]]:
    """Rows no other row beats on both: less or equal compute (`x_key`) and higher or equal robust accuracy
    (`y_key`), strictly better in one. Sorted by compute."""
    front = [r for r in rows if not any(o[x_key] <= r[x_key] and o[y_key] >= r[y_key]
                                        and (o[x_key] < r[x_key] or o[y_key] > r[y_key]) for o in rows)]
    return sorted(front, key=lambda r: r[x_key])


# Where a point's label may go, in points from the point: beside it first (right and above, then the other
# corners), then farther out on rings with a thin line back to the point; the first place inside the axes and
# clear of the other points and the labels already placed wins.
NEAR_LABEL_OFFSETS = ((5, 3), (5, -3), (-5, 3), (-5, -3))
FAR_LABEL_OFFSETS = tuple((round(radius * math.cos(math.radians(angle))), round(radius * math.sin(math.radians(angle))))
                          for radius in (20, 34, 48) for angle in range(0, 360, 30))


def place_labels(ax, labelled: list[tuple[float, float, str]], fontsize: float = 8) -> list:
    """Annotate each (x, y, text) where it overlaps no other point and no label placed before it, inside the axes
    (call once the axes' limits and layout are final: positions are measured on the drawn figure). A label away
    from its point gets a thin line to it; one that fits nowhere takes the place with the least overlap."""
    renderer = ax.figure.canvas.get_renderer()
    ax.figure.canvas.draw()
    axes_box = ax.get_window_extent(renderer)
    marker = 4 * ax.figure.dpi / 72  # half a marker's width, in pixels
    centres = [ax.transData.transform((x, y)) for x, y, _ in labelled]
    placed, annotations = [], []

    def overlap(box, own: int) -> float:
        outside = (max(0.0, axes_box.x0 - box.x0) + max(0.0, box.x1 - axes_box.x1)
                   + max(0.0, axes_box.y0 - box.y0) + max(0.0, box.y1 - axes_box.y1)) * box.height
        others = [(cx - marker, cy - marker, cx + marker, cy + marker)
                  for i, (cx, cy) in enumerate(centres) if i != own] + [(o.x0, o.y0, o.x1, o.y1) for o in placed]
        return outside + sum(max(0.0, min(box.x1, x1) - max(box.x0, x0)) * max(0.0, min(box.y1, y1) - max(box.y0, y0))
                             for x0, y0, x1, y1 in others)

    for index, (x, y, text) in enumerate(labelled):
        best = None
        for dx, dy in NEAR_LABEL_OFFSETS + FAR_LABEL_OFFSETS:
            far = (dx, dy) not in NEAR_LABEL_OFFSETS
            annotation = ax.annotate(
                text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                # A white backing keeps the words readable across error bars.
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
                arrowprops={"arrowstyle": "-", "linewidth": 0.8, "color": "0.25", "shrinkA": 0, "shrinkB": 4}
                if far else None)
            box = annotation.get_window_extent(renderer)
            cost = overlap(box, index)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, annotation, box)
            else:
                annotation.remove()
            if cost == 0:
                break
        placed.append(best[2])
        annotations.append(best[1])
    return annotations


def plots(rows: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """Robust accuracy (every attack, mean over seeds, 95% interval as error bars) against clean accuracy and
    against total compute; the second marks the Pareto front (no other defense is both cheaper and more
    robust)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["robust_mean"] is not None]
    y_key = f"{HEADLINE_METRIC}_mean"
    paths = []
    for name, x_key, x_interval, x_label, log_x in (
            ("robust_vs_clean.png", "clean_mean", "clean", "clean accuracy (test, 95% interval)", False),
            ("robust_vs_compute.png", "total_s", None, "total compute incl. search (worker-seconds)", True)):
        crowded = len(shown) > 6  # more room, so the labels can sit near their points
        fig, ax = plt.subplots(figsize=(9.6, 6.4) if crowded else (7.2, 4.8), dpi=120)
        for r in shown:
            y_error = [[r[y_key] - r[f"{HEADLINE_METRIC}_ci_low"]], [r[f"{HEADLINE_METRIC}_ci_high"] - r[y_key]]]
            x_error = ([[r[x_key] - r[f"{x_interval}_ci_low"]], [r[f"{x_interval}_ci_high"] - r[x_key]]]
                       if x_interval else None)
            ax.errorbar(r[x_key], r[y_key], xerr=x_error, yerr=y_error, fmt="o", capsize=3, elinewidth=1,
                        ecolor=("tab:red" if r["tuned"] else "tab:blue", 0.45),  # bars lighter than the points
                        color="tab:red" if r["tuned"] else "tab:blue", zorder=3)
        if not x_interval and len(shown) > 1:
            front = pareto_front(shown, x_key, y_key)
            ax.step([r[x_key] for r in front], [r[y_key] for r in front], where="post", color="tab:green",
                    linestyle="--", linewidth=1, label="Pareto front (cheaper and more robust)")
            ax.legend(loc="lower right", fontsize=8)
        if log_x and shown and all(r[x_key] > 0 for r in shown):
            ax.set_xscale("log")
        ax.margins(x=0.12, y=0.08)  # room for the labels right of the points and the error bars' ends
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel("robust accuracy, every attack (test, 95% interval)", fontsize=9)
        ax.set_title(textwrap.shorten(title, 90, placeholder=" ...") + "\nblue: own defaults, red: tuned",
                     fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        place_labels(ax, [(r[x_key], r[y_key], r["defense"]) for r in shown])
        path = folder / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def build(study_dir: str | Location, log: Callable[[str], None] = print,
          html_copy: Path | None = None) -> list[dict[str, Any]]:
    """Build, write, print and log the leaderboard of the study in `study_dir` (and, with `html_copy`, put a copy
    of its HTML report there too)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from robustune import tracking

    study_dir = location(study_dir)
    rows, state = collect_rows(study_dir)
    study = state.study
    head = headline(rows, study.featured, state)
    evaluation = study.evaluation
    protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
    slices = ("each seed on its own slice of the test set, the same slice for every defense"
              if evaluation.get("seed_slices", True) else "every seed on the same test points")
    notes = [f"Study `{state.instance}` ({study.source}); seeds {study.seeds}; "
             f"evaluation protocol {', '.join(protocols) or evaluation.get('protocol', 'quick')} "
             f"({evaluation.get('points', 1000)} attacked points per seed, {slices}); "
             f"gradient-masking checks {checked_models(evaluation)}.",
             "Accuracies: mean over seeds [95% interval: Student t over the seeds' accuracies, at least the Wilson "
             "interval of their points pooled; with one seed, the Wilson interval over its points: with a few seeds "
             "their spread, not the test points, sets the width]. `all attacks`: correct under every attack that "
             "ran, per point (the deployed number). `val PGD`: validation PGD accuracy at the selected epoch, "
             "which the headline's baseline is chosen on.",
             "Compute: worker-seconds inside training epochs (validation included); a run that failed counts up to "
             "its last checkpoint. A defense warm-started from another (init_from) includes that one's total. "
             "Searches ran on validation data only."]
    folder = study_dir / FOLDER
    table = pa.table({key: [r[key] for r in rows] for key in rows[0]}) if rows else pa.table({})
    text = markdown(rows, f"Leaderboard: {study.name}", head, notes)
    uri, parent = state.tracking_uri, state.parent_run_id
    with staging(folder) as local:  # written here, then (object store) uploaded to the study folder
        pq.write_table(table, local / "leaderboard.parquet")
        pacsv.write_csv(table, local / "leaderboard.csv")
        (local / "leaderboard.md").write_text(text)
        images = plots(rows, local, f"study {study.name}: {len(study.seeds)} seed(s), "
                                    f"{evaluation.get('points', 1000)} attacked test points per seed")
        write_html(local / HTML_FILE, title=f"Leaderboard: {study.name}", headline=head,
                   header=list(COLUMNS), cells=[table_cells(r) for r in rows], notes=notes,
                   sections=sections(rows), images=images, definition=(study_dir / DEFINITION_FILE).read_text(),
                   protocol=protocol_text(rows, evaluation))
        for path in [local / "leaderboard.md", local / "leaderboard.csv", local / "leaderboard.parquet",
                     local / HTML_FILE, *images]:
            tracking.log_file(uri, parent, path, FOLDER)
        if html_copy is not None:
            shutil.copyfile(local / HTML_FILE, html_copy)
    tracking.log_table(uri, parent, rows, f"{FOLDER}/leaderboard_table.json")  # a table the MLflow UI renders
    tracking.set_tag(uri, parent, "headline", head[:5000])
    log(text)
    log(f"leaderboard written to {folder} (Markdown, CSV, Parquet, 2 plots) and logged to MLflow run {parent}")
    log(f"report (one HTML file, opens without a server): {html_copy or folder / HTML_FILE}")
    return rows


def checked_models(evaluation: dict[str, Any]) -> str:
    """Which models a study's gradient-masking checks ran on (its `evaluation.checks`)."""
    checks = evaluation.get("checks", True)
    if checks == FIRST_SEED:
        return f"on the model of each defense's first seed (evaluation.checks: {FIRST_SEED})"
    return "on every model" if checks else "off (evaluation.checks: false)"


def protocol_text(rows: list[dict[str, Any]], evaluation: dict[str, Any]) -> str:
    """The evaluation settings as the study gave them, and the protocol versions its runs report."""
    protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
    settings = ", ".join(f"{key}: {value}" for key, value in sorted(evaluation.items()))
    return (f"protocol version(s) in the reports: {', '.join(protocols) or 'none'}\n"
            f"study evaluation settings: {settings or 'defaults'}\n"
            "quick/1: PGD-20 (1 restart, step eps/4) and AutoAttack fast (APGD-CE, APGD-T) on the attacked points\n"
            "full/1: PGD-50 x 10, CW-50 and AutoAttack standard on the whole test set\n"
            f"gradient-masking checks (see robustune.evaluation) {checked_models(evaluation)}")


# ------------------------------------------------------------------------------------------------ CLI
def add_parser(commands) -> None:
    parser = commands.add_parser(
        "report", help="build a study's leaderboard (Markdown, CSV, Parquet, plots) and log it to MLflow",
        description="Build the leaderboard of a study from MLflow and its searches' Parquet results: per defense "
                    "the tuned knobs, clean / PGD / AutoAttack / every-attack accuracy (mean over seeds with a 95% "
                    "interval), training and search compute, overfitting alarms, evaluation warnings and training "
                    "diagnostics, under a tested headline; print it, write it to <study>/leaderboard/ and log it "
                    "with two plots to the study's MLflow parent run. With --compare, only the paired test of two "
                    "rows on the same seeds and test points.",
        epilog=textwrap.dedent("""\
            examples:
              robustune report                      # the newest study under runs/
              robustune report default              # the newest run of the study named `default`
              robustune report runs/study-default-20261121-101500
              robustune report default --compare las_at "pgd (tuned)"   # paired test of two rows
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", help="study folder, study run name, or study name (default: newest)")
    parser.add_argument("--output-dir", help="where studies are looked up: a folder or an object-store URI "
                                             "(default $ROBUSTUNE_OUTPUT_DIR, else runs)")
    parser.add_argument("--html", nargs="?", const="", metavar="FILE",
                        help="also copy the self-contained HTML report (always written as "
                             f"<study>/{FOLDER}/{HTML_FILE}) to FILE (default: report-<study>.html here)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="paired test of row A against row B (their labels as in the leaderboard): the "
                             "difference of each accuracy with its 95%% interval and p-value (paired t over seeds; "
                             "McNemar with one seed); builds nothing")


def command(args: argparse.Namespace) -> int:
    from robustune.config import ConfigError

    study_dir = find_study_dir(args.study, args.output_dir)
    if args.compare:
        print(compare_text(StudyState.load(study_dir), *args.compare))
        return 0
    html_copy = None
    if args.html is not None:
        html_copy = Path(args.html or f"report-{study_dir.name}.html").resolve()
        if not html_copy.parent.is_dir():
            raise ConfigError(f"--html {args.html}: the folder {html_copy.parent} does not exist")
    build(study_dir, html_copy=html_copy)
    return 0


def compare_text(state: StudyState, a: str, b: str) -> str:
    """`report --compare`: one verdict line per accuracy the two rows' outcomes share."""
    from robustune.config import ConfigError

    labels = [entry.label for entry in state.study.entries]
    for label in (a, b):
        if label not in labels:
            raise ConfigError(f"--compare: {label!r} is not a defense of study {state.instance} "
                              f"(its rows: {', '.join(labels)})")
    lines = [f"{a} vs {b} in study {state.instance}, paired on the same seeds and test points:"]
    for column, words in (("robust", ROBUST_WORDS), ("aa", "AutoAttack accuracy"), ("pgd", "PGD accuracy"),
                          ("clean", "clean accuracy (attacked points)")):
        try:
            lines.append(f"- {verdict(compare(state, a, b, column), a, b, words)}")
        except ValueError as error:
            lines.append(f"- {words}: {error}")
    return "\n".join(lines)
