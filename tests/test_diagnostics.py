"""Training diagnostics (did a defense work at all?): a model at chance (collapsed), training inputs that leak the
label, and the overfitting alarm, per epoch in the loop, as MLflow metrics and tags, in a search (a search whose
every trial collapsed names no winner), in a study (that entry fails, loudly) and on the leaderboard, with the
defenses' progress metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from robustune import defense as defense_registry
from robustune.defense import Cost, Defense, StepResult, register_defense
from robustune.loop import (DIAGNOSTIC_METRICS, TrainingLoop, describe_diagnosis, diagnosis, epoch_diagnostics,
                            format_epoch)
from robustune.resolve import load_config

from conftest import fashion_mnist_dir
from helpers import run_study_in_process

SYNTHETIC = ["data.name=synthetic", "data.train_subset=1024", "data.val_size=256", "validation.examples=128",
             "train.batch_size=64", "train.epochs=1"]


# ------------------------------------------------------------------------------------- test defenses
@dataclass
class ConstantClass(Defense):
    """Trains every input toward class 0: the model ends predicting one class, at chance."""

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits = model(x)
        return StepResult(F.cross_entropy(logits, torch.zeros_like(y)), logits)


@dataclass
class LabelInInput(Defense):
    """Its training inputs are the label drawn as a bright band (column block y), the image dropped: the model
    reads the label off its training inputs and learns nothing about images."""

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        inputs = torch.zeros_like(x)
        width = x.shape[-1] // self.ctx.num_classes
        for label in range(self.ctx.num_classes):
            inputs[y == label, :, :, label * width:(label + 1) * width] = 1.0
        logits = model(inputs)
        return StepResult(F.cross_entropy(logits, y), logits)


@dataclass
class ScoresWellThenCollapses(Defense):
    """Trains toward class 0 (the model ends at chance) but reports perfect logits on the epoch's first half:
    the running accuracy on its training inputs is high although nothing leaks by the epoch's end."""

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits = model(x)
        loss = F.cross_entropy(logits, torch.zeros_like(y))
        if step % self.ctx.steps_per_epoch < self.ctx.steps_per_epoch // 2:
            return StepResult(loss, F.one_hot(y, self.ctx.num_classes).float())
        return StepResult(loss, logits)


@dataclass
class WithProgress(Defense):
    """Declares progress metrics (a learned part's entropy and update count), for the leaderboard."""

    progress_metrics = ("policy_entropy", "policy_updates")

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)


TEST_DEFENSES = {"diag_test_constant": ConstantClass, "diag_test_label_in_input": LabelInInput,
                 "diag_test_collapses_mid_epoch": ScoresWellThenCollapses, "diag_test_progress": WithProgress}


@pytest.fixture
def test_defenses():
    """Registered for one test only: other test modules list every registered defense (each must ship a
    search space), and the registry has no public way to unregister."""
    for name, cls in TEST_DEFENSES.items():
        register_defense(name)(cls)
    yield
    for name in TEST_DEFENSES:
        defense_registry._REGISTRY.pop(name, None)


# ------------------------------------------------------------------------------------------- rules
def test_collapse_rule_is_at_most_one_and_a_half_times_chance():
    def collapsed(num_classes, **metrics):
        metrics = {"train/late_acc": 0.1, "train/clean_acc": 0.5, **metrics}
        return epoch_diagnostics(metrics, num_classes)["diag/collapsed"]

    assert collapsed(10, **{"val/clean_acc": 0.10}) == 1.0
    assert collapsed(10, **{"val/clean_acc": 0.15}) == 1.0
    assert collapsed(10, **{"val/clean_acc": 0.16}) == 0.0
    assert collapsed(100, **{"val/clean_acc": 0.014}) == 1.0 and collapsed(100, **{"val/clean_acc": 0.02}) == 0.0
    # Without validation data (a refit) the training-set clean accuracy is what it reads.
    assert collapsed(10, **{"train/clean_acc": 0.1}) == 1.0 and collapsed(10, **{"train/clean_acc": 0.5}) == 0.0


