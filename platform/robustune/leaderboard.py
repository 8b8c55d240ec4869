"""The study leaderboard: one row per defense, built from MLflow (final runs) and the searches' Parquet results.

Columns: defense, tuned knobs, clean / PGD / AutoAttack / all-attacks accuracy as mean and spread (sample
standard deviation) over seeds, training compute per run, search trials and search compute, total compute
(search + every seed's training + a warm start's training), overfitting alarms, evaluation warnings, training
diagnostics and progress. Compute is worker-seconds inside training epochs (validation included), the quantity a
search budget is measured in.

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
import statistics
import textwrap
from pathlib import Path
from typing import Any, Callable

from robustune.storage import Location, location, read_parquet, staging
from robustune.study_state import StudyState, find_study_dir

FOLDER = "leaderboard"


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def search_compute(search_dir: str | Location) -> tuple[int, float]:
    """Trials and worker-seconds inside their training epochs, from the search's results.parquet."""
    search_dir = location(search_dir)
    path = search_dir / "results.parquet"
    if not path.is_file():
        return 0, 0.0
    rows = read_parquet(path).to_pylist()
    workers = json.loads((search_dir / "search.json").read_text())["base"]["resources"]["num_workers"]
    return len(rows), sum(float(r.get("epochs_s") or 0.0) for r in rows) * workers


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


