"""Faults injected for real (issue #7): a Ray Train worker killed mid-epoch, the MLflow server unreachable at
the start or gone mid-run, truncated and overwritten checkpoints, a disk that fills up while a checkpoint is
written.

Real parts only: a real local Ray (a `robustune` CLI subprocess where the test needs the process tree), real
MLflow stores (SQLite; a real `mlflow server` subprocess where the test is about the server), a real tmpfs
mount for the full disk. Tests marked `faults` take tens of seconds each (`make test-faults` runs only them;
`make test` runs them too); the others take seconds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from robustune import cli, tracking
from robustune.checkpoints import (CheckpointError, CheckpointWriteError, latest_checkpoint, load_checkpoint,
                                   save_checkpoint)
from robustune.resolve import load_config
from robustune.data import dataset_info
from robustune.models import create_model
from robustune.cluster import worker_threads
from robustune.loop import TrainingLoop
from robustune.run import Run
from robustune.training import TrainingError, run_training

from helpers import free_port, start_mlflow_server, stop_group

EPOCH_METRICS = ["train/loss", "train/acc", "train/clean_acc", "val/clean_acc", "val/pgd_acc",
                 "time/epoch_s", "time/total_s", "alarm/overfit"]
SMALL = ["data.name=synthetic", "data.val_size=500", "validation.examples=200", "data.test_subset=200",
         "train.batch_size=64", "eval.enabled=false"]


# -------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # a cluster an earlier test module left connected in this process
        ray.shutdown()
    ray.init(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def clean_env(monkeypatch):
    """No tracking server or cluster inherited from the environment."""
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def small_config(tmp_path, mlflow_uri, method="fgsm_rs", *overrides, output_dir=None):
    return load_config(method, overrides=SMALL + [f"tracking.tracking_uri={mlflow_uri}",
                                                  f"tracking.output_dir={output_dir or tmp_path / 'runs'}",
                                                  *overrides])


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def run_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def cli_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def robustune_cli(*args, cwd, env=None):
    """The real CLI in its own process group (its local Ray cluster is part of the group's process tree)."""
    return subprocess.Popen([sys.executable, "-m", "robustune.cli", *map(str, args)], cwd=cwd, env=env or cli_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def damage(path: Path, how: str, seed: int = 0) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:  # overwritten with (seeded) garbage of the same size
        path.write_bytes(random.Random(seed).randbytes(len(data)))


def model_state() -> dict:
    info = dataset_info("synthetic")
    return create_model("small_cnn", num_classes=info.num_classes, input_shape=info.input_shape, mean=info.mean,
                        std=info.std).state_dict()


# ================================================================== 1. a Ray Train worker killed mid-epoch
@pytest.mark.faults
@pytest.mark.parametrize("workers, process_name", [(1, "ray::run_one_worker"), (2, "RayTrainWorker")],
                         ids=["in-process-task", "torch-trainer"])
def test_worker_killed_mid_epoch_is_restarted_from_its_checkpoint(tmp_path, mlflow_uri, workers, process_name):
    """SIGKILL the process that trains during epoch 3 (epochs 1-2 checkpointed and logged): with
    resources.max_failures=1 the run restarts from epoch 2's checkpoint (one worker: Ray retries the run's task;
    two workers: Ray Train restarts the worker group); it finishes in the same MLflow run, every epoch logged
    once, and (one worker) with the numbers of an uninterrupted run."""
    run_dir = tmp_path / "runs" / "killworker"
    # Batches of 32: about 80 steps, so an epoch lasts a few seconds even on a fast machine.
    process = robustune_cli("train", "fgsm_rs", *[f"--set={o}" for o in SMALL], "--set=train.batch_size=32",
                            "--set=train.epochs=3", "--set=resources.max_failures=1",
                            f"--set=resources.num_workers={workers}", "--set=resources.cpus_per_worker=1",
                            f"--set=tracking.tracking_uri={mlflow_uri}",
                            "--set=tracking.run_name=killworker", cwd=tmp_path)
    try:
        client = MlflowClient(mlflow_uri)
        deadline = time.time() + 180
        while time.time() < deadline:
            time.sleep(0.2)
            assert process.poll() is None, process.stdout.read()
            if (run_dir / "run.json").exists() and 2 in steps_of(client, run_id_of(run_dir), "val/pgd_acc"):
                break
        else:
            pytest.fail("epoch 2 never reached MLflow")
        run_id = run_id_of(run_dir)
        # Epoch 3 started when epoch 2 was logged: kill the worker half-way through it.
        epoch_seconds = client.get_metric_history(run_id, "time/epoch_s")[-1].value
        time.sleep(max(0.3, epoch_seconds / 2))
        trainers = [pid for pid in descendants(process.pid) if process_name in command_line(pid)]
        assert len(trainers) == workers, [command_line(pid) for pid in descendants(process.pid)]
        assert 3 not in steps_of(client, run_id, "val/pgd_acc") and not (run_dir / "epoch_003").exists(), \
            "the kill would not land mid-epoch 3 (the epochs are too fast on this machine)"
        os.kill(trainers[-1], signal.SIGKILL)
        output, _ = process.communicate(timeout=240)
    finally:
        stop_group(process)
    assert process.returncode == 0, output
    assert "after epoch 2" in output, output  # the restarted worker resumed from epoch 2's checkpoint
    assert output.count("epoch 1/3") == 1 and output.count("epoch 2/3") == 1, output

    runs = client.search_runs([client.get_experiment_by_name("robustune").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert steps_of(client, run_id, key) == [1, 2, 3], key
    if workers > 1:
        return  # two shards of the data: no single-process reference to compare with

    # The same config and seed without Ray and without interruption, on the worker's thread count.
    config = Run.open(run_dir).config
    torch.set_num_threads(worker_threads(config))
    loop = TrainingLoop(config, log=lambda _: None)
    reference = [loop.run_epoch() for _ in range(3)]
    logged = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
              for key in ("val/clean_acc", "val/pgd_acc", "train/loss", "train/acc")}
    # The loop reseeds per (seed, epoch, rank) and restores the optimizer and schedule: on the same thread
    # count the resumed epoch 3 reproduces the uninterrupted one exactly (checked: bit-for-bit here).
    for epoch, expected in enumerate(reference, start=1):
        for key in logged:
            assert logged[key][epoch] == expected[key], (key, epoch, logged[key][epoch], expected[key])


def test_a_restarted_worker_resumes_from_the_newest_checkpoint_on_disk(tmp_path):
    """Ray Train's checkpoint record lags the last report by up to a controller poll: a worker killed right
    after reporting epoch 2 comes back with epoch 1's record. Epoch 2's folder is on disk and must win; a
    folder cut short by a kill during the copy is skipped with a warning."""
    from ray.train import Checkpoint

    from robustune.worker import newest_state

    run_dir = tmp_path / "run"
    for epoch in (1, 2, 3):
        save_checkpoint({"epoch": epoch, "model": model_state()}, run_dir / f"epoch_{epoch:03d}" / "state.pt")
    damage(run_dir / "epoch_003" / "state.pt", "truncated")
    warnings: list[str] = []
    state, source = newest_state(Checkpoint.from_directory(str(run_dir / "epoch_001")), None, torch.device("cpu"),
                                 warn=warnings.append, run_dir=run_dir)
    assert (state["epoch"], source) == (2, run_dir / "epoch_002")
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: not resuming from {run_dir / 'epoch_003'}: "
                                                         f"checkpoint {run_dir / 'epoch_003' / 'state.pt'} cannot be")


# ========================================================================= 2. the MLflow server goes away
@pytest.fixture
def mlflow_server(tmp_path):
    """start() a real MLflow server on one port and store, stop() it (SIGKILL), start() it again."""
    class Server:
        port = free_port()
        store = tmp_path / "server"
        uri = f"http://127.0.0.1:{port}"
        process = None

        def start(self):
            self.store.mkdir(exist_ok=True)
            self.process = start_mlflow_server(self.port, self.store)

        def stop(self):
            stop_group(self.process)

    server = Server()
    yield server
    if server.process is not None:
        server.stop()


def test_unreachable_server_at_start_is_refused_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "robustune.cli", "train", "fgsm_rs", "--set", "data.name=synthetic"],
                            cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri), text=True, capture_output=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"robustune train: error: the MLflow tracking server {uri} does not answer")
    assert "mlflow server --host" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - started < 60  # no minutes of HTTP retries
    assert list(tmp_path.iterdir()) == []  # no run folder, no local store


