"""Studies: definition checks (no Ray), a tiny study end to end on real Ray + MLflow, `robustune evaluate` sharded
vs in-process, `robustune report`, and `ray job submit` of a study against a real local Ray head."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from robustune.cli import main
from robustune.config import ConfigError
from robustune.study import load_study
from robustune.study_state import StudyState

from helpers import run_study_in_process

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_study.yaml"


def write_study(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    if "defenses" in changes and "featured" not in changes:
        data.pop("featured")  # names a defense of the tiny study
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------- definitions
def test_default_study_is_the_flagship_comparison():
    """LAS-AT against PGD-AT tuned on its training compute, tuned FGSM-RS and standard training as reference
    rows; at least three seeds (six) on their own test slices, about 1000 attacked points per row."""
    study = load_study()
    entries = {e.label: e for e in study.entries}
    assert study.name == "default" and study.featured == "las_at"
    assert set(entries) == {"las_at", "pgd (tuned)", "fgsm_rs (tuned)", "standard"}
    assert not entries["las_at"].tune and not entries["standard"].tune
    pgd = entries["pgd (tuned)"]
    assert pgd.tune and pgd.budget == "las_at"  # PGD-AT searched on LAS-AT's training compute
    assert entries["fgsm_rs (tuned)"].tune
    assert study.base["data"]["name"] == "fashion-mnist" and study.base["model"]["name"] == "small_cnn"
    assert study.evaluation["protocol"] == "quick" and len(study.seeds) >= 3
    assert study.evaluation.get("seed_slices", True) and study.evaluation["points"] * len(study.seeds) >= 999
    # Configs are judged on trials as long as the final runs (ASHA rungs below that).
    assert all(e.search.get("epochs") == study.base["train"]["epochs"] for e in study.entries if e.tune)


def test_seeds_study_tunes_every_seed_paper_defense_on_one_budget():
    study = load_study("search_spaces/studies/seeds.yaml")
    entries = {e.defense: e for e in study.entries}
    assert set(entries) == {"eae", "efgsm", "slat", "atld", "las_at", "fgsm_sdi", "fgsm_pgi", "fgsm_rs", "pgd",
                            "trades", "standard"}
    assert all(e.tune and e.budget == "las_at" for name, e in entries.items() if name not in ("las_at", "standard"))
    assert entries["eae"].init_from == "standard" and entries["eae"].overrides["method"]["calibrate_gamma"] is True
    assert len(study.seeds) >= 3


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"defenses": [{"defense": "nope"}]}, "unknown defense 'nope'"),
    ({"defenses": [{"defense": "fgsm", "tune": True, "budget": "pgd"}]}, "budget: 'pgd' is not the label of an untuned"),
    ({"defenses": [{"defense": "fgsm"}, {"defense": "fgsm"}]}, "share the label 'fgsm'"),
    ({"defenses": [{"defense": "fgsm", "samples": 3}]}, "samples only applies to a searched defense"),
    ({"defenses": [{"defense": "fgsm", "colour": 1}]}, "unknown key 'colour'"),
    ({"defenses": [{"defense": "fgsm", "tune": True, "space": "missing.yaml"}]}, "does not exist"),
    ({"defenses": [{"defense": "fgsm", "set": {"method.alpha_ratio": -1}}]}, "alpha_ratio"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"epsilon": 2.0}, "epsilon"),
    ({"evaluation": {"protocol": "quick", "pgd_steps": 7}}, "only applies to eval.protocol=custom"),
    ({"evaluation": {"checks": "first"}}, "evaluation.checks must be true (gradient-masking checks on every model), "
                                          "false or first_seed"),
    ({"search": {"sample": 3}}, "search: unknown key 'sample'"),
    ({"featured": "nobody"}, "featured: 'nobody'"),
    ({"name": None}, "missing key 'name'"),
])
def test_bad_study_definitions_are_refused_naming_the_problem(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_study(write_study(tmp_path, **change))
    assert "study definition" in str(error.value) and str(tmp_path) in str(error.value)


def test_bad_study_fails_on_the_command_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("name: x\ndefenses: [{defense: fgsm\n")
    assert main(["study", "broken.yaml"]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny study run once, in process, on a real local Ray and a real sqlite MLflow store."""
    import ray

    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    study = load_study(TINY, [f"tracking.tracking_uri={uri}", f"tracking.output_dir={folder / 'runs'}"])
    yield run_study_in_process(study, uri)
    ray.shutdown()