def collect_rows(study_dir: Location) -> tuple[list[dict[str, Any]], StudyState]:
    from robustune import tracking
    from robustune.defense import defense_class
    from robustune.loop import describe_diagnosis
    from robustune.search import no_winner as search_no_winner

    state = StudyState.load(study_dir)
    study = state.study
    mlflow_client = tracking.client(state.tracking_uri)
    workers = study.base.get("resources", {}).get("num_workers", 1)
    per_label: dict[str, dict[str, Any]] = {}
    for entry in study.entries:
        records = state.runs_of(entry.label)
        metrics: dict[str, list[float]] = {k: [] for k in ("clean", "pgd", "aa", "robust", "train_s")}
        alarms, warnings, failed, protocols = 0, [], 0, set()
        diagnostics, progress = [], []
        progress_names = defense_class(entry.defense).progress_metrics
        search = state.searches.get(entry.label)
        no_winner = search_no_winner(search.search_dir) if search else None
        if no_winner:
            diagnostics.append(f"search named no winner, not retrained: {no_winner}")
        for record in sorted(records, key=lambda r: r.seed):
            if record.failed or record.run_id is None or record.evaluation is None:
                failed += 1
                continue
            run = mlflow_client.get_run(record.run_id)
            values = run.data.metrics
            for key, name in (("clean", "test/clean_acc"), ("pgd", "test/pgd_acc"), ("aa", "test/aa_acc"),
                              ("robust", "test/robust_acc")):
                if name in values:
                    metrics[key].append(values[name])
            metrics["train_s"].append(values.get("time/total_s", 0.0) * workers)
            if run.data.tags.get("eval/warning"):
                warnings.append(f"seed {record.seed}: {run.data.tags['eval/warning']}")
            protocols.add(run.data.tags.get("eval/protocol", "?"))
            fired = run_diagnosis(mlflow_client, record.run_id)  # reads alarm/overfit's history too
            alarms += "overfit" in fired
            if fired:
                diagnostics.append(f"seed {record.seed}: {describe_diagnosis(fired)}")
            if progress_names:
                progress.append(f"seed {record.seed}: {progress_note(mlflow_client, record.run_id, progress_names)}")
        trials, search_s = search_compute(search.search_dir) if search else (0, 0.0)
        row: dict[str, Any] = {
            "defense": entry.label, "method": entry.defense, "tuned": entry.tune,
            "tuned_knobs": ("none (no winner)" if no_winner else
                            ", ".join(f"{k}={_short(v)}" for k, v in sorted(search.best_params.items()))
                            if search else "defaults"),
            "seeds": len(metrics["clean"]), "failed_runs": failed,
        }
        for key in ("clean", "pgd", "aa", "robust"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_spread(metrics[key])
        row["train_s"] = _mean_spread(metrics["train_s"])[0]
        row["search_trials"], row["search_s"] = trials, search_s
        row["search_budget_s"] = search.budget_s if search else None
        row["total_s"] = search_s + sum(metrics["train_s"])
        row["overfit_alarms"] = alarms
        row["warnings"] = len(warnings)
        row["warning_text"] = " | ".join(warnings)
        row["no_winner"] = no_winner  # why a tuned entry's search named no best trial (then it has no runs)
        row["diagnostics"] = " | ".join(diagnostics) or None
        row["progress"] = " | ".join(progress) or None
        row["protocol"] = ", ".join(sorted(protocols)) or None
        row["init_from"] = entry.init_from
        row["budget_of"] = entry.budget
        per_label[entry.label] = row
    for row in per_label.values():  # a warm start's own training is part of what the defense cost
        if row["init_from"] in per_label:
            row["total_s"] += per_label[row["init_from"]]["total_s"]
    rows = sorted(per_label.values(), key=lambda r: -(r["aa_mean"] if r["aa_mean"] is not None else -1.0))
    return rows, state


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def headline(rows: list[dict[str, Any]], featured: str | None) -> str:
    """How the featured defense compares with the best tuned baseline at equal budget, in numbers."""
    by_label = {r["defense"]: r for r in rows}
    star = by_label.get(featured) if featured else None
    # Entries without numbers because their search named no winner are named, never silently dropped.
    lost = [r["defense"] for r in rows if r["no_winner"]]
    lost_text = f"; no numbers (search named no winner): {', '.join(lost)}" if lost else ""
    if star is None or star["aa_mean"] is None:
        best = rows[0] if rows and rows[0]["aa_mean"] is not None else None
        parts = [f"{featured}: no AutoAttack result"] if star is not None else []
        if best:
            parts.append(f"best defense: {best['defense']} (AutoAttack {best['aa_mean']:.4f})")
        return "; ".join(parts or ["no results"]) + lost_text
    equal_budget = [r for r in rows if r["budget_of"] == featured and r["aa_mean"] is not None]
    pool = equal_budget or [r for r in rows if r["tuned"] and r["aa_mean"] is not None]
    if not pool:
        return (f"{featured}: AutoAttack {star['aa_mean']:.4f}, clean {star['clean_mean']:.4f}; no tuned baseline"
                + lost_text)
    rival = max(pool, key=lambda r: r["aa_mean"])
    which = "at equal budget" if equal_budget else "(no baseline searched on its budget; best tuned one)"
    aa_diff = 100 * (star["aa_mean"] - rival["aa_mean"])
    clean_diff = 100 * (star["clean_mean"] - rival["clean_mean"])
    verdict = "beats" if aa_diff > 0 else "trails" if aa_diff < 0 else "ties"
    return (f"{featured} {verdict} the best tuned baseline {which}, {rival['defense']}, by {aa_diff:+.1f} points of "
            f"AutoAttack accuracy ({star['aa_mean']:.4f} vs {rival['aa_mean']:.4f}) and {clean_diff:+.1f} points of "
            f"clean accuracy ({star['clean_mean']:.4f} vs {rival['clean_mean']:.4f}); compute "
            f"{star['total_s']:.0f} vs {rival['total_s']:.0f} worker-seconds (search {rival['search_s']:.0f}"
            + (f" of a {rival['search_budget_s']:.0f} budget" if rival.get("search_budget_s") else "") + ")"
            + lost_text)


def _cell(mean: float | None, spread: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {spread:.4f}" if spread else f"{mean:.4f}"


def markdown(rows: list[dict[str, Any]], title: str, head: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", f"**{head}**", "",
             "| defense | tuned knobs | clean | PGD | AutoAttack | all attacks | train s/run | search trials | "
             "search s | total s | overfit alarms | warnings | diagnostics |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['defense']} | {r['tuned_knobs']} | {_cell(r['clean_mean'], r['clean_std'])} | "
            f"{_cell(r['pgd_mean'], r['pgd_std'])} | {_cell(r['aa_mean'], r['aa_std'])} | "
            f"{_cell(r['robust_mean'], r['robust_std'])} | {r['train_s'] or 0:.0f} | {r['search_trials']} | "
            f"{r['search_s']:.0f} | {r['total_s']:.0f} | {r['overfit_alarms']} | {r['warnings']} | "
            f"{_diagnostic_labels(r)} |")
    lines += ["", *notes]
    warned = [r for r in rows if r["warning_text"]]
    if warned:
        lines += ["", "Evaluation warnings:"] + [f"- {r['defense']}: {r['warning_text'][:600]}" for r in warned]
    diagnosed = [r for r in rows if r["diagnostics"]]
    if diagnosed:
        lines += ["", "Training diagnostics (collapsed: ended at chance accuracy; label_leak: training inputs "
                      "give the label away; overfit: catastrophic-overfitting alarm; @ epochs):"]
        lines += [f"- {r['defense']}: {r['diagnostics'][:600]}" for r in diagnosed]
    progressed = [r for r in rows if r["progress"]]
    if progressed:
        lines += ["", "Progress (the defense's own metrics, first -> last epoch):"]
        lines += [f"- {r['defense']}: {r['progress'][:600]}" for r in progressed]
    return "\n".join(lines) + "\n"


def _diagnostic_labels(row: dict[str, Any]) -> str:
    """The table cell: which diagnostics fired for the row (details below the table)."""
    labels = ["no winner"] if row["no_winner"] else []
    labels += [name for name in ("collapsed", "label_leak", "overfit") if f"{name}@" in (row["diagnostics"] or "")]
    return ", ".join(labels) or "-"


def plots(rows: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["aa_mean"] is not None]
    paths = []
    for name, x_key, x_err, x_label, log_x in (
            ("robust_vs_clean.png", "clean_mean", "clean_std", "clean accuracy (test)", False),
            ("robust_vs_compute.png", "total_s", None, "total compute incl. search (worker-seconds)", True)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for r in shown:
            ax.errorbar(r[x_key], r["aa_mean"], xerr=r[x_err] if x_err else None, yerr=r["aa_std"], fmt="o",
                        capsize=3, color="tab:red" if r["tuned"] else "tab:blue")
            ax.annotate(r["defense"], (r[x_key], r["aa_mean"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        if log_x and shown and all(r[x_key] > 0 for r in shown):
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("AutoAttack accuracy (test)")
        ax.set_title(f"{title}\nblue: own defaults, red: tuned", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def build(study_dir: str | Location, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Build, write, print and log the leaderboard of the study in `study_dir`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from robustune import tracking

    study_dir = location(study_dir)
    rows, state = collect_rows(study_dir)
    study = state.study
    head = headline(rows, study.featured)
    evaluation = study.evaluation
    protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
    notes = [f"Study `{state.instance}` ({study.source}); seeds {study.seeds}; "
             f"evaluation protocol {', '.join(protocols) or evaluation.get('protocol', 'quick')} "
             f"(points {evaluation.get('points', 1000)}); mean ± sample std over seeds.",
             "Compute: worker-seconds inside training epochs (validation included). A defense warm-started from "
             "another (init_from) includes that one's total. Searches ran on validation data only."]
    folder = study_dir / FOLDER
    table = pa.table({key: [r[key] for r in rows] for key in rows[0]}) if rows else pa.table({})
    text = markdown(rows, f"Leaderboard: {study.name}", head, notes)
    uri, parent = state.tracking_uri, state.parent_run_id
    with staging(folder) as local:  # written here, then (object store) uploaded to the study folder
        pq.write_table(table, local / "leaderboard.parquet")
        pacsv.write_csv(table, local / "leaderboard.csv")
        (local / "leaderboard.md").write_text(text)
        images = plots(rows, local, f"{study.name}: {head.split(';')[0]}")
        for path in [local / "leaderboard.md", local / "leaderboard.csv", local / "leaderboard.parquet", *images]:
            tracking.log_file(uri, parent, path, FOLDER)
    tracking.set_tag(uri, parent, "headline", head[:5000])
    log(text)
    log(f"leaderboard written to {folder} (Markdown, CSV, Parquet, 2 plots) and logged to MLflow run {parent}")
    return rows


# ------------------------------------------------------------------------------------------------ CLI
def add_parser(commands) -> None:
    parser = commands.add_parser(
        "report", help="build a study's leaderboard (Markdown, CSV, Parquet, plots) and log it to MLflow",
        description="Build the leaderboard of a study from MLflow and its searches' Parquet results: per defense "
                    "the tuned knobs, clean / PGD / AutoAttack accuracy (mean and spread over seeds), training "
                    "and search compute, overfitting alarms and evaluation warnings; print it, write it to "
                    "<study>/leaderboard/ and log it with two plots to the study's MLflow parent run.",
        epilog=textwrap.dedent("""\
            examples:
              robustune report                      # the newest study under runs/
              robustune report default              # the newest run of the study named `default`
              robustune report runs/study-default-20261121-101500
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", help="study folder, study run name, or study name (default: newest)")
    parser.add_argument("--output-dir", help="where studies are looked up: a folder or an object-store URI "
                                             "(default $ROBUSTUNE_OUTPUT_DIR, else runs)")


def command(args: argparse.Namespace) -> int:

    build(find_study_dir(args.study, args.output_dir))
    return 0
