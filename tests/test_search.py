"""Search: space schema, and real searches with local Ray, MLflow and Parquet on synthetic data."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from robustune.config import ConfigError
from robustune.defense import list_defenses
from robustune.search_space import default_space_path, load_space, parse_space

from helpers import assert_trials_tracked_as_they_ended

BASE = ["--set=data.name=synthetic", "--set=data.val_size=500", "--set=validation.examples=100",
        "--set=train.batch_size=64"]


@pytest.mark.parametrize("spec, message", [
    ({"method.alpha_ratio": {"type": "uniform", "low": 2.0, "high": 0.5}}, "empty or inverted range"),
    ({"method.alpha_ratio": {"type": "uniform", "low": 1.0, "high": 1.0}}, "empty or inverted range"),
    ({"method.alpha_ratio": {"type": "gaussian", "low": 0, "high": 1}}, "unknown type 'gaussian'"),
    ({"method.alpha_ratio": {"type": "uniform", "low": 0.5, "hgh": 2}}, "unknown field(s) hgh"),
    ({"method.alpha_ratio": {"type": "uniform", "low": 0.5}}, "missing high"),
    ({"method.beta": {"type": "uniform", "low": 0, "high": 1}}, "defense 'fgsm_rs' has fields: alpha_ratio"),
    ({"train.lrr": {"type": "loguniform", "low": 0.01, "high": 0.1}}, "not a knob of this run"),
    ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "loguniform needs low > 0"),
    ({"train.lr": {"type": "choice", "values": []}}, "non-empty list"),
    ({"method.alpha_ratio": {"type": "int", "low": 1.5, "high": 3}}, "expected an integer"),
    ({"method.alpha_ratio": {"type": "uniform", "low": "a", "high": 3}}, "expected a number"),
    ([], "non-empty mapping"),
])
def test_space_schema_errors_name_file_key_and_problem(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_space(spec, "spaces/x.yaml", "fgsm_rs")
    assert message in str(info.value) and "spaces/x.yaml" in str(info.value)


def test_space_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method.alpha_ratio: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_space("fgsm_rs", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space("fgsm_rs", tmp_path / "missing.yaml")


@pytest.mark.parametrize("defense", list_defenses())
def test_every_defense_ships_a_valid_space_holding_its_defaults(defense):
    """Every range end makes a valid run, and the defaults lie inside the space, so a search evaluates them
    first and can say whether it beat them."""
    from robustune.resolve import load_config
    from robustune.search import default_point
    from robustune.search_space import check_samples_resolve

    assert default_space_path(defense).is_file(), f"search_spaces/{defense}.yaml is missing"
    space = load_space(defense)
    base = load_config(defense).to_dict()
    check_samples_resolve(space, base)
    assert default_point(defense, space, base) is not None, f"{defense}'s defaults lie outside its space"


def test_space_values_that_make_invalid_runs_are_refused():
    from robustune.resolve import load_config
    from robustune.search_space import check_samples_resolve

    space = parse_space({"method.alpha_ratio": {"type": "uniform", "low": -1.0, "high": 1.0}}, "x.yaml", "fgsm_rs")
    with pytest.raises(ConfigError, match="method.alpha_ratio.*-1.0"):
        check_samples_resolve(space, load_config("fgsm_rs").to_dict())


def search_cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "robustune.cli", "search", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def children(client, parent_id):
    experiment = client.get_experiment_by_name("robustune").experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_four_trial_search_with_a_failing_trial(tmp_path):
    """4 trials: one MLflow parent with 4 children, 4 Parquet rows; the NaN trial fails, the others finish."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "method.alpha_ratio": {"type": "uniform", "low": 0.5, "high": 1.5},
        "train.lr": {"type": "choice", "values": [0.05, 1.0e30]},  # 1e30 makes the loss overflow
    }))
    process = search_cli("fgsm_rs", "--space", str(space), "--samples", "4", "--epochs", "2", "--seed", "3",
                         "--max-concurrent", "2", "--grace-period", "1", *BASE, cwd=tmp_path)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    assert "ASHA judges trials after epoch(s) 1 of 2\n" in output  # the grace period given, not derived
    [search_dir] = list((tmp_path / "runs").glob("search-fgsm_rs-*"))
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["param.train.lr"] == 1.0e30 for r in failed)
    assert all(r["status"] in ("completed", "asha_stopped") for r in rows if r["param.train.lr"] == 0.05)
    assert any(r["param.train.lr"] == 0.05 for r in rows)
    assert all(r["wall_s"] > 0 and r["worker_s"] >= r["wall_s"] for r in rows if r["status"] != "failed")

    state = json.loads((search_dir / "search.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = children(client, state["parent_run_id"])
    assert len(runs) == 4
    assert {r.info.run_id for r in runs} == {r["run_id"] for r in rows}
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert all(statuses[r["run_id"]] == "FAILED" for r in failed)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"]
    assert parent.data.params["search.samples"] == "4"
    assert "[search]" in output and "best:" in output
    assert_trials_tracked_as_they_ended(client, rows)
    # Trials never touch the test split.
    for run in runs:
        assert not any(key.startswith("test/") for key in run.data.metrics)


def test_trials_that_asha_stops_end_killed_with_every_epoch_they_reported(tmp_path):
    """One at a time: the defaults (lr 0.05) learn, lr 1e-7 does not, so ASHA stops the 1e-7 trials at their
    first rung: epoch 3 of 4, the first where the cyclic learning rate has fallen to half its peak (the default
    grace period). Every trial's MLflow run ends as it ended, with every epoch it reported: Tune ends a trial
    right after a report, so each epoch is logged and checkpointed before it is reported."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"type": "choice", "values": [0.05, 1.0e-7]}}))
    process = search_cli("fgsm_rs", "--space", str(space), "--samples", "4", "--epochs", "4", "--searcher",
                         "random", "--seed", "1", "--max-concurrent", "1", *BASE, cwd=tmp_path)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    assert "ASHA judges trials after epoch(s) 3 of 4 (the learning rate has fallen to half its peak" in output
    [search_dir] = list((tmp_path / "runs").glob("search-fgsm_rs-*"))
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert len(rows) == 4
    stopped = [r for r in rows if r["status"] == "asha_stopped"]
    assert stopped and all(r["param.train.lr"] == 1.0e-7 and r["epochs_run"] == 3 for r in stopped), rows
    assert any(r["status"] == "completed" and r["epochs_run"] == 4 for r in rows)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_trials_tracked_as_they_ended(client, rows)
    parent = json.loads((search_dir / "search.json").read_text())["parent_run_id"]
    assert not [r.info.run_id for r in children(client, parent) if r.info.status == "RUNNING"]
    # The trials ran in their reused trial processes, not in nested TorchTrainers.
    assert {client.get_run(r["run_id"]).data.tags["execution"] for r in rows} == {"in_process (1 worker)"}


def test_compute_budget_stops_a_trial_before_its_next_epoch_would_overrun():
    from robustune.search import ComputeBudget

    budget = ComputeBudget(budget_s=20.0, workers=2)  # worker-seconds; each trial uses 2 workers
    assert budget.fits_trials(1)
    assert budget("a", {"time/total_s": 3.0}) is False  # spent 6, next epoch 6 -> 12 <= 20
    assert budget("b", {"time/total_s": 2.0}) is False  # spent 10, b's next 4 -> 14
    assert budget.fits_trials(1)  # a typical epoch (the upper median of 6 and 4 worker-s) still fits: 10 + 6 <= 20
    assert not budget.fits_trials(2)  # two would not: 10 + 12 > 20
    assert budget.trials_affordable() == 1  # what the progress display counts as still to come
    assert budget("a", {"time/total_s": 6.0}) is True  # spent 16, a's next 6 -> 22 > 20: stop a now
    assert budget.spent_s == 16.0 and not budget.fits_trials(1)  # and start no new trial
    assert budget("b", {"time/total_s": 3.0}) is False  # spent 18, b's next 2 -> 20: fits exactly
    assert budget("b", {"time/total_s": 4.0}) is True  # spent 20, b's next 2 -> 22 > 20
    # Tune hands a trial's last report to the stopper twice; the repeat is no 0-s epoch that makes room.
    judged = ComputeBudget(budget_s=30.0, workers=1, judged_epochs=2)
    for total in (10.0, 20.0, 20.0):
        judged("a", {"time/total_s": total, "run_finished": total == 20.0})
    assert judged.last_epoch_s == {"a": 10.0} and not judged.fits_trials(1)  # 20 + 2 x 10 > 30
    unlimited = ComputeBudget(budget_s=None, workers=1)
    assert unlimited("a", {"time/total_s": 1e9}) is False and unlimited.fits_trials(100)
    assert unlimited.trials_affordable() is None


def test_compute_budget_tells_the_progress_display_what_is_spent_and_what_the_rest_pays_for():
    import io

    from robustune import progress
    from robustune.search import ComputeBudget

    with progress.showing("search pgd", stream=io.StringIO(), live=False) as shown:
        shown.stage(1, 1, "search pgd", units=12, kind="trial", at_once=2)
        budget = ComputeBudget(budget_s=60.0, workers=1, judged_epochs=3)
        assert budget.trials_affordable() is None  # no epoch measured: only the upper bound, 12, is known
        budget("a", {"time/total_s": 8.0})
        budget("b", {"time/total_s": 8.0})
        # 16 of 60 spent; a whole trial costs 3 epochs of 8 s, and the rest (44) pays for 1, counted as when
        # trials are suggested: the batch's running ones whole. With a and b running, none is queued.
        assert budget.trials_affordable() == 1
        shown.unit_started("a")
        shown.unit_started("b")
        line = shown.status_line()
    assert "0/12 trials done, 2 running, 0 queued; compute budget 16 of 60 worker-s spent;" in line


def test_grid_values_are_even_inside_the_range_and_cover_choices():
    space = parse_space({"method.alpha_ratio": {"type": "uniform", "low": 0.5, "high": 2.0},
                         "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.3},
                         "train.batch_size": {"type": "choice", "values": [64, 128]}}, "x.yaml", "fgsm_rs")
    from robustune.search import grid_size, grid_values

    values = grid_values(space, 3)
    assert values["method.alpha_ratio"] == [0.5, 1.25, 2.0]
    lr = values["train.lr"]
    assert lr[0] == 0.01 and lr[-1] == 0.3 and abs(lr[1] / lr[0] - lr[2] / lr[1]) < 1e-9  # even in log
    assert values["train.batch_size"] == [64, 128]
    assert grid_size(space, 3) == 18 and grid_size(space, 1) == 2


def test_space_filling_start_puts_a_point_in_every_quarter_of_every_range():
    """TPE's start-up design: 4 points, one in each quarter of each knob's range (log scale for loguniform) and
    one in each quadrant of the pair, whatever the seed; values inside the ranges; the same seed, the same
    points."""
    from robustune.search_space import space_filling_points

    space = parse_space({"method.alpha_ratio": {"type": "uniform", "low": 0.5, "high": 2.0},
                         "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.3}}, "x.yaml", "fgsm_rs")
    import math

    def quarter(value, low, high, log=False):
        position = (math.log(value / low) / math.log(high / low)) if log else (value - low) / (high - low)
        return min(3, int(position * 4))

    for seed in range(20):
        points = space_filling_points(space, 4, seed)
        alpha = [quarter(p["method.alpha_ratio"], 0.5, 2.0) for p in points]
        lr = [quarter(p["train.lr"], 0.01, 0.3, log=True) for p in points]
        assert sorted(alpha) == [0, 1, 2, 3] and sorted(lr) == [0, 1, 2, 3], (seed, points)
        assert sorted((a // 2, b // 2) for a, b in zip(alpha, lr)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(0.5 <= p["method.alpha_ratio"] <= 2.0 and 0.01 <= p["train.lr"] <= 0.3 for p in points)
    assert space_filling_points(space, 4, 3) == space_filling_points(space, 4, 3)
    assert space_filling_points(space, 4, 3) != space_filling_points(space, 4, 4)
    assert len(space_filling_points(space, 3, 0)) == 3 and space_filling_points(space, 0, 0) == []


def test_unit_positions_map_to_every_value_of_int_and_choice_knobs():
    space = parse_space({"method.steps": {"type": "int", "low": 2, "high": 10, "step": 4},
                         "train.batch_size": {"type": "choice", "values": [64, 128]}}, "x.yaml", "pgd")
    steps, batch = space["method.steps"], space["train.batch_size"]
    assert [steps.from_unit(u) for u in (0.0, 0.34, 0.67, 1.0)] == [2, 6, 10, 10]
    assert [batch.from_unit(u) for u in (0.0, 0.49, 0.5, 1.0)] == [64, 64, 128, 128]


def test_tpe_starts_from_the_defaults_and_the_space_filling_points(tmp_path):
    """A TPE search's first trials are the defaults, then the seeded space-filling design, in that order."""
    from robustune.search_space import space_filling_points

    process = search_cli("fgsm_rs", "--samples", "3", "--epochs", "1", "--max-concurrent", "1", "--seed", "7",
                         "--scheduler", "none", *BASE, cwd=tmp_path)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    [search_dir] = list((tmp_path / "runs").glob("search-fgsm_rs-*"))
    rows = sorted(pq.read_table(search_dir / "results.parquet").to_pylist(), key=lambda r: r["trial_index"])
    tried = [(r["param.method.alpha_ratio"], r["param.train.lr"]) for r in rows]
    design = space_filling_points(load_space("fgsm_rs"), 2, 7)
    from robustune.resolve import load_config

    defaults = load_config("fgsm_rs")
    assert tried[0] == pytest.approx((defaults.method_params["alpha_ratio"], defaults.train.lr))
    assert tried[1:] == [pytest.approx((p["method.alpha_ratio"], p["train.lr"])) for p in design]


def test_grid_search_runs_every_grid_point_once(tmp_path):
    """--searcher grid: the trials are exactly the grid's points (2 x 2), once each, without the defaults, and
    --samples does not cut the grid short."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"method.alpha_ratio": {"type": "uniform", "low": 0.5, "high": 1.5},
                                     "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}}))
    process = search_cli("fgsm_rs", "--space", str(space), "--searcher", "grid", "--grid-points", "2",
                         "--samples", "1", "--epochs", "1", "--max-concurrent", "2", "--scheduler", "none", *BASE,
                         cwd=tmp_path)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    [search_dir] = list((tmp_path / "runs").glob("search-fgsm_rs-*"))
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    points = sorted((r["param.method.alpha_ratio"], round(r["param.train.lr"], 12)) for r in rows)
    assert points == [(0.5, 0.01), (0.5, 0.1), (1.5, 0.01), (1.5, 0.1)]
    assert all(r["status"] == "completed" for r in rows)
    assert json.loads((search_dir / "search.json").read_text())["settings"]["samples"] == 4


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    args = ["fgsm_rs", "--samples", "4", "--epochs", "2", "--max-concurrent", "1", "--scheduler", "none", *BASE]
    process = search_cli(*args, cwd=tmp_path)
    finished = []
    deadline = time.time() + 600
    for line in process.stdout:
        if line.startswith("[search] trial") and "finished" in line:
            finished.append(line.split()[2])
            if len(finished) == 2:
                break
        assert time.time() < deadline, "two trials never finished"
    time.sleep(1.5)  # Tune saves its experiment state once a second: the kill lands after it knows both finished
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    [search_dir] = list((tmp_path / "runs").glob("search-fgsm_rs-*"))
    state = json.loads((search_dir / "search.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = {r.data.tags["search_trial_id"]: r.info.run_id for r in children(client, state["parent_run_id"])}
    assert set(finished) <= set(before)

    resumed = search_cli("--resume", str(search_dir), cwd=tmp_path)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    runs = children(client, state["parent_run_id"])
    # A trial started (or finished) just before the kill, after Tune last saved its state, is not part of the
    # resumed search (Tune starts another in its place): its run must not stay RUNNING either.
    orphans = [r for r in runs if r.data.tags["search_trial_id"] not in {row["trial_id"] for row in rows}]
    assert len(orphans) <= 1
    for orphan in orphans:
        assert orphan.info.status == "FINISHED" or (orphan.info.status == "KILLED"
                                                     and orphan.data.tags["stop_reason"] == "interrupted"), orphan
    assert not [r for r in runs if r.info.status == "RUNNING"]
    after = {r.data.tags["search_trial_id"]: r.info.run_id for r in runs if r not in orphans}
    assert len(after) == 4
    for trial in finished:  # finished trials were not retrained: same MLflow run, each epoch logged once
        assert after[trial] == before[trial]
        assert sorted(m.step for m in client.get_metric_history(after[trial], "epoch")) == [1, 2]
    assert all(r["status"] == "completed" and r["epochs_run"] == 2 for r in rows)


def test_a_second_run_of_a_resumed_trial_does_not_stay_running(tmp_path):
    """Killed between creating its MLflow run and writing run.json, a trial that Tune resumes creates a new
    run under the same trial id: the first one is no trial's run any more and must end KILLED (interrupted)."""
    from robustune.search import end_orphaned_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("orphans")
    parent = client.create_run(experiment).info.run_id
    tags = {"mlflow.parentRunId": parent, "search_trial_id": "abc123"}
    cut_short = client.create_run(experiment, tags=tags).info.run_id
    resumed = client.create_run(experiment, tags=tags).info.run_id
    other = client.create_run(experiment, tags={**tags, "search_trial_id": "def456"}).info.run_id
    lines = []
    end_orphaned_trials(uri, parent, {resumed, other}, lines.append)
    assert client.get_run(cut_short).info.status == "KILLED"
    assert client.get_run(cut_short).data.tags["stop_reason"] == "interrupted"
    assert client.get_run(resumed).info.status == client.get_run(other).info.status == "RUNNING"
    assert len(lines) == 1 and "abc123" in lines[0] and cut_short in lines[0]