def test_tiny_study_builds_a_complete_leaderboard(tiny_study):
    folder = tiny_study["dir"] / "leaderboard"
    rows = pq.read_table(folder / "leaderboard.parquet").to_pylist()
    assert [r["defense"] for r in rows] != [] and {r["defense"] for r in rows} == {"fgsm_rs", "fgsm (tuned)", "standard"}
    for row in rows:  # every defense has clean, PGD and AutoAttack numbers over both seeds
        assert row["seeds"] == 2 and row["failed_runs"] == 0
        for key in ("clean_mean", "pgd_mean", "aa_mean", "robust_mean"):
            assert row[key] is not None and 0.0 <= row[key] <= 1.0
        assert row["aa_mean"] <= row["clean_mean"] and row["protocol"] == "quick/1"
    tuned = next(r for r in rows if r["defense"] == "fgsm (tuned)")
    assert tuned["search_trials"] >= 1 and "method.alpha_ratio=" in tuned["tuned_knobs"]
    assert tuned["total_s"] >= tuned["search_s"] > 0
    text = (folder / "leaderboard.md").read_text()
    assert "| fgsm (tuned) |" in text and "fgsm_rs" in text.splitlines()[2]  # the headline names the featured one
    assert (folder / "leaderboard.csv").read_text().splitlines()[0].replace('"', "").startswith("defense,method,")
    for image in ("robust_vs_clean.png", "robust_vs_compute.png"):
        assert (folder / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:  # every accuracy with its 95% interval around the mean
        for key in ("clean", "pgd", "aa", "robust"):
            assert row[f"{key}_ci_low"] <= row[f"{key}_mean"] <= row[f"{key}_ci_high"], (row["defense"], key)
        assert row["points_per_seed"] == 64 and 0 <= row["val_pgd_mean"] <= 1
    # evaluation.checks: first_seed: the gradient-masking checks ran on each defense's seed 0 model, and say so.
    state = StudyState.load(tiny_study["dir"])
    assert {(r.label, r.seed): r.evaluation["checks"] is not None for r in state.runs.values()} == {
        (label, seed): seed == 0 for label in ("fgsm_rs", "fgsm (tuned)", "standard") for seed in (0, 1)}
    assert "gradient-masking checks on the model of each defense's first seed" in text
    report = (folder / "report.html").read_text()  # the shareable report: one file, plots inside
    assert "<table" in report and "fgsm (tuned)" in report and report.count('src="data:image/png;base64,') == 2
    assert "name: tiny" in report  # the study definition


def test_tiny_study_lands_in_mlflow_under_one_parent_run(tiny_study):
    from mlflow import MlflowClient

    client = MlflowClient(tiny_study["uri"])
    state = json.loads((tiny_study["dir"] / "study.json").read_text())
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "study"
    # The tested headline: featured vs the baseline searched on its budget, paired on the same seeds and points.
    assert re.match(r"^(fgsm_rs is (better|worse) than|no significant difference in robust accuracy \(every "
                    r"attack\) between fgsm_rs and) fgsm \(tuned\)", parent.data.tags["headline"]), \
        parent.data.tags["headline"]
    assert "paired points over 2 seed(s)" in parent.data.tags["headline"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "leaderboard")}
    assert {"leaderboard/leaderboard.md", "leaderboard/leaderboard.parquet", "leaderboard/leaderboard.csv",
            "leaderboard/robust_vs_clean.png", "leaderboard/robust_vs_compute.png"} <= artifacts
    experiment = parent.info.experiment_id
    finals = client.search_runs([experiment], f"tags.study = '{state['instance']}' and tags.kind = 'study_run'")
    assert len(finals) == 6  # 3 defenses x 2 seeds
    for run in finals:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"test/clean_acc", "test/pgd_acc", "test/aa_acc"} <= set(run.data.metrics)
        assert run.data.tags["eval/protocol"] == "quick/1"
        # Logged by the driver as each evaluation ends (its Ray task does not open MLflow): report and outcomes.
        assert {"eval/quick/report.json", "eval/quick/outcomes.parquet"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "eval/quick")}


