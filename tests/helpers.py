"""Small helpers shared by the tests."""

import os
import signal
import socket
import subprocess
import sys
import time
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


def start_mlflow_server(port: int, store: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
         str(store / "mlartifacts")], cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        assert process.poll() is None, "mlflow server exited at start"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return process
        except OSError:
            time.sleep(0.3)
    stop_group(process)
    pytest.fail("mlflow server did not answer within 90 s")