@pytest.mark.faults
def test_outbox_keeps_writes_while_the_server_is_away_and_sync_sends_them_once(tmp_path, mlflow_server):
    mlflow_server.start()
    uri = mlflow_server.uri
    server_client = MlflowClient(uri)
    run_id = server_client.create_run(server_client.create_experiment("outbox")).info.run_id
    other_run = server_client.create_run(server_client.get_experiment_by_name("outbox").experiment_id).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outbox = tracking.use_outbox(run_id, run_dir)
    tracking.log_metrics(uri, run_id, {"val/pgd_acc": 0.1}, step=1)  # the server is up: sent at once
    assert not outbox.exists()

    mlflow_server.stop()
    started = time.time()
    tracking.log_metrics(uri, run_id, {"val/pgd_acc": 0.2, "train/loss": 1.5}, step=2)
    tracking.log_metrics(uri, run_id, {"val/pgd_acc": 0.1}, step=1)  # an epoch logged again after a resume
    tracking.set_tag(uri, run_id, "stop_reason", "completed")
    tracking.log_dict(uri, run_id, {"clean_acc": 0.9}, "eval/report.json")
    tracking.log_text(uri, run_id, "hello", "notes.txt")
    outside = tmp_path / "model.bin"
    outside.write_bytes(b"weights")
    tracking.log_file(uri, run_id, outside, "checkpoint")
    tracking.set_status(uri, run_id, "FINISHED")
    assert time.time() - started < 30, "writes waited on MLflow's HTTP retries"
    assert [r["op"] for r in tracking.read_outbox(run_dir)] == [
        "log_metrics", "log_metrics", "set_tag", "log_dict", "log_text", "log_file", "set_status"]
    outside.unlink()  # the outbox kept its own copy of a file from outside the run folder
    assert tracking.logged_steps(uri, run_id, "val/pgd_acc") == {1, 2}
    with pytest.raises(MlflowException, match="failed with exception"):  # a run without an outbox: raises as before
        tracking.set_tag(uri, other_run, "k", "v")
    with pytest.raises(tracking.TrackingError, match="does not answer"):  # still down: everything stays queued
        tracking.replay_outbox(run_dir)
    assert len(tracking.read_outbox(run_dir)) == 7

    mlflow_server.start()  # same port, same store
    assert tracking.replay_outbox(run_dir) == 7
    assert not outbox.exists() and not (run_dir / tracking.OUTBOX_FILES).exists()
    assert [(m.step, m.value) for m in sorted(server_client.get_metric_history(run_id, "val/pgd_acc"),
                                              key=lambda m: m.step)] == [(1, 0.1), (2, 0.2)]
    assert steps_of(server_client, run_id, "train/loss") == [2]
    run = server_client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    folder = tmp_path / "downloaded"
    folder.mkdir()
    assert json.loads(Path(server_client.download_artifacts(run_id, "eval/report.json", str(folder))).read_text()) \
        == {"clean_acc": 0.9}
    assert Path(server_client.download_artifacts(run_id, "notes.txt", str(folder))).read_text() == "hello"
    assert Path(server_client.download_artifacts(run_id, "checkpoint/model.bin", str(folder))).read_bytes() == b"weights"
    assert tracking.replay_outbox(run_dir) == 0  # nothing left: a second sync sends nothing


