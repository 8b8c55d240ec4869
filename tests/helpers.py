"""Small helpers shared by the tests."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch


def sgd_update(model, lr=0.05):
    """An `update(loss)` like the training loop's: zero, backward, SGD step on `model`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return update


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


class CountingModel(torch.nn.Module):
    """Wraps a model, counting its forward calls and the images they saw."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.images = model, 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.model(x)


def stop_group(process: subprocess.Popen) -> None:
    """End a process this test started, with its group (never anything else)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_it_answers(process: subprocess.Popen, url: str, name: str, timeout: float = 90) -> subprocess.Popen:
    """`process` once `url` answers (any HTTP status); fails the test when it exits or stays silent."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"{name} exited at start"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return process
        except urllib.error.HTTPError:
            return process  # it answered
        except OSError:
            time.sleep(0.3)
    stop_group(process)
    pytest.fail(f"{name} did not answer within {timeout:.0f} s")


def start_mlflow_server(port: int, store: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
         str(store / "mlartifacts")], cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    return wait_until_it_answers(process, f"http://127.0.0.1:{port}/health", "mlflow server")


TRIAL_EPOCH_METRICS = ["train/loss", "train/acc", "train/clean_acc", "val/clean_acc", "val/pgd_acc",
                       "time/epoch_s", "time/total_s", "alarm/overfit"]
MLFLOW_STATUS = {"completed": "FINISHED", "overfit_alarm": "FINISHED", "asha_stopped": "KILLED",
                 "budget_stopped": "KILLED", "failed": "FAILED"}


def assert_trials_tracked_as_they_ended(client, rows) -> None:
    """Every search trial's MLflow run ended in the state its results.parquet row says (FINISHED, KILLED with its
    stop reason, FAILED) and holds every epoch it trained, each once."""
    for row in rows:
        run = client.get_run(row["run_id"])
        assert run.info.status == MLFLOW_STATUS[row["status"]], (row["trial_id"], row["status"], run.info.status)
        if row["status"] in ("asha_stopped", "budget_stopped", "failed"):
            assert run.data.tags.get("stop_reason") == row["status"], (row, run.data.tags)
        if row["status"] != "failed":
            for key in TRIAL_EPOCH_METRICS:
                steps = sorted(m.step for m in client.get_metric_history(row["run_id"], key))
                assert steps == list(range(1, row["epochs_run"] + 1)), (row["trial_id"], key, steps)


def run_study_in_process(study, uri: str) -> dict:
    """Start `study` in this process (a real local Ray); what a study test reads of it: its folder, MLflow URI,
    the log lines, the seconds it took and what its progress display was told runs beside each stage
    (`beside`: (stage number, kind, how many)). The caller shuts Ray down when done."""
    from robustune import progress
    from robustune.study import start_study

    class Recorder(progress.Progress):
        def __init__(self):
            super().__init__("study", live=False)
            self.seen: list[tuple[int | None, str, int]] = []

        def beside(self, kind: str, running: int) -> None:
            super().beside(kind, running)
            self.seen.append((self.stage_now.number if self.stage_now else None, kind, running))

    lines: list[str] = []
    recorder = Recorder()
    previous, progress._current = progress._current, recorder  # what the CLI's `progress.showing` does
    started = time.time()
    try:
        study_dir = start_study(study, log=lines.append)
    finally:
        progress._current = previous
    return {"dir": study_dir, "uri": uri, "lines": lines, "seconds": time.time() - started, "beside": recorder.seen}


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile; fails (never skips) when it is missing: what it checks is for
    people's browsers."""
    import shutil

    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: `make test-ui` installs it (apt-get install -y chromium)")
    shutil.rmtree(profile, ignore_errors=True)
    # --no-sandbox: tests run as root in containers; --disable-dev-shm-usage: containers have a tiny /dev/shm.
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)