def test_the_driver_logs_each_evaluation_and_a_store_that_refuses_it_fails_the_evaluation(tiny_study, tmp_path):
    """A study's evaluation tasks do not open MLflow: the driver logs each report as it arrives. A store that
    cannot take it fails that evaluation (nothing recorded, so a resumed study evaluates it again); an
    unreachable tracking server queues it in the run's outbox, and the evaluation counts."""
    import dataclasses

    from robustune import tracking
    from robustune.study import Evaluations

    state = StudyState.load(tiny_study["dir"])
    record = dataclasses.replace(next(iter(state.runs.values())), run_dir=str(tmp_path / "run"))
    lines: list[str] = []
    state.tracking_uri = f"sqlite:///{tmp_path}"  # a folder, not a database
    refused = Evaluations(state, lines.append, lines.append)
    assert refused._log_to_mlflow(record, record.evaluation, "standard seed 0") is False
    assert refused.failure is not None and "could not be logged to MLflow" in lines[-1]
    state.tracking_uri = "http://127.0.0.1:9"  # nothing listens there
    unreachable = Evaluations(state, lines.append, lines.append)
    assert unreachable._log_to_mlflow(record, record.evaluation, "standard seed 0") is True
    assert unreachable.failure is None
    queued = tracking.read_outbox(tmp_path / "run")
    assert [r["op"] for r in queued][:1] == ["log_metrics"] and queued[0]["run_id"] == record.run_id
    assert any(r["op"] == "log_file" and r["path"].endswith("outcomes.parquet") for r in queued)


def test_every_mlflow_run_of_the_study_ended_as_it_ended(tiny_study):
    """No run is left RUNNING: final runs FINISHED, search trials FINISHED / KILLED with their stop reason
    (ASHA or the compute budget) / FAILED, each with every epoch it reported."""
    from mlflow import MlflowClient

    from helpers import assert_trials_tracked_as_they_ended

    client = MlflowClient(tiny_study["uri"])
    state = json.loads((tiny_study["dir"] / "study.json").read_text())
    experiment = client.get_run(state["parent_run_id"]).info.experiment_id
    runs = client.search_runs([experiment])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for search in state["searches"].values():
        rows = pq.read_table(Path(search["search_dir"]) / "results.parquet").to_pylist()
        assert rows
        assert_trials_tracked_as_they_ended(client, rows)
    for record in state["runs"].values():
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["execution"] == "in_process (1 worker)"


def test_study_prints_and_records_its_utilization(tiny_study):
    from mlflow import MlflowClient

    state = json.loads((tiny_study["dir"] / "study.json").read_text())
    [line] = [line for line in tiny_study["lines"] if line.strip().startswith("utilization ")]
    assert "busy worker-seconds" in line and f"x {state['slots']} slot(s)" in line
    metrics = MlflowClient(tiny_study["uri"]).get_run(state["parent_run_id"]).data.metrics
    assert 0 < metrics["study/utilization"] <= 1.0
    assert metrics["study/wall_s"] == pytest.approx(state["wall_s"])
    assert metrics["study/busy_worker_s"] <= state["wall_s"] * state["slots"]


def test_search_is_capped_by_the_featured_defense_training_compute(tiny_study):
    state = json.loads((tiny_study["dir"] / "study.json").read_text())
    runs = [r for r in state["runs"].values() if r["label"] == "fgsm_rs"]
    budget = sum(r["training"]["train_seconds"] for r in runs) / len(runs)
    search = state["searches"]["fgsm (tuned)"]
    assert search["budget_s"] == pytest.approx(budget)
    summary = json.loads((Path(search["search_dir"]) / "summary.json").read_text())
    assert summary["budget_s"] == pytest.approx(budget)
    rows = pq.read_table(Path(search["search_dir"]) / "results.parquet").to_pylist()
    spent = sum(r["epochs_s"] for r in rows)
    # The search stops once the budget is spent: at most the trials running then go over it, by one epoch each.
    assert spent <= budget + sum(r["epochs_s"] / max(r["epochs_run"], 1) for r in rows) + 1e-6


