"""Ray Train + MLflow overhead per epoch versus a bare loop, and the fixed start-up cost, in one run.

Both sides run the same `TrainingLoop` (same defense, data, model, threads). The bare side calls
`run_epoch()` in this process, before and after the Ray run (the median of both brackets drift). The Ray side
is a real `run_training`: Ray Train worker group, checkpoint every epoch, MLflow logging from rank 0.

On a shared 2-core machine one epoch's compute varies by 10-20% from run to run, which hides an overhead of a
few percent. So the overhead is measured per epoch inside the Ray run itself: the wall time between
consecutive epoch records in MLflow minus the compute the worker measured for that epoch (its time/epoch_s +
time/val_s), i.e. the time spent in checkpointing, reporting, logging and Ray; it is given as a share of the
bare loop's epoch. The ratio of the Ray worker's compute to the bare loop's is printed as well (noise, or a
slowdown inside the worker). Start-up is the time from calling `run_training` until the first epoch starts.
Nothing here is asserted.

    python benchmarks/overhead.py [--method fgsm_rs] [--epochs 4] [--train-subset 20000] [--gpu]
        [--set KEY=VALUE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bare_epochs(method: str, overrides: list[str], device: torch.device) -> list[float]:
    from robustune.resolve import load_config
    from robustune.loop import TrainingLoop

    loop = TrainingLoop(load_config(method, overrides=overrides), device=device, log=lambda _: None)
    seconds = []
    while not loop.finished:
        started = time.perf_counter()
        loop.run_epoch()
        seconds.append(time.perf_counter() - started)
    return seconds[1:] or seconds  # the first epoch carries one-off warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fgsm_rs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--gpu", action="store_true", help="one GPU worker (and the bare loop on the GPU)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from robustune.resolve import load_config
    from robustune.cluster import worker_threads
    from robustune.training import run_training

    workdir = Path(tempfile.mkdtemp(prefix="robustune-bench-"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [f"data.train_subset={args.train_subset}", f"train.epochs={args.epochs}",
                 "eval.protocol=custom", "eval.autoattack=none", "eval.checks=false", "data.test_subset=1000",
                 f"resources.use_gpu={args.gpu}", f"tracking.tracking_uri={uri}",
                 f"tracking.output_dir={workdir / 'runs'}", *args.overrides]
    config = load_config(args.method, overrides=overrides)
    threads = worker_threads(config)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(threads)  # the bare loop gets the threads a Ray worker gets

    bare = bare_epochs(args.method, overrides, device)
    called = time.time()
    outcome = run_training(config, log=lambda _: None)
    ended = time.time()
    bare += bare_epochs(args.method, overrides, device)

    client = MlflowClient(uri)

    def history(key: str) -> list[float]:
        return [m for m in sorted(client.get_metric_history(outcome.run_id, key), key=lambda m: m.step)]

    stamps = [called] + [m.timestamp / 1000 for m in history("val/pgd_acc")]
    compute = [a.value + b.value for a, b in zip(history("time/epoch_s"), history("time/val_s"))]
    walls = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # epochs 2..N: no start-up inside
    framework = [wall - work for wall, work in zip(walls, compute[1:])]
    startup = stamps[1] - called - compute[0]

    bare_epoch = statistics.median(bare)
    ray_compute = statistics.median(compute[1:])
    overhead = statistics.median(framework)
    where = "1 GPU" if args.gpu else f"{threads} thread(s)"
    lines = [f"{args.method} on {config.data.name} ({args.train_subset} training images), {config.model_name}, "
             f"{args.epochs} epochs, {where}; torch {torch.__version__}", "",
             "| measure | seconds | share of the bare epoch |",
             "|---|---|---|",
             f"| bare loop, median epoch (train + validation; runs before and after) | {bare_epoch:.2f} | 100% |",
             f"| Ray worker's own compute, median epoch (train + validation) | {ray_compute:.2f} "
             f"| {ray_compute / bare_epoch:.0%} |",
             f"| **per-epoch overhead**: wall between epoch records minus the worker's compute (checkpoint, "
             f"report, MLflow logging, Ray), median | {overhead:.3f} | **{overhead / bare_epoch:.1%}** |",
             f"| fixed start-up (Ray, worker group, data, MLflow run) | {startup:.2f} | |",
             f"| final evaluation + shutdown (clean + PGD-20 on 1000 test points) | {ended - stamps[-1]:.2f} | |",
             "", f"bare epochs: {[round(b, 2) for b in bare]}; Ray epoch walls: {[round(w, 2) for w in walls]}; "
             f"Ray compute: {[round(c, 2) for c in compute]}"]
    print("\n" + "\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
