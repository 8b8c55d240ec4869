"""Integration: real local Ray, real MLflow store, the real CLI; synthetic data unless the test says otherwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from robustune.resolve import load_config
from robustune.training import run_training

from conftest import fashion_mnist_dir

EPOCH_METRICS = ["train/loss", "train/acc", "train/clean_acc", "val/clean_acc", "val/pgd_acc",
                 "time/epoch_s", "time/total_s", "alarm/overfit"]
SMALL = ["data.name=synthetic", "data.val_size=500", "validation.examples=200", "data.test_subset=200",
         "eval.points=40", "train.batch_size=64"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def small_config(tmp_path, mlflow_uri, method="fgsm_rs", *overrides):
    return load_config(method, overrides=SMALL + [f"tracking.tracking_uri={mlflow_uri}",
                                                  f"tracking.output_dir={tmp_path / 'runs'}", *overrides])


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_training_run_is_tracked_in_mlflow(local_ray, tmp_path, mlflow_uri):
    outcome = run_training(small_config(tmp_path, mlflow_uri, "fgsm_rs", "train.epochs=2"), log=lambda _: None)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert steps_of(client, outcome.run_id, key) == [1, 2], key
    for key in ("test/clean_acc", "test/pgd_acc", "test/aa_acc"):
        assert key in run.data.metrics
    assert run.data.metrics["test/pgd_acc"] <= run.data.metrics["test/clean_acc"]
    assert {"method": "fgsm_rs", "dataset": "synthetic", "model": "small_cnn", "seed": "0"}.items() <= run.data.tags.items()
    assert float(run.data.tags["epsilon"]) == pytest.approx(0.05)
    assert run.data.params["method.alpha_ratio"] == "1.25" and run.data.params["train.epochs"] == "2"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "eval", "checkpoint"} <= artifacts
    report = json.loads(Path(client.download_artifacts(outcome.run_id, "eval/quick/report.json", str(tmp_path))).read_text())
    assert report["pgd"]["steps"] == 20 and report["n_aa"] == 40
    assert report["autoattack"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert report == outcome.report


def test_two_workers_log_one_run(local_ray, tmp_path, mlflow_uri):
    config = small_config(tmp_path, mlflow_uri, "fgsm_rs", "train.epochs=1", "resources.num_workers=2",
                          "resources.cpus_per_worker=1", "eval.protocol=custom", "eval.autoattack=none")
    outcome = run_training(config, log=lambda _: None)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("robustune").experiment_id])
    assert [r.info.run_id for r in runs] == [outcome.run_id]
    assert steps_of(client, outcome.run_id, "val/pgd_acc") == [1]
    assert outcome.report["clean_acc"] > 0.5
    # Two workers go through Ray Train's TorchTrainer (data-parallel); one worker runs in its Ray process.
    assert runs[0].data.tags["execution"] == "torch_trainer (2 workers)"
    assert runs[0].info.status == "FINISHED"


def test_one_worker_runs_in_its_ray_process_without_torch_trainer(local_ray, tmp_path, mlflow_uri):
    config = small_config(tmp_path, mlflow_uri, "fgsm_rs", "train.epochs=2", "eval.enabled=false")
    outcome = run_training(config, log=lambda _: None)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["execution"] == "in_process (1 worker)" and run.info.status == "FINISHED"
    assert steps_of(client, outcome.run_id, "val/pgd_acc") == [1, 2]
    # Its checkpoints are written straight into the run folder (the two newest), final.pt and report last.
    assert sorted(p.name for p in outcome.run_dir.glob("epoch_*")) == ["epoch_001", "epoch_002"]
    assert (outcome.run_dir / "final.pt").is_file() and outcome.report["epochs_run"] == 2


def test_nan_loss_fails_the_run_cleanly(local_ray, tmp_path, mlflow_uri):
    from robustune.training import TrainingError

    config = small_config(tmp_path, mlflow_uri, "standard", "train.epochs=1", "train.lr=1e30",
                          "train.momentum=0.0", "eval.protocol=custom", "eval.autoattack=none")
    with pytest.raises(TrainingError, match="loss became (nan|inf)"):
        run_training(config, log=lambda _: None)
    run = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("robustune").experiment_id])[0]
    assert run.info.status == "FAILED"


def robustune_cli(*args, cwd, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "robustune.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def test_killed_run_resumes_in_the_same_mlflow_run(tmp_path, mlflow_uri):
    """Kill the whole process tree after epoch 2 is logged; --resume continues at epoch 3, same run."""
    # PGD-10 makes an epoch last seconds, so the kill lands between epochs 2 and 3.
    args = ["train", "pgd", *[f"--set={o}" for o in SMALL], "--set=train.epochs=4",
            f"--set=tracking.tracking_uri={mlflow_uri}", "--set=eval.protocol=custom", "--set=eval.autoattack=none",
            "--set=tracking.run_name=killme"]
    process = robustune_cli(*args, cwd=tmp_path)
    client = MlflowClient(mlflow_uri)
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline:
        time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        if run_id is None and (tmp_path / "runs" / "killme" / "run.json").exists():
            run_id = json.loads((tmp_path / "runs" / "killme" / "run.json").read_text())["run_id"]
        if run_id and 2 in steps_of(client, run_id, "val/pgd_acc"):
            break
    else:
        pytest.fail("epoch 2 never reached MLflow")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    resumed = robustune_cli("train", "--resume", str(tmp_path / "runs" / "killme"), cwd=tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "after epoch 2" in output and "epoch 3/4" in output and "epoch 1/4" not in output
    assert steps_of(client, run_id, "val/pgd_acc") == [1, 2, 3, 4]
    assert steps_of(client, run_id, "train/loss") == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("robustune").experiment_id])) == 1


@pytest.mark.parametrize("args, message", [
    (["train", "nope"], "unknown method 'nope'"),
    (["train", "pgd", "--set", "epsilon=2"], "epsilon must be in [0, 1]"),
    (["train", "pgd", "--set", "train.lr=fast"], "train.lr: expected a number"),
    (["train", "pgd", "--set", "data.data_dir=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    (["train", "--resume", "/nonexistent/run"], "not a robustune run folder"),
])
def test_cli_refuses_bad_input_before_any_work(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "robustune.cli", *args], cwd=tmp_path, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_cli_help_and_methods(tmp_path):
    for args in (["--help"], ["train", "--help"], ["methods", "--help"]):
        result = subprocess.run([sys.executable, "-m", "robustune.cli", *args], text=True, capture_output=True)
        assert result.returncode == 0 and "usage" in result.stdout
    # Every subcommand's help renders (argparse formats help text with %: a bare "95%" once broke `report`).
    import argparse

    from robustune.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "search", "study", "evaluate", "report", "sync"} <= set(commands)
    for name, parser in commands.items():
        assert parser.format_help().startswith(f"usage: robustune {name}"), name
    result = subprocess.run([sys.executable, "-m", "robustune.cli", "methods"], text=True, capture_output=True)
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["pgd", "11F11B"] for line in lines)
    assert any(line.split()[:2] == ["standard", "1F1B"] for line in lines)


def test_fashion_mnist_end_to_end(local_ray, tmp_path, mlflow_uri):
    """Real data through the whole path: Fashion-MNIST subset, one epoch, evaluation with AutoAttack."""
    config = load_config("fgsm_rs", overrides=[
        f"data.data_dir={fashion_mnist_dir()}", "data.train_subset=3000", "data.test_subset=500",
        "train.epochs=1", "validation.examples=300", "eval.points=30",
        f"tracking.tracking_uri={mlflow_uri}", f"tracking.output_dir={tmp_path / 'runs'}"])
    outcome = run_training(config, log=lambda _: None)
    assert outcome.report["n_clean"] == 500 and outcome.report["epsilon"] == pytest.approx(0.1)
    assert outcome.report["clean_acc"] > 0.4  # ten classes; chance is 0.1


STARTING_PROBE = r"""
import os, sys, threading
from robustune import tracking
from robustune.cluster import ensure_ray
import ray

