"""Ray Train + MLflow overhead per epoch versus a bare loop, and the fixed start-up cost, in one run.

Both sides run the same `TrainingLoop` (same defense, data, model, threads): the bare side calls
`run_epoch()` in this process; the Ray side is a real `run_training` (Ray Train worker group, checkpoint
every epoch, MLflow logging from rank 0). An epoch under Ray is the wall time between consecutive epoch
records in MLflow (train + validation + checkpoint + report + logging); the bare epoch is `run_epoch()`.
Start-up is the time from calling `run_training` until the first epoch starts (Ray, worker group, data,
MLflow run). Prints a table of ratios; nothing here is asserted.

    python benchmarks/overhead.py [--method fgsm_rs] [--epochs 3] [--train-subset 20000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fgsm_rs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from robustune.config import load_config
    from robustune.training import TrainingLoop, run_training, worker_threads

    workdir = Path(tempfile.mkdtemp(prefix="robustune-bench-"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [f"data.train_subset={args.train_subset}", f"train.epochs={args.epochs}",
                 "eval.protocol=custom", "eval.autoattack=none", "data.test_subset=1000", f"tracking.tracking_uri={uri}",
                 f"tracking.output_dir={workdir / 'runs'}", *args.overrides]
    config = load_config(args.method, overrides=overrides)
    threads = worker_threads(config)

    # Bare loop, same threads as the Ray worker gets.
    torch.set_num_threads(threads)
    loop = TrainingLoop(load_config(args.method, overrides=overrides), log=lambda _: None)
    bare = []
    while not loop.finished:
        started = time.perf_counter()
        loop.run_epoch()
        bare.append(time.perf_counter() - started)

    # Ray Train + MLflow.
    called = time.time()
    outcome = run_training(config, log=lambda _: None)
    ended = time.time()
    history = MlflowClient(uri).get_metric_history(outcome.run_id, "val/pgd_acc")
    stamps = [called] + [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
    epoch_walls = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # epochs 2..N: no start-up inside
    first_epoch = MlflowClient(uri).get_metric_history(outcome.run_id, "time/total_s")
    first_epoch_s = sorted(first_epoch, key=lambda m: m.step)[0].value
    startup = stamps[1] - called - first_epoch_s

    bare_epoch = statistics.median(bare[1:] or bare)
    ray_epoch = statistics.median(epoch_walls) if epoch_walls else float("nan")
    print(f"\n{args.method} on Fashion-MNIST ({args.train_subset} training images), {args.epochs} epochs, "
          f"{threads} thread(s); {torch.__version__}")
    print("| measure | seconds | ratio |")
    print("|---|---|---|")
    print(f"| bare loop, median epoch (train + validation) | {bare_epoch:.2f} | 1.000 |")
    print(f"| Ray Train + MLflow, median epoch (epochs 2..N, incl. checkpoint + logging) | {ray_epoch:.2f} "
          f"| {ray_epoch / bare_epoch:.3f} |")
    print(f"| per-epoch overhead | {ray_epoch - bare_epoch:.2f} | {ray_epoch / bare_epoch - 1:+.1%} |")
    print(f"| fixed start-up (Ray, worker group, data, MLflow run) | {startup:.2f} | |")
    print(f"| final evaluation + shutdown (clean + PGD-20 on 1000 test points) | {ended - stamps[-1]:.2f} | |")
    print(f"bare epochs: {[round(b, 2) for b in bare]}; Ray epochs: {[round(e, 2) for e in epoch_walls]}")


if __name__ == "__main__":
    main()