@pytest.mark.faults
def test_server_gone_mid_run_training_finishes_and_sync_completes_the_run(tmp_path, mlflow_server):
    """Kill the MLflow server after epoch 1 is logged: training finishes on its own, keeps what it could not
    send in the run folder; after the server restarts, `robustune sync` completes the MLflow run."""
    mlflow_server.start()
    store = MlflowClient(f"sqlite:///{mlflow_server.store / 'mlflow.db'}")  # the server's own store, read directly
    run_dir = tmp_path / "runs" / "offline"
    process = robustune_cli("train", "fgsm_rs", *[f"--set={o}" for o in SMALL], "--set=train.epochs=4",
                            "--set=tracking.run_name=offline", cwd=tmp_path,
                            env=cli_env(MLFLOW_TRACKING_URI=mlflow_server.uri))
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            time.sleep(0.2)
            assert process.poll() is None, process.stdout.read()
            if (run_dir / "run.json").exists() and 1 in steps_of(store, run_id_of(run_dir), "val/pgd_acc"):
                break
        else:
            pytest.fail("epoch 1 never reached the MLflow server")
        mlflow_server.stop()
        killed = time.time()
        output, _ = process.communicate(timeout=240)
    finally:
        stop_group(process)
    assert process.returncode == 0, output
    assert time.time() - killed < 150, "training hung on the missing server"
    run_id = run_id_of(run_dir)
    assert f"robustune sync {run_dir}" in output, output
    queued = tracking.read_outbox(run_dir)
    assert {r["op"] for r in queued} >= {"log_metrics", "set_tag", "set_status"}
    assert queued[-1] == {**queued[-1], "op": "set_status", "status": "FINISHED"}
    assert store.get_run(run_id).info.status == "RUNNING"  # what the server saw before it went away
    assert 4 not in steps_of(store, run_id, "val/pgd_acc")

    mlflow_server.start()  # same port, same store
    result = subprocess.run([sys.executable, "-m", "robustune.cli", "sync", str(run_dir)], cwd=tmp_path,
                            env=cli_env(), text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sent {len(queued)} queued records" in result.stdout
    assert not (run_dir / tracking.OUTBOX_FILE).exists()
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    for key in EPOCH_METRICS:
        assert steps_of(client, run_id, key) == [1, 2, 3, 4], key
    again = subprocess.run([sys.executable, "-m", "robustune.cli", "sync", "--runs", str(tmp_path / "runs")],
                           cwd=tmp_path, env=cli_env(), text=True, capture_output=True, timeout=120)
    assert again.returncode == 0 and "nothing to sync" in again.stdout, again.stdout + again.stderr
    assert steps_of(client, run_id, "val/pgd_acc") == [1, 2, 3, 4]


# ================================================================ 3. truncated and overwritten checkpoints
@pytest.mark.faults
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_resume_falls_back_past_an_unreadable_newest_checkpoint(local_ray, tmp_path, mlflow_uri, how):
    """--resume with the newest epoch_NNN/state.pt cut in half or overwritten: a warning names the file, it is
    moved aside, and the run continues from the previous intact epoch in the same MLflow run."""
    outcome = run_training(small_config(tmp_path, mlflow_uri, "fgsm_rs", "train.epochs=2"), log=lambda _: None)
    run_dir = outcome.run_dir
    bad = run_dir / "epoch_002" / "state.pt"
    damage(bad, how)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)

    lines: list[str] = []
    run_training(resume_dir=run_dir, log=lines.append)
    warning = next(line for line in lines if line.startswith("warning: "))
    assert warning.startswith(f"warning: checkpoint {bad} cannot be loaded (truncated, corrupted"), warning
    assert warning.endswith(f"moved it aside to {run_dir / 'epoch_002' / 'state.pt.unreadable'} and resuming from "
                            f"{run_dir / 'epoch_001'} instead"), warning
    assert (run_dir / "epoch_002" / "state.pt.unreadable").read_bytes()  # the bad file is kept for a look
    state = load_checkpoint(run_dir / "epoch_002")  # written again by the resumed run
    assert state["epoch"] == 2
    client = MlflowClient(mlflow_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert steps_of(client, outcome.run_id, key) == [1, 2], key
    logged = {key: [m.value for m in sorted(client.get_metric_history(outcome.run_id, key), key=lambda m: m.step)]
              for key in ("time/epoch_s", "val/pgd_acc", "train/loss")}
    # Resumed from epoch 1's checkpoint, not from scratch: epoch 1's record, wall-clock time included, is the
    # original one; epoch 2 trained again reproduces the epoch 2 MLflow logged the first time.
    assert state["history"][0]["time/epoch_s"] == logged["time/epoch_s"][0]
    assert state["history"][1]["val/pgd_acc"] == logged["val/pgd_acc"][1]
    assert state["history"][1]["train/loss"] == logged["train/loss"][1]


def test_a_run_is_finished_in_mlflow_before_its_report_marks_it_done(tmp_path, mlflow_uri, monkeypatch):
    """A resumed search or study skips a run folder that holds report.json. A kill right after the report was
    written must therefore not leave its MLflow run RUNNING: when the report is written, MLflow already says
    FINISHED (a kill before it leaves no report, and the resumed run finishes again)."""
    from robustune.training import execute_here

    run = Run.create(small_config(tmp_path, mlflow_uri, "fgsm_rs", "train.epochs=1"))
    client = MlflowClient(mlflow_uri)
    status_when_reported: list[str] = []
    write_report = Run.write_report

    def killed_after_the_report(self, report):
        status_when_reported.append(client.get_run(self.run_id).info.status)
        write_report(self, report)
        raise KeyboardInterrupt  # the process dies here, before anything else runs

    monkeypatch.setattr(Run, "write_report", killed_after_the_report)
    with pytest.raises(KeyboardInterrupt):
        execute_here(run, None, resume=False, log=lambda _: None)
    assert status_when_reported == ["FINISHED"]
    assert run.finished and client.get_run(run.run_id).info.status == "FINISHED"


def test_resume_with_no_readable_checkpoint_is_a_clear_error(tmp_path, capsys, clean_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "fgsm_rs")
    run_dir = tmp_path / "runs" / "broken"
    (run_dir / "epoch_001").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps(config.to_dict()))  # JSON is YAML
    (run_dir / "run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": config.tracking.tracking_uri}))
    for epoch, how in ((1, "truncated"), (2, "garbage")):
        path = save_checkpoint({"epoch": epoch, "model": model_state()}, run_dir / f"epoch_{epoch:03d}" / "state.pt")
        damage(path, how)

    ray_was_running = ray.is_initialized()
    assert cli.main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robustune train: error: no checkpoint of {run_dir} loads: "), err
    assert str(run_dir / "epoch_001" / "state.pt") in err and str(run_dir / "epoch_002" / "state.pt") in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "epoch_001", "epoch_002", "run.json"]
    assert not (tmp_path / "mlflow.db").exists() and ray.is_initialized() == ray_was_running  # refused before Ray


