"""Data-parallel scaling of one training from 1 to 2 Ray Train workers, measured in one run.

Three real `run_training` runs of the same defense and data (global batch 128, split over the workers;
gradients averaged by one flat all-reduce per step): 1 worker with 1 thread (the baseline), 2 workers with
1 thread each, and 1 worker with 2 threads (the same cores as the 2-worker run, to tell data parallelism
from simply using more cores). The epoch time is the workers' own `time/epoch_s` (training only, rank 0,
all-reduce waits included) and `time/val_s` (the per-epoch validation), median over epochs 2..N. Speed-up =
baseline time / time; efficiency = speed-up / cores. Nothing is asserted.

    python benchmarks/scaling.py [--method fgsm_rs] [--epochs 3] [--train-subset 20000] [--gpu]
        [--model small_cnn] [--dataset fashion-mnist] [--set KEY=VALUE] [--markdown FILE]

On a GPU machine `--gpu` compares 1 and 2 GPU workers instead (one GPU each; needs 2 GPUs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def run(overrides: list[str], workers: int, threads: int, gpu: bool, workdir: Path, label: str) -> dict:
    from mlflow.tracking import MlflowClient

    from robustune.resolve import load_config
    from robustune.training import run_training

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    config = load_config(None, overrides=[*overrides, f"resources.num_workers={workers}",
                                          f"resources.cpus_per_worker={threads}", f"resources.use_gpu={gpu}",
                                          f"tracking.tracking_uri={uri}", f"tracking.output_dir={workdir / 'runs'}",
                                          f"tracking.run_name={label}", "eval.enabled=false"])
    print(f"{label} ...", flush=True)
    outcome = run_training(config, log=lambda _: None)
    client = MlflowClient(uri)

    def median_after_first(key: str) -> float:
        values = [m.value for m in sorted(client.get_metric_history(outcome.run_id, key), key=lambda m: m.step)]
        return statistics.median(values[1:] or values)

    return {"label": label, "workers": workers, "cores": workers * threads if not gpu else workers,
            "train_s": median_after_first("time/epoch_s"), "val_s": median_after_first("time/val_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fgsm_rs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--gpu", action="store_true", help="1 vs 2 GPU workers (needs 2 GPUs)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="robustune-scaling-"))
    overrides = [f"method.name={args.method}", f"data.name={args.dataset}", f"model.name={args.model}",
                 f"data.train_subset={args.train_subset}", f"train.epochs={args.epochs}", *args.overrides]
    if args.gpu:
        rows = [run(overrides, 1, 1, True, workdir, "1 GPU worker"),
                run(overrides, 2, 1, True, workdir, "2 GPU workers")]
    else:
        rows = [run(overrides, 1, 1, False, workdir, "1 worker x 1 thread"),
                run(overrides, 2, 1, False, workdir, "2 workers x 1 thread"),
                run(overrides, 1, 2, False, workdir, "1 worker x 2 threads")]
    base = rows[0]
    lines = [f"{args.method} on {args.dataset} ({args.train_subset} training images), {args.model}, "
             f"global batch 128, {args.epochs} epochs, median of epochs 2..{args.epochs}", "",
             "| run | cores | train epoch s | speed-up | efficiency | validation s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup, val_speedup = base["train_s"] / row["train_s"], base["val_s"] / row["val_s"]
        lines.append(f"| {row['label']} | {row['cores']} | {row['train_s']:.2f} | {speedup:.2f} "
                     f"| {speedup / row['cores']:.0%} | {row['val_s']:.2f} | {val_speedup:.2f} |")
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