def test_label_leak_rule_compares_training_input_accuracy_with_clean_accuracy():
    def leak(late_train_acc, val_clean, train_clean):
        return epoch_diagnostics({"train/acc": 0.9, "train/late_acc": late_train_acc, "val/clean_acc": val_clean,
                                  "train/clean_acc": train_clean}, 10)

    leaking = leak(0.95, 0.30, 0.28)
    assert leaking["diag/label_leak"] == 1.0 and leaking["diag/leak_gap"] == pytest.approx(0.65)
    assert leak(0.55, 0.30, 0.30)["diag/label_leak"] == 0.0  # a gap of 0.25: not "far above"
    assert leak(0.40, 0.80, 0.82)["diag/label_leak"] == 0.0  # adversarial inputs are harder: a healthy defense
    # A model that memorized a small training set gets its clean training images right as well: not a leak.
    assert leak(1.00, 0.60, 1.00)["diag/label_leak"] == 0.0
    # The epoch's running accuracy (0.9 above) is not what counts: a model that collapsed mid-epoch scored well
    # early on; only the accuracy on the last quarter's training inputs is compared with the end-of-epoch model.
    assert leak(0.10, 0.10, 0.10)["diag/label_leak"] == 0.0


def test_run_diagnosis_counts_a_collapse_only_when_the_run_ends_at_chance():
    def epoch(n, collapsed=0.0, leak=0.0, overfit=0.0):
        return {"epoch": float(n), "diag/collapsed": collapsed, "diag/label_leak": leak, "alarm/overfit": overfit}

    warmed_up = [epoch(1, collapsed=1.0), epoch(2), epoch(3)]
    assert diagnosis(warmed_up) == {}  # near chance while warming up, then learned
    ended = [epoch(1, collapsed=1.0), epoch(2), epoch(3, collapsed=1.0, overfit=1.0), epoch(4, collapsed=1.0)]
    assert diagnosis(ended) == {"collapsed": [3, 4], "overfit": [3]}
    leaking = [epoch(n, leak=1.0) for n in (1, 2, 3)] + [epoch(4), epoch(5, leak=1.0)]
    fired = diagnosis(leaking)
    assert fired == {"label_leak": [1, 2, 3, 5]}
    assert describe_diagnosis(fired) == "label_leak@1,2,3,5"
    assert describe_diagnosis(diagnosis([epoch(n, leak=1.0) for n in (1, 2, 3)])) == "label_leak@1-3"
    assert describe_diagnosis(diagnosis(ended)) == "collapsed@3,4; overfit@3"
    assert set(DIAGNOSTIC_METRICS) == {"collapsed", "label_leak", "overfit"}


# ------------------------------------------------------------------------------------------ the loop
def test_a_model_trained_to_one_class_is_diagnosed_collapsed(test_defenses):
    loop = TrainingLoop(load_config("diag_test_constant", overrides=SYNTHETIC), log=lambda _: None)
    metrics = loop.run_epoch()
    assert metrics["val/clean_acc"] <= 0.15
    assert metrics["diag/collapsed"] == 1.0 and metrics["diag/label_leak"] == 0.0
    assert diagnosis(loop.history) == {"collapsed": [1]}
    assert "ALARM: model at chance (collapsed)" in format_epoch(metrics, loop.epochs)


def test_a_model_that_collapses_mid_epoch_is_collapsed_and_no_label_leak(test_defenses):
    loop = TrainingLoop(load_config("diag_test_collapses_mid_epoch", overrides=SYNTHETIC), log=lambda _: None)
    metrics = loop.run_epoch()
    assert metrics["train/acc"] > 0.5 and metrics["train/late_acc"] < 0.2 and metrics["val/clean_acc"] <= 0.15
    assert metrics["diag/collapsed"] == 1.0 and metrics["diag/label_leak"] == 0.0
    assert diagnosis(loop.history) == {"collapsed": [1]}


def test_training_inputs_that_carry_the_label_are_diagnosed_label_leak(test_defenses):
    loop = TrainingLoop(load_config("diag_test_label_in_input", overrides=SYNTHETIC), log=lambda _: None)
    metrics = loop.run_epoch()
    # High accuracy on its own training inputs, none on images: the inputs gave the label away.
    assert metrics["train/late_acc"] > 0.5 and metrics["val/clean_acc"] < 0.2
    assert metrics["diag/label_leak"] == 1.0 and metrics["diag/leak_gap"] > 0.3
    assert "label_leak" in diagnosis(loop.history)
    assert "ALARM: label leak suspected" in format_epoch(metrics, loop.epochs)


