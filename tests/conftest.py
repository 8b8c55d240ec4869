import os
from pathlib import Path

import pytest
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny models on a shared 2-core machine run far faster on one thread than on two competing ones.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fashion_mnist_dir() -> Path:
    """Where the real data is; fails (never skips) with the fix when it is missing."""
    for candidate in (os.environ.get("ROBUSTUNE_DATA_DIR"), FASHION_MNIST, REPO / "data" / "fashion-mnist"):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    pytest.fail("Fashion-MNIST is missing: run `make data` (installs the dataset-fashion-mnist package)")


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def pytest_unconfigure(config):
    """Close what tests leave open before Python shuts down: a Ray driver still connected (tests that call the
    CLI in this process start a local Ray and keep it, as the CLI does) and the cached MLflow clients. A run of
    the whole suite once exited with status 139 (a crash in the interpreter's shutdown) after every test had
    passed; a connected Ray driver's threads are the likely cause."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "robustune.tracking" in sys.modules:
        sys.modules["robustune.tracking"].client.cache_clear()