uri = sys.argv[1]
seen = {}

def load_mlflow_then_fail():
    seen["thread"] = threading.current_thread() is not threading.main_thread()
    seen["ray_up_at_start"] = ray.is_initialized()
    tracking.load_modules(uri)
    raise RuntimeError("a failure in the side work must not stop Ray's start")

ensure_ray(meanwhile=load_mlflow_then_fail)
assert ray.is_initialized()
assert seen == {"thread": True, "ray_up_at_start": False}, seen
assert "mlflow.store.tracking.sqlalchemy_store" in sys.modules  # loaded by the time ensure_ray returned
assert not os.path.exists(uri[len("sqlite:///"):])  # and nothing created: a refused run leaves no store
print("PROBE OK")
"""


def test_mlflow_loads_while_ray_starts_creating_nothing_and_its_errors_do_not_stop_ray(tmp_path):
    """ensure_ray runs its side work (a run, search or study loads MLflow there) in another thread while Ray
    starts, has waited for it when it returns, and drops its error for the caller's next use to raise. Loading
    creates no store: the checks after Ray's start may still refuse the run. A fresh process: Ray must not be
    started yet."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", STARTING_PROBE, f"sqlite:///{tmp_path / 'mlflow.db'}"],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=180)
    assert result.returncode == 0 and "PROBE OK" in result.stdout, result.stderr[-3000:]
