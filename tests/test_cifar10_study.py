"""The shipped CIFAR-10 study (search_spaces/studies/cifar10.yaml): `robustune study --check` accepts it against a
folder in the CIFAR-10 python layout and refuses it, naming the folder, when the data is missing. No GPU, no Ray
started, nothing trained: the check only resolves every run and search and looks for the files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robustune.data import ENV_DATA_DIR, load_dataset
from robustune.study import load_study

REPO = Path(__file__).resolve().parents[1]
CIFAR10_STUDY = REPO / "search_spaces" / "studies" / "cifar10.yaml"
EXAMPLES_PER_FILE = 20
SEED_PAPER_DEFENSES = ("eae", "efgsm", "slat", "atld", "las_at", "fgsm_sdi", "fgsm_pgi")
BASELINES = ("fgsm_rs", "pgd", "trades", "standard")


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    """tmp_path/cifar-10-batches-py/ as cifar-10-python.tar.gz unpacks it, with tiny batches: each file a
    pickled dict with b'data' (N, 3072) uint8 and b'labels' (a list of N ints), as in the real files."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(),
                 b"data": rng.integers(0, 256, (EXAMPLES_PER_FILE, 3072), dtype=np.uint8),
                 b"labels": [int(label) for label in rng.integers(0, 10, EXAMPLES_PER_FILE)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return tmp_path


def run_check(*extra_args: str, env_data_dir: Path | None = None, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m robustune.cli study cifar10.yaml --check ...` in a fresh process, as a user runs it."""
    env = {key: value for key, value in os.environ.items() if key != ENV_DATA_DIR}
    if env_data_dir is not None:
        env[ENV_DATA_DIR] = str(env_data_dir)
    return subprocess.run([sys.executable, "-m", "robustune.cli", "study", str(CIFAR10_STUDY), "--check", *extra_args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_fake_folder_is_what_the_cifar_loader_reads(cifar_root):
    splits = load_dataset("cifar10", data_dir=str(cifar_root), val_size=10)
    assert len(splits.train) == 5 * EXAMPLES_PER_FILE - 10 and len(splits.test) == EXAMPLES_PER_FILE
    assert tuple(splits.train.images.shape[1:]) == (3, 32, 32)


@pytest.mark.parametrize("pointed_by", ["set data.data_dir", ENV_DATA_DIR])
def test_check_accepts_the_cifar10_study(cifar_root, tmp_path, pointed_by):
    if pointed_by == ENV_DATA_DIR:
        result = run_check(env_data_dir=cifar_root, cwd=tmp_path)
    else:
        result = run_check("--set", f"data.data_dir={cifar_root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = result.stdout
    assert "study cifar10" in summary and "valid; 13 defenses" in summary
    for label in SEED_PAPER_DEFENSES + BASELINES + ("pgd (tuned)", "trades (tuned)"):
        assert label in summary
    assert "seeds [0, 1, 2]" in summary
    # A check trains nothing and tracks nothing: no MLflow store or run folder appears.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]


def test_check_refuses_a_missing_data_folder_naming_it(tmp_path):
    missing = tmp_path / "no-cifar-here"
    result = run_check("--set", f"data.data_dir={missing}", cwd=tmp_path)
    assert result.returncode == 2
    assert "dataset 'cifar10' not found" in result.stderr
    assert str(missing) in result.stderr and "cifar-10-batches-py" in result.stderr
    assert "valid" not in result.stdout


def test_cifar10_study_is_the_papers_setting_on_gpus(cifar_root, monkeypatch):
    monkeypatch.setenv(ENV_DATA_DIR, str(cifar_root))
    study = load_study(CIFAR10_STUDY)
    entries = {e.label: e for e in study.entries}
    assert study.base["data"]["name"] == "cifar10" and study.base["model"]["name"] == "preact_resnet18"
    assert study.base["epsilon"] == "8/255" and study.base["resources"]["use_gpu"] is True
    assert study.evaluation["protocol"] == "full" and len(study.seeds) >= 3
    assert {e.defense for e in study.entries} >= set(SEED_PAPER_DEFENSES + BASELINES)
    # The flagship comparison: LAS-AT as published vs baselines tuned on its training compute.
    assert study.featured == "las_at" and not entries["las_at"].tune
    for label in ("pgd (tuned)", "trades (tuned)"):
        assert entries[label].tune and entries[label].budget == "las_at"
    assert entries["eae"].init_from == "standard"