def test_finished_study_resumes_without_training_again(tiny_study):
    from robustune.study import resume_study

    before = (tiny_study["dir"] / "leaderboard" / "leaderboard.parquet").read_bytes()
    lines: list[str] = []
    started = time.time()
    resume_study(tiny_study["dir"], log=lines.append)
    assert not any("training run(s)" in line for line in lines)  # nothing retrained
    assert not any(line.startswith("eval [") for line in lines)  # nothing re-evaluated
    assert time.time() - started < 60
    after = pq.read_table(tiny_study["dir"] / "leaderboard" / "leaderboard.parquet").to_pylist()
    assert [r["aa_mean"] for r in after] == [r["aa_mean"] for r in pq.read_table(
        __import__("io").BytesIO(before)).to_pylist()]


def test_report_command_finds_the_study_and_prints_the_leaderboard(tiny_study, capsys):
    assert main(["report", str(tiny_study["dir"])]) == 0
    out = capsys.readouterr().out
    assert "# Leaderboard: tiny" in out and "| fgsm (tuned) |" in out


def test_each_seed_was_attacked_on_its_own_slice_the_same_for_every_defense(tiny_study):
    from robustune.evaluation import read_outcomes

    state = json.loads((tiny_study["dir"] / "study.json").read_text())
    indices = {(r["label"], r["seed"]): read_outcomes(r["evaluation"]["outcomes_path"])["test_index"]
               for r in state["runs"].values()}
    for (label, seed), attacked in indices.items():
        assert attacked == list(range(64 * seed, 64 * (seed + 1))), (label, seed)  # seeds [0, 1], 64 points each


