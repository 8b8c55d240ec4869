"""The benchmark scripts run and print their tables (their numbers are measured, never asserted here).

The GPU variant's configuration (PreActResNet-18 on CIFAR-shaped synthetic data) runs on the CPU at a tiny
size, so it cannot rot between the sessions that have a GPU. The Ray-based scripts are smoke-tested under the
`slow` marker (a minute or two each)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


def test_synthetic_cifar_is_cifar_shaped_and_deterministic():
    from robustune.data import dataset_info, load_dataset

    info = dataset_info("synthetic-cifar")
    assert (info.num_classes, info.input_shape, info.default_epsilon) == (10, (3, 32, 32), 8 / 255)
    first = load_dataset("synthetic-cifar", seed=0, val_size=1000, train_subset=500, test_subset=200)
    again = load_dataset("synthetic-cifar", seed=0, val_size=1000, train_subset=500, test_subset=200)
    assert first.train.images.shape == (500, 3, 32, 32) and first.test.images.shape == (200, 3, 32, 32)
    assert len(first.val.labels) == 1000 and first.train.images.dtype == torch.uint8
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, again.test.labels)
    # Learnable: class means differ (a template per class), so timing runs train a real signal.
    x, y = first.train.images.float(), first.train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    assert (means[0] - means[1]).abs().mean() > 5


def test_defense_cost_runs_the_gpu_configuration_on_the_cpu(tmp_path):
    out = tmp_path / "cost.md"
    result = bench("defense_cost.py", "--methods", "fgsm_rs", "--train-subset", "64", "--repeats", "1",
                   "--set", "data.name=synthetic-cifar", "--set", "model.name=preact_resnet18",
                   "--set", "data.val_size=100", "--markdown", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "64 synthetic-cifar images, preact_resnet18" in text
    [row] = table_rows(text)
    assert row[0] == "fgsm_rs" and row[1] == "2F2B" and row[2] == "2.00"
    measured, ratio = float(row[5]), float(row[6])
    assert measured > 0 and abs(ratio - measured / 2.0) < 0.01 and row[7] in ("yes", "no")


def test_benchmarks_refuse_bad_input_before_work(tmp_path):
    result = bench("defense_cost.py", "--methods", "fgsm_rss", cwd=tmp_path)
    assert result.returncode == 2 and "unknown defense(s) fgsm_rss" in result.stderr
    result = bench("run_all.py", "--only", "overheads", cwd=tmp_path)
    assert result.returncode == 2 and "unknown benchmark(s) overheads" in result.stderr
    if not torch.cuda.is_available():
        result = bench("run_all.py", "--gpu", cwd=tmp_path)
        assert result.returncode == 2 and "no CUDA device" in result.stderr
        result = bench("defense_cost.py", "--device", "cuda", cwd=tmp_path)
        assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_startup_refuses_bad_input_before_work(tmp_path):
    result = bench("startup.py", "--trials", "0", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "--trials must be >= 1, got 0" in result.stderr
    result = bench("startup.py", "--trials", "2", "--concurrent", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "must exceed --concurrent" in result.stderr
    result = bench("startup.py", "--defense", "fgsm_rss", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "unknown defense fgsm_rss" in result.stderr
    result = bench("startup.py", "--set", "data.data_dir=" + str(tmp_path / "nowhere"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "nowhere" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran: no MLflow store, no run folder


@pytest.mark.slow
def test_startup_prints_every_row_with_a_number(tmp_path):
    out = tmp_path / "startup.md"
    result = bench("startup.py", "--quick", "--markdown", str(out), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(out.read_text())
    expected = [("in-process path, trials after each slot's first one", "<= 1 s (median)"),
                ("in-process path, first trial of each slot: trial start", ""),
                ("in-process path, first trial of each slot: trial created by Tune", ""),
                ("TorchTrainer path (2 workers), trials after the first", ""),
                ("TorchTrainer path (2 workers), first trial", ""),
                ("`robustune search fgsm_rs --samples 2 --epochs 1` on 1000 images", "<= 10%"),
                ("`robustune train fgsm_rs`, 1 epoch of 500 images", ""),
                ("the same run: inside its epoch", ""),
                ("the same run: fixed cost of a single run", "")]
    assert len(rows) == len(expected), rows
    for row, (what, target) in zip(rows, expected):
        assert len(row) == 4 and row[0].startswith(what) and row[2] == target, row
        assert re.match(r"^-?[0-9]+\.[0-9]+( s|%)", row[1]), row  # a number in every row
        assert row[3] in (("yes", "no") if target else ("",)), row
    # Everything ran in a temporary folder that is gone now; nothing landed in the working directory.
    workdir = re.search(r"sqlite:///(\S+)/mlflow\.db", result.stdout).group(1)
    assert not Path(workdir).exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["startup.md"]


@pytest.mark.slow
def test_overhead_and_scaling_scripts_print_their_tables(tmp_path):
    small = ["--set", "data.name=synthetic", "--set", "data.val_size=200", "--set", "validation.examples=100"]
    result = bench("overhead.py", "--epochs", "2", "--train-subset", "1000", *small,
                   "--markdown", str(tmp_path / "overhead.md"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    overhead = (tmp_path / "overhead.md").read_text()
    assert re.search(r"\*\*per-epoch overhead\*\*.*\| [0-9.]+ \| \*\*-?[0-9.]+%\*\* \|", overhead)

    result = bench("scaling.py", "--epochs", "2", "--train-subset", "1000", "--dataset", "synthetic",
                   "--set", "data.val_size=200", "--set", "validation.examples=100",
                   "--markdown", str(tmp_path / "scaling.md"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = table_rows((tmp_path / "scaling.md").read_text())
    assert [row[0] for row in rows] == ["1 worker x 1 thread", "2 workers x 1 thread", "1 worker x 2 threads"]
    assert rows[0][3] == "1.00" and all(float(row[2]) > 0 for row in rows)


@pytest.mark.slow
def test_search_efficiency_re_measures_every_winner_with_fresh_seeds(tmp_path):
    """The search-efficiency table gives each search's winner trained again with fresh seeds, and its gap to the
    grid winner's re-measured value (each distinct winner trained once: equal knobs, equal values)."""
    result = bench("search_efficiency.py", "--defenses", "fgsm_rs", "--grid-points", "2", "--seeds", "0",
                   "--epochs", "2", "--train-subset", "1000", "--set", "data.name=synthetic",
                   "--set", "data.val_size=200", "--set", "validation.examples=100", "--remeasure-seeds", "1", "2",
                   "--markdown", str(tmp_path / "search.md"), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    text = (tmp_path / "search.md").read_text()
    assert "| re-measured (seeds 1, 2) | gap re-measured |" in text
    rows = table_rows(text)
    grid, tpe, random_search = rows[0], rows[1], rows[2]
    assert [grid[0], tpe[0], random_search[0]] == ["grid", "TPE + ASHA", "random"]
    for row in (grid, tpe, random_search):
        assert 0 <= float(row[8]) <= 1, row
        assert float(row[9]) == pytest.approx(100 * (float(row[8]) - float(grid[8])), abs=0.051), row
    assert float(grid[9]) == 0.0
    points = dict(part.split(": ", 1) for part in text.split("best points: ", 1)[1].splitlines()[0].split("; "))
    if points["grid seed 0"] == points["TPE + ASHA seed 0"]:  # the same config is measured once, so alike
        assert tpe[8] == grid[8]