def test_a_healthy_short_fashion_mnist_run_stays_quiet():
    """One epoch of FGSM-RS on 5000 Fashion-MNIST images (eps 0.1): val clean about 0.58, far from chance."""
    config = load_config("fgsm_rs", overrides=[
        "data.name=fashion-mnist", f"data.data_dir={fashion_mnist_dir()}", "data.train_subset=5000",
        "data.val_size=1000", "validation.examples=500", "train.epochs=1", "epsilon=0.1"])
    loop = TrainingLoop(config, log=lambda _: None)
    metrics = loop.run_epoch()
    assert metrics["val/clean_acc"] > 0.3, metrics
    assert metrics["diag/collapsed"] == 0.0 and metrics["diag/label_leak"] == 0.0
    assert metrics["diag/leak_gap"] < 0.0  # adversarial training inputs are harder than clean images
    assert diagnosis(loop.history) == {}
    assert "ALARM" not in format_epoch(metrics, loop.epochs)


# ------------------------------------------------------------- a study whose one search collapses
@pytest.fixture(scope="module")
def collapsing_study(tmp_path_factory):
    """A real tiny study (local Ray, sqlite MLflow): standard training untuned (healthy: val clean about 0.98
    after its epoch), and FGSM searched over learning rates so small (1e-7, 2e-7) that both trials stay at chance.
    The evaluation is a short PGD only (AutoAttack would take most of the test's time)."""
    import ray

    from robustune.study import load_study

    folder = tmp_path_factory.mktemp("collapsing")
    (folder / "space.yaml").write_text(yaml.safe_dump({"train.lr": {"type": "choice", "values": [1e-7, 2e-7]}}))
    definition = {
        "name": "collapsing", "dataset": "synthetic", "model": "small_cnn", "epsilon": 0.03, "epochs": 1,
        "seeds": [0],
        "base": {"data": {"train_subset": 1024, "val_size": 256, "test_subset": 100},
                 "validation": {"examples": 128}, "train": {"batch_size": 64}, "resources": {"cpus_per_worker": 1}},
        "evaluation": {"protocol": "custom", "points": 32, "workers": 1, "batch_size": 32, "checks": False,
                       "pgd_steps": 2, "autoattack": "none"},
        "search": {"samples": 2, "epochs": 1, "searcher": "random", "scheduler": "none"},
        "featured": "standard",
        "defenses": [{"defense": "standard"}, {"defense": "fgsm", "tune": True, "space": "space.yaml"}]}
    (folder / "study.yaml").write_text(yaml.safe_dump(definition))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    study = load_study(folder / "study.yaml", [f"tracking.tracking_uri={uri}",
                                               f"tracking.output_dir={folder / 'runs'}"])
    yield run_study_in_process(study, uri)
    ray.shutdown()