def test_report_compare_pairs_two_rows_on_the_command_line(tiny_study, capsys):
    assert main(["report", str(tiny_study["dir"]), "--compare", "fgsm_rs", "standard"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fgsm_rs vs standard in study study-tiny-")
    for line, words in zip(lines[1:5], ("robust accuracy (every attack)", "AutoAttack accuracy", "PGD accuracy",
                                        "clean accuracy (attacked points)")):
        assert f" in {words} (" in line or f"difference in {words} between" in line, line
        assert "128 paired points over 2 seed(s)" in line, line
    assert main(["report", str(tiny_study["dir"]), "--compare", "fgsm_rs", "nobody"]) == 2
    assert "'nobody' is not a defense of study" in capsys.readouterr().err


def test_sharded_evaluation_gives_the_same_flags_as_in_process(tiny_study, tmp_path):
    """`robustune evaluate` with 2 Ray shards and with none: same AutoAttack flags, chunk by chunk."""
    from robustune.evaluate_run import evaluate_run

    run_dir = tiny_study["dir"] / "runs" / "fgsm_rs-seed0"
    copy = tmp_path / "final.pt"
    shutil.copy(run_dir / "final.pt", copy)  # a bare checkpoint: its own state folder, no MLflow run
    settings = {"protocol": "quick", "points": 64, "batch_size": 16, "checks": False}
    alone = evaluate_run(str(copy), {**settings, "workers": 1}, log=lambda _: None)
    sharded_copy = tmp_path / "again" / "final.pt"
    sharded_copy.parent.mkdir()
    shutil.copy(copy, sharded_copy)
    sharded = evaluate_run(str(sharded_copy), {**settings, "workers": 2}, log=lambda _: None)

    def flags(checkpoint: Path):
        files = sorted((checkpoint.parent / "final-eval" / "eval-quick" / "autoattack").glob("chunk-*.json"))
        return [json.loads(f.read_text())["robust"] for f in files]

    assert len(flags(copy)) == 4 and flags(copy) == flags(sharded_copy)
    assert alone["aa_acc"] == sharded["aa_acc"] and sharded["autoattack"]["shards"] == 2
    assert 0 < alone["aa_acc"] <= alone["pgd_acc"] + 0.2  # a model with some robustness, so the flags mean something



def test_study_evaluates_runs_at_once_with_the_numbers_of_one_after_another(tiny_study, tmp_path):
    """Stage 4 runs its evaluations `slots` at a time, each a Ray task: every final run has its evaluation (none
    lost), and evaluating each run again here, one after another as studies once did (AutoAttack sharded over Ray
    tasks from this process), gives the same accuracies, checks and per-point outcomes (none changed or swapped)."""
    from robustune.evaluate_run import evaluate_run
    from robustune.evaluation import read_outcomes
    from robustune.study import seed_evaluation, utilization

    state = StudyState.load(tiny_study["dir"])
    lines = tiny_study["lines"]
    started = [i for i, line in enumerate(lines) if line.startswith("[study] evaluating ")]
    finished = [i for i, line in enumerate(lines) if re.match(r"^\[study\] .* seed \d+ evaluated: ", line)]
    assert len(started) == len(finished) == len(state.runs) == 6
    if state.slots > 1:
        assert started[1] < finished[0]  # the second evaluation started before the first one ended
    for record in state.runs.values():
        assert record.evaluation_s > 0 and record.evaluation_slots == 1 and Path(record.evaluation_file).is_file()
        checkpoint = tmp_path / Path(record.run_dir).name / "final.pt"
        checkpoint.parent.mkdir()
        shutil.copy(Path(record.run_dir) / "final.pt", checkpoint)  # a bare checkpoint: its own state, no MLflow run
        again = evaluate_run(str(checkpoint), seed_evaluation(state.study, record.seed), log=lambda _: None)
        assert again["autoattack"]["shards"] == 2 and record.evaluation["autoattack"]["shards"] == 1
        for key in ("first_point", "clean_acc", "pgd_acc", "aa_acc", "robust_acc", "checks"):
            assert again[key] == record.evaluation[key], (record.key, key)
        assert read_outcomes(again["outcomes_path"]) == read_outcomes(record.evaluation["outcomes_path"]), record.key
    # Each evaluation counts its wall time on the one slot it held.
    assert utilization(state)["evaluation_s"] == pytest.approx(sum(r.evaluation_s for r in state.runs.values()))


def test_untuned_runs_are_evaluated_while_the_search_runs(tiny_study):
    """Evaluations do not wait for stage 4: the untuned runs' evaluations start once stage 1 has trained them,
    before the tuned runs are retrained, and every evaluation is recorded once."""

    lines = tiny_study["lines"]
    retraining = next(i for i, line in enumerate(lines) if line.startswith("[study] stage 3/5"))
    early = [line for line in lines[:retraining] if line.startswith("[study] evaluating ")]
    assert {line.split(" seed ")[0] for line in early} <= {"[study] evaluating fgsm_rs", "[study] evaluating standard"}
    assert early, "no evaluation started before stage 3"
    evaluated = [line for line in lines if re.match(r"^\[study\] .* seed \d+ evaluated: ", line)]
    assert len(evaluated) == len(set(evaluated)) == len(StudyState.load(tiny_study["dir"]).runs)
    # The progress display says so: evaluations running beside a training stage, none beside stage 4 (there
    # they are the stage's own units).
    beside = tiny_study["beside"]
    assert any(stage is not None and stage < 4 and kind == "evaluation" and n > 0 for stage, kind, n in beside)
    assert all(n == 0 for stage, _, n in beside if stage is not None and stage >= 4) and beside[-1][2] == 0


def test_a_study_interrupted_in_evaluation_keeps_the_evaluations_it_finished(tiny_study):
    """A study stopped with two evaluations to go: --resume evaluates just those two (AutoAttack resumed from
    their saved chunks), with the same numbers."""
    from robustune.study import resume_study

    state = StudyState.load(tiny_study["dir"])
    lost = ["fgsm_rs|0", "fgsm (tuned)|1"]  # not standard seed 1: test_evaluate_command counts its evaluations
    before = {key: state.runs[key].evaluation for key in lost}
    for key in lost:
        state.runs[key].evaluation = state.runs[key].evaluation_s = None
    state.save()
    lines: list[str] = []
    resume_study(tiny_study["dir"], log=lines.append)
    assert sorted(line for line in lines if line.startswith("[study] evaluating ")) == [
        "[study] evaluating fgsm (tuned) seed 1", "[study] evaluating fgsm_rs seed 0"]
    after = StudyState.load(tiny_study["dir"])
    for key in lost:
        report = after.runs[key].evaluation
        assert report["autoattack"]["resumed_chunks"] == 2 and after.runs[key].evaluation_s > 0
        for name in ("clean_acc", "pgd_acc", "aa_acc", "robust_acc", "checks"):
            assert report[name] == before[key][name], (key, name)

def test_evaluate_command_logs_to_the_run_in_mlflow(tiny_study, monkeypatch, capsys):
    from mlflow import MlflowClient

    run_dir = tiny_study["dir"] / "runs" / "standard-seed1"
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert main(["evaluate", run_id, "--tracking-uri", tiny_study["uri"], "--points", "32", "--no-checks"]) == 0
    assert "protocol quick/1" in capsys.readouterr().out
    run = MlflowClient(tiny_study["uri"]).get_run(run_id)
    history = MlflowClient(tiny_study["uri"]).get_metric_history(run_id, "test/aa_acc")
    assert len(history) == 2  # the study's evaluation and this one
    assert run.data.tags["eval/protocol"] == "quick/1"


def test_evaluate_refuses_an_unknown_source(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "no-such-run"]) == 2
    assert "neither a run folder, a checkpoint file nor an MLflow run id" in capsys.readouterr().err



def test_refits_that_fall_short_of_their_trial_get_the_next_best_config_refitted(tiny_study, monkeypatch):
    """When a tuned entry's refits end far below the trial that chose their config, the search's next-best config
    is refitted on every seed and the entry keeps the set with the higher mean validation PGD; once decided, it is
    not redone, and the leaderboard row says what happened and counts the unused runs' compute. The decision is
    taken again here from the winner's refits, under a threshold nothing meets and one everything meets, and with
    one of the winner's refits failed (the study is put back as it was afterwards: the other tests read it)."""
    from mlflow import MlflowClient

    from robustune import leaderboard
    from robustune.checkpoints import latest_checkpoint, load_checkpoint
    from robustune.resolve import resolve_config
    from robustune.run import finished_report, run_id_of
    from robustune.search import next_best
    from robustune.study import NEXT_BEST, _refit_next_best_if_short, _search
    from robustune.study_state import RunRecord, StudyState

    study_file = tiny_study["dir"] / "study.json"
    saved = study_file.read_bytes()
    client = MlflowClient(tiny_study["uri"])

    def undecided() -> StudyState:
        """The study as it was right after stage 3: the winner's refits, nothing decided."""
        state = StudyState.load(tiny_study["dir"])
        search = state.searches[entry.label]
        search.next_best, search.refit_checked = None, False
        for seed in state.study.seeds:
            run_dir = state.path / "runs" / f"{entry.slug}-seed{seed}"
            state.runs[f"{entry.label}|{seed}"] = RunRecord(entry.label, entry.defense, seed, str(run_dir),
                                                            run_id_of(run_dir), finished_report(run_dir))
        return state

    entry = StudyState.load(tiny_study["dir"]).study.entry("fgsm (tuned)")
    winner_dirs = sorted(str(tiny_study["dir"] / "runs" / f"{entry.slug}-seed{seed}") for seed in (0, 1))
    next_dirs = sorted(str(tiny_study["dir"] / "runs" / f"{entry.slug}-{NEXT_BEST}-seed{seed}") for seed in (0, 1))
    run_ids = [run_id_of(d) for d in winner_dirs + next_dirs if run_id_of(d)]
    kinds = {run_id: client.get_run(run_id).data.tags["kind"] for run_id in run_ids}
    names = {run_id: client.get_run(run_id).info.run_name for run_id in run_ids}
    failed_report = Path(winner_dirs[1]) / "report.json"
    aside = failed_report.with_name("report.json.aside")
    lines: list[str] = []
    try:
        state = undecided()
        runner_up = next_best(state.searches[entry.label].search_dir)
        assert runner_up is not None and runner_up["params"] != state.searches[entry.label].best_params
        monkeypatch.setattr(leaderboard, "REFIT_SHORTFALL", 2.0)  # no refit can fall that far short
        _refit_next_best_if_short(state, entry, lines.append)
        assert state.searches[entry.label].next_best is None and state.searches[entry.label].refit_checked
        assert lines == [] and sorted(r.run_dir for r in state.runs_of(entry.label)) == winner_dirs

        monkeypatch.setattr(leaderboard, "REFIT_SHORTFALL", -1.0)  # every refit falls short
        state = undecided()
        _refit_next_best_if_short(state, entry, lines.append)
        decision = state.searches[entry.label].next_best
        assert decision["trial_id"] == runner_up["trial_id"] and decision["params"] == runner_up["params"]
        assert any("refitting the next-best config" in line for line in lines)
        for run_dir in next_dirs:  # trained with the runner-up's knobs
            config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
            for key, value in runner_up["params"].items():
                section, name = key.split(".")
                assert config[section][name] == pytest.approx(value), (run_dir, key)
        # Kept: the set with the higher mean validation PGD, nothing else.
        assert decision["kept"] == (decision["refit_val_pgd"] > decision["winner_refit_val_pgd"])
        kept, unused = (next_dirs, winner_dirs) if decision["kept"] else (winner_dirs, next_dirs)
        assert sorted(r.run_dir for r in StudyState.load(tiny_study["dir"]).runs_of(entry.label)) == kept
        assert {client.get_run(run_id_of(d)).data.tags["kind"] for d in unused} == {"study_refit_unused"}
        assert all(client.get_run(run_id_of(d)).info.run_name.endswith(" (unused refit)") for d in unused)
        assert decision["unused_train_s"] > 0

        lines.clear()  # decided: a resumed study (its searches read back first) keeps the decision
        state = StudyState.load(tiny_study["dir"])
        _search(state, entry, lines.append, stage=(2, 5, "search"))
        _refit_next_best_if_short(state, entry, lines.append)
        assert lines == [] and state.searches[entry.label].next_best == decision
        assert sorted(r.run_dir for r in state.runs_of(entry.label)) == kept

        rows, _ = leaderboard.collect_rows(tiny_study["dir"])
        row = next(r for r in rows if r["defense"] == entry.label)
        assert "so the next-best config" in row["diagnostics"] and "then validation PGD" in row["diagnostics"]
        summary = json.loads((Path(state.searches[entry.label].search_dir) / "summary.json").read_text())
        assert row["search_val_pgd"] == (runner_up["val_pgd_acc"] if decision["kept"] else
                                         summary["best"]["metrics"]["val_pgd_acc"])

        # A failed refit (e.g. a non-finite loss on one seed: a config at the edge of divergence) is a shortfall
        # whatever the finished seeds score, and the config that trained on every seed is kept.
        monkeypatch.setattr(leaderboard, "REFIT_SHORTFALL", 2.0)  # no finished refit falls short
        lines.clear()
        state = undecided()
        failed = state.runs[f"{entry.label}|1"]
        failed.training, failed.failed = None, True
        failed_report.rename(aside)  # as a run that failed after its last checkpoint leaves it: no report
        _refit_next_best_if_short(state, entry, lines.append)
        decision = state.searches[entry.label].next_best
        assert any("1 of its 2 final runs failed" in line and "refitting the next-best config" in line
                   for line in lines), lines
        assert decision["winner_failed"] == 1 and decision["refit_failed"] == 0 and decision["kept"]
        # The unused runs' compute counts the failed one's too, up to its last checkpoint.
        workers = resolve_config(state.study.base).resources.num_workers
        spent = [finished_report(winner_dirs[0])["train_seconds"],
                 load_checkpoint(latest_checkpoint(winner_dirs[1]))["total_seconds"]]
        assert spent[1] > 0 and decision["unused_train_s"] == pytest.approx(sum(spent) * workers)
        assert sorted(r.run_dir for r in StudyState.load(tiny_study["dir"]).runs_of(entry.label)) == next_dirs
        rows, _ = leaderboard.collect_rows(tiny_study["dir"])
        row = next(r for r in rows if r["defense"] == entry.label)
        assert "1 of the winner's refits failed" in row["diagnostics"], row["diagnostics"]
    finally:
        if aside.exists():
            aside.rename(failed_report)
        study_file.write_bytes(saved)
        for run_id, kind in kinds.items():
            client.set_tag(run_id, "kind", kind)
            client.set_tag(run_id, "mlflow.runName", names[run_id])

# ------------------------------------------------------------------------------------ ray job submit
RAY_OR_LIBRARY_LINE = re.compile(
    r"^\(\w+ pid=|repeated \d+x across cluster|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING)|"
    r"INFO mlflow|A new study created|Configuration for experiment|TensorBoard|View detailed results")


def assert_plain_study_output(output: str) -> None:
    """What a study prints to a log (not a terminal): its own lines and steady progress lines, no escape codes,
    no line of Ray's, Tune's, MLflow's or Optuna's, and its summary last, ending with the two ways to look."""
    assert "\x1b" not in output, "escape codes in a log"
    lines = [line for line in output.splitlines() if line.strip()]
    foreign = [line for line in lines if RAY_OR_LIBRARY_LINE.search(line)]
    assert not foreign, "lines that are not robustune's: " + "\n".join(foreign[:10])
    assert any(line.startswith("[progress] study tiny stage ") for line in lines)
    [summary] = [i for i, line in enumerate(lines) if line.startswith("study finished: ")]
    after = lines[summary + 1:]
    assert [line.split()[0] for line in after] == ["utilization", "leaderboard:", "MLflow:"], after
    assert "report to share:" in after[1] and "mlflow ui --backend-store-uri" in after[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head with token authentication, started like the README says, stopped afterwards (only its own
    processes: `ray stop` would stop every cluster on the machine)."""
    import psutil
    import ray

    ray.shutdown()  # one Ray cluster at a time on a machine: Ray's placement-group cleanup can mix them up
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    subprocess.run([str(venv_bin / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    # Short: Ray's Unix socket paths under the temp dir must stay below the OS limit of ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    port, dashboard = free_port(), free_port()
    started = subprocess.run([str(venv_bin / "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=False, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "bin": venv_bin}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_study_and_its_runs_reach_mlflow(ray_head, tmp_path):
    from mlflow import MlflowClient

    study = write_study(tmp_path, seeds=[0], defenses=[{"defense": "fgsm_rs"}, {"defense": "standard"}],
                        featured=None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["address"]}
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri, "ROBUSTUNE_PROGRESS_S": "2"}})
    # A head just started may not have its job agent up yet (Ray says to try again): up to 5 minutes on a busy
    # machine (3 were not enough once with a benchmark running beside the suite on 2 cores).
    deadline = time.time() + 300
    while True:
        submit = subprocess.run(
            [str(ray_head["bin"] / "ray"), "job", "submit", "--working-dir", str(REPO), "--runtime-env-json",
             runtime_env, "--", "robustune", "study", str(study), "--set", f"tracking.output_dir={tmp_path / 'runs'}"],
            env=env, capture_output=True, text=True, timeout=540)
        if "No available agent to submit job" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout and "# Leaderboard: tiny" in submit.stdout
    job = re.search(r"Job '(raysubmit_\w+)' submitted successfully", submit.stdout).group(1)
    logs = subprocess.run([str(ray_head["bin"] / "ray"), "job", "logs", job], env=env, capture_output=True,
                          text=True, timeout=120, check=True).stdout
    # Ray's job manager writes its own lines first; the study's output starts after its "Running entrypoint".
    assert "Running entrypoint for job" in logs, logs[:2000]
    assert_plain_study_output(logs.split("Running entrypoint for job", 1)[1].split("\n", 1)[1])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("robustune").experiment_id])
    kinds = sorted(r.data.tags.get("kind", "") for r in runs)
    assert kinds.count("study") == 1 and kinds.count("study_run") == 2
    # Without the token the same head refuses a client.
    refused = subprocess.run([str(ray_head["bin"] / "ray"), "job", "list"], capture_output=True, text=True,
                             env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token",
                                  "HOME": str(tmp_path)}, timeout=120)
    assert refused.returncode != 0