def test_any_damage_to_a_checkpoint_file_is_a_checkpoint_error(tmp_path):
    """Garbage bytes can look like an old-style pickle and fail torch's unpickler with IndexError, KeyError,
    UnicodeDecodeError...; cuts anywhere break the zip. Every one must be a CheckpointError naming the file."""
    path = save_checkpoint({"epoch": 1, "model": model_state()}, tmp_path / "state.pt")
    intact = path.read_bytes()
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be loaded"):
            load_checkpoint(path)
    for cut in (0, 1, 100, len(intact) // 3, len(intact) - 1):
        path.write_bytes(intact[:cut])
        with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be loaded"):
            load_checkpoint(path)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_init_from_an_unreadable_final_checkpoint_is_a_clear_error(tmp_path, capsys, clean_env, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    final = save_checkpoint({"model": model_state(), "config": {}}, tmp_path / "old" / "final.pt")
    damage(final, how)
    ray_was_running = ray.is_initialized()
    assert cli.main(["train", "standard", "--set", "data.name=synthetic", "--set", f"train.init_from={final}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robustune train: error: checkpoint {final} cannot be loaded (truncated, corrupted"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and ray.is_initialized() == ray_was_running


# ========================================================================== 4. the disk fills up mid-write
@pytest.fixture
def tiny_disk(tmp_path):
    """mount(size) a real tmpfs of that size under tmp_path (we run as root) and unmount it afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def checkpoint_of(epoch: int, floats: int = 100_000) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((floats,), float(epoch))}}  # 400 kB of weights


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tiny_disk):
    disk = tiny_disk("2m")
    run = disk / "run"
    save_checkpoint(checkpoint_of(0), run / "final.pt")
    written = []
    with pytest.raises(CheckpointWriteError) as caught:
        for epoch in range(1, 20):
            save_checkpoint(checkpoint_of(epoch), run / f"epoch_{epoch:03d}" / "state.pt")
            written.append(epoch)
    failed = run / f"epoch_{len(written) + 1:03d}" / "state.pt"
    assert 2 <= len(written) < 19
    assert str(caught.value).startswith(f"cannot write checkpoint {failed}: the disk is full (No space left on device)")
    # Overwriting an existing checkpoint on the full disk fails the same way and leaves the old file.
    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        save_checkpoint(checkpoint_of(99, floats=300_000), run / "final.pt")
    assert torch.equal(load_checkpoint(run / "final.pt")["model"]["w"], checkpoint_of(0)["model"]["w"])
    for epoch in written:
        assert load_checkpoint(run / f"epoch_{epoch:03d}")["epoch"] == epoch
    assert latest_checkpoint(run).name == f"epoch_{written[-1]:03d}"  # the failed epoch left no state file
    assert not failed.exists()
    assert [p.name for p in disk.rglob("*") if "tmp" in p.name] == []  # no temporary files left behind


FILE_SIZE_LIMIT_SCRIPT = """
import os, resource, signal, sys, torch
from pathlib import Path
from robustune.checkpoints import CheckpointWriteError, load_checkpoint, save_checkpoint
path = Path(sys.argv[1])
save_checkpoint({"epoch": 1, "model": {"w": torch.ones(100_000)}}, path)       # 400 kB: under the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                                   # a write past it: EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint({"epoch": 2, "model": {"w": torch.ones(500_000)}}, path)  # 2 MB
except CheckpointWriteError as error:
    print(error)
print(load_checkpoint(path)["epoch"], sorted(p.name for p in path.parent.iterdir()))
"""


def test_file_size_limit_while_writing_keeps_the_previous_checkpoint(tmp_path):
    """Without root (no tmpfs), the same fault from RLIMIT_FSIZE: writes past the limit fail with EFBIG."""
    path = tmp_path / "final.pt"
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(path)], text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message, survivor = result.stdout.strip().splitlines()
    assert message.startswith(f"cannot write checkpoint {path}: the file exceeds the file size limit (File too large)")
    assert survivor == "1 ['final.pt']"  # the previous checkpoint loads; no temporary file left


@pytest.mark.faults
def test_disk_full_in_the_training_loop_fails_the_run_without_a_partial_checkpoint(local_ray, tmp_path, mlflow_uri,
                                                                                 tiny_disk):
    """The run folder on an 8 MB disk: epoch 1's checkpoint (about 5 MB) fits, epoch 2's does not."""
    disk = tiny_disk("8m")
    config = small_config(tmp_path, mlflow_uri, "fgsm_rs", "train.epochs=3", "tracking.run_name=full",
                          output_dir=disk)
    with pytest.raises(TrainingError) as caught:
        run_training(config, log=lambda _: None)
    run_dir = disk / "full"
    assert f"cannot write checkpoint {run_dir / 'epoch_002' / 'state.pt'}: the disk is full" in str(caught.value)
    assert load_checkpoint(run_dir / "epoch_001")["epoch"] == 1
    assert not (run_dir / "epoch_002").exists()
    assert latest_checkpoint(run_dir).name == "epoch_001"
    client = MlflowClient(mlflow_uri)
    run_id = run_id_of(run_dir)
    assert client.get_run(run_id).info.status == "FAILED"
    assert steps_of(client, run_id, "val/pgd_acc") == [1]