def test_a_search_whose_every_trial_collapsed_names_no_winner(collapsing_study):
    from mlflow import MlflowClient

    state = json.loads((collapsing_study["dir"] / "study.json").read_text())
    search_dir = Path(state["searches"]["fgsm (tuned)"]["search_dir"])
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert len(rows) == 2
    for row in rows:  # recorded as collapsed, with the epoch, next to how the trial ended
        assert row["collapsed"] is True and row["diagnostics"] == "collapsed@1", row
        assert row["status"] == "completed" and row["final.val/clean_acc"] <= 0.15
    summary = json.loads((search_dir / "summary.json").read_text())
    assert "best" not in summary and "best_config" not in summary
    assert summary["no_winner"].startswith("every trial collapsed")
    assert sorted(summary["collapsed_trials"]) == sorted(r["trial_id"] for r in rows)

    client = MlflowClient(collapsing_study["uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["no_winner"].startswith("every trial collapsed")
    assert "best_trial_id" not in parent.data.tags and not any(k.startswith("best.") for k in parent.data.params)
    for row in rows:
        trial = client.get_run(row["run_id"])
        assert trial.data.tags["diagnostic"] == "collapsed@1"
        assert [m.value for m in client.get_metric_history(row["run_id"], "diag/collapsed")] == [1.0]
        assert "best_trial" not in trial.data.tags


def test_the_study_fails_that_entry_loudly_and_goes_on(collapsing_study):
    from mlflow import MlflowClient

    state = json.loads((collapsing_study["dir"] / "study.json").read_text())
    assert [r["label"] for r in state["runs"].values()] == ["standard"]  # the tuned entry was not retrained
    assert any("fgsm (tuned) FAILED: its search named no winner" in line for line in collapsing_study["lines"])
    parent = MlflowClient(collapsing_study["uri"]).get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["no_winner/fgsm-tuned"].startswith("every trial collapsed")


def test_the_leaderboard_says_the_search_named_no_winner(collapsing_study):
    from mlflow import MlflowClient

    folder = collapsing_study["dir"] / "leaderboard"
    rows = {r["defense"]: r for r in pq.read_table(folder / "leaderboard.parquet").to_pylist()}
    lost = rows["fgsm (tuned)"]
    assert lost["clean_mean"] is None and lost["seeds"] == 0 and lost["tuned_knobs"] == "none (no winner)"
    assert lost["no_winner"].startswith("every trial collapsed")
    assert lost["diagnostics"].startswith("search named no winner, not retrained: every trial collapsed")
    assert lost["search_trials"] == 2 and lost["search_s"] > 0  # its compute still counts
    healthy = rows["standard"]
    assert healthy["clean_mean"] > 0.5 and healthy["diagnostics"] is None and healthy["no_winner"] is None
    text = (folder / "leaderboard.md").read_text()
    assert "no numbers (search named no winner): fgsm (tuned)" in text.splitlines()[2]  # the headline
    [table_row] = [line for line in text.splitlines() if line.startswith("| fgsm (tuned) |")]
    assert table_row.endswith("| no winner |")
    assert "- fgsm (tuned): search named no winner, not retrained: every trial collapsed" in text
    # The healthy run was never tagged.
    state = json.loads((collapsing_study["dir"] / "study.json").read_text())
    [record] = state["runs"].values()
    assert "diagnostic" not in MlflowClient(collapsing_study["uri"]).get_run(record["run_id"]).data.tags


# --------------------------------------------------------------- leaderboard from constructed runs
def make_study(tmp_path, uri):
    """A study folder and its MLflow runs written by hand: two defenses, two seeds each, with chosen histories."""
    from mlflow import MlflowClient

    from robustune.study_state import Entry, RunRecord, Study, StudyState

    from robustune.tracking import experiment_id

    client = MlflowClient(uri)
    experiment = experiment_id(uri, "robustune")  # its artifacts next to the store, not in the working directory
    parent = client.create_run(experiment, run_name="study-constructed").info.run_id
    histories = {  # (label, seed) -> per-epoch metrics
        ("learner", 0): [{"train/policy_entropy": 2.302, "train/policy_updates": 20.0},
                         {"train/policy_entropy": 1.9, "train/policy_updates": 30.0},
                         {"train/policy_entropy": 1.41, "train/policy_updates": 40.0, "alarm/overfit": 1.0}],
        ("learner", 1): [{"train/policy_entropy": 2.3, "train/policy_updates": 20.0, "diag/label_leak": 1.0},
                         {"train/policy_entropy": 2.3, "train/policy_updates": 20.0, "diag/label_leak": 1.0},
                         {"train/policy_entropy": 2.3, "train/policy_updates": 20.0, "diag/label_leak": 1.0}],
        ("plain", 0): [{}, {}, {}],
        ("plain", 1): [{}, {}, {"diag/collapsed": 1.0}],
    }
    runs = {}
    for (label, seed), history in histories.items():
        run_id = client.create_run(experiment, run_name=f"{label}-{seed}",
                                   tags={"mlflow.parentRunId": parent}).info.run_id
        for step, metrics in enumerate(history, start=1):
            values = {"diag/collapsed": 0.0, "diag/label_leak": 0.0, "alarm/overfit": 0.0, "epoch": step,
                      "time/total_s": 10.0 * step, **metrics}
            for key, value in values.items():
                client.log_metric(run_id, key, value, step=step)
        for key, value in (("test/clean_acc", 0.8), ("test/pgd_acc", 0.5), ("test/aa_acc", 0.4),
                           ("test/robust_acc", 0.4)):
            client.log_metric(run_id, key, value, step=3)
        client.set_tag(run_id, "eval/protocol", "quick/1")
        runs[f"{label}|{seed}"] = RunRecord(label, {"learner": "diag_test_progress", "plain": "standard"}[label],
                                            seed, str(tmp_path / "runs" / f"{label}-{seed}"), run_id=run_id,
                                            training={"train_seconds": 30.0},
                                            evaluation={"clean_acc": 0.8, "n_clean": 1000, "pgd_acc": 0.5,
                                                        "n_pgd": 200, "aa_acc": 0.4, "n_aa": 200,
                                                        "robust_acc": 0.4})
    source = tmp_path / "study.yaml"
    source.write_text("name: constructed\n")
    study = Study(name="constructed", description="", source=str(source), base={}, seeds=[0, 1],
                  evaluation={"protocol": "quick"},
                  entries=[Entry("diag_test_progress", "learner"), Entry("standard", "plain")])
    study_dir = tmp_path / "study-constructed"
    study_dir.mkdir()
    (study_dir / "study.yaml").write_text(source.read_text())  # a study keeps its definition in its folder
    StudyState(path=study_dir, instance="study-constructed", study=study, parent_run_id=parent, tracking_uri=uri,
               output_dir=str(tmp_path), started=time.time(), runs=runs).save()
    return study_dir


def test_leaderboard_lists_diagnostics_and_progress_per_defense(tmp_path, mlflow_uri, test_defenses):
    from robustune import leaderboard

    study_dir = make_study(tmp_path, mlflow_uri)
    leaderboard.build(study_dir, log=lambda _: None)
    folder = study_dir / "leaderboard"
    for rows in (pq.read_table(folder / "leaderboard.parquet").to_pylist(),
                 pacsv.read_csv(folder / "leaderboard.csv").to_pylist()):
        by_label = {r["defense"]: r for r in rows}
        learner, plain = by_label["learner"], by_label["plain"]
        assert learner["diagnostics"] == "seed 0: overfit@3 | seed 1: label_leak@1-3"
        assert learner["progress"] == ("seed 0: policy_entropy 2.30 -> 1.41, policy_updates 20 -> 40 | "
                                       "seed 1: policy_entropy 2.30, policy_updates 20")
        assert learner["overfit_alarms"] == 1
        assert plain["diagnostics"] == "seed 1: collapsed@3"
        assert plain["progress"] in (None, "")  # standard training declares no progress metrics
    text = (folder / "leaderboard.md").read_text()
    [learner_line] = [line for line in text.splitlines() if line.startswith("| learner |")]
    [plain_line] = [line for line in text.splitlines() if line.startswith("| plain |")]
    assert learner_line.endswith("| label_leak, overfit |") and plain_line.endswith("| collapsed |")
    assert "- learner: seed 0: overfit@3 | seed 1: label_leak@1-3" in text
    assert "- plain: seed 1: collapsed@3" in text
    assert "- learner: seed 0: policy_entropy 2.30 -> 1.41, policy_updates 20 -> 40" in text


def test_a_failed_run_counts_in_its_defense_s_total_compute(tmp_path, mlflow_uri, test_defenses):
    """A seed whose run failed is not in the accuracies, but what it trained (its report's or last checkpoint's
    seconds) is in the defense's total compute."""
    from robustune import leaderboard
    from robustune.study_state import RunRecord, StudyState

    study_dir = make_study(tmp_path, mlflow_uri)
    state = StudyState.load(study_dir)
    failed_dir = tmp_path / "runs" / "plain-2"
    failed_dir.mkdir(parents=True)
    (failed_dir / "report.json").write_text(json.dumps({"train_seconds": 25.0}))  # trained, then its evaluation failed
    state.runs["plain|2"] = RunRecord("plain", "standard", 2, str(failed_dir), run_id=None, failed=True)
    state.save()
    rows, _ = leaderboard.collect_rows(study_dir)
    plain = next(r for r in rows if r["defense"] == "plain")
    assert plain["failed_runs"] == 1 and plain["seeds"] == 2
    assert plain["total_s"] == pytest.approx(30.0 + 30.0 + 25.0)  # two finished runs' time/total_s, the failed one's


def test_a_declared_progress_metric_that_was_never_logged_says_so(tmp_path, mlflow_uri, test_defenses):
    from mlflow import MlflowClient

    from robustune.leaderboard import progress_note

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("robustune", artifact_location=str(tmp_path))).info.run_id
    client.log_metric(run_id, "train/policy_entropy", 2.0, step=1)
    assert progress_note(client, run_id, ("policy_entropy", "policy_updates")) == (
        "policy_entropy 2, policy_updates not logged")
