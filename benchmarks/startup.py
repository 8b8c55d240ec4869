"""Fixed cost per run and per trial: from a trial's start to its first training epoch, and the share of a
search's trial slots spent outside training epochs, measured in one run.

1. In-process path (a one-worker trial runs in its reused Tune trial actor): a small search (`--trials`
   trials of `--defense`, `--concurrent` at a time, `--epochs` epochs, no early stopping, 1 CPU per trial).
   A Tune callback in the driver takes time.time() when Tune starts (or reuses an actor for) each trial, and
   reads `timing/first_epoch_at` (when the trial's process started its first epoch) from the trial's first
   result. Trials are grouped by the process they ran in (the `pid` of their results): the first trial of a
   process pays its imports, the dataset and the MLflow client; the later ones reuse them (target: at most
   1 s). For the first trials, the time from Tune creating the trial (the actor process start included) is
   given as well.
2. TorchTrainer path: the same clock on a search whose trials have resources.num_workers=2 (1 CPU each, one
   trial at a time, `--trainer-trials` trials): every trial starts a Ray Train worker group.
3. `robustune search DEFENSE --samples N --epochs E --set data.train_subset=S` as a real CLI subprocess (ASHA,
   as many trials at once as the CPUs fit): `overhead_share` from the search folder's summary.json, the share
   of trial slots (wall x concurrent trials) outside training epochs (target: at most 10%).
4. One tiny `robustune train` (real CLI subprocess, no test evaluation): its wall time against the time inside
   its epochs (`train_seconds` in the run folder's report.json); the difference is a single run's fixed cost
   (interpreter and imports, Ray start, MLflow run, data, shutdown).

Everything runs in a temporary folder (the working directory, the MLflow sqlite store, every output folder)
that is removed afterwards. The data comes from ROBUSTUNE_DATA_DIR or the standard places, or --set
data.data_dir=DIR. `--set` applies to every run. Nothing is asserted.

    python benchmarks/startup.py [--defense fgsm_rs] [--trials 8] [--concurrent 2] [--epochs 2]
        [--train-subset 2000] [--trainer-trials 3] [--search-samples 8] [--search-epochs 2]
        [--search-subset 10000] [--run-subset 2000] [--set KEY=VALUE] [--quick] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REUSED_TARGET_S = 1.0
OVERHEAD_TARGET = 0.10

# name -> (default, --quick default)
SIZES = {
    "trials": (8, 3), "concurrent": (2, 2), "epochs": (2, 1), "train_subset": (2000, 500),
    "trainer_trials": (3, 2), "search_samples": (8, 2), "search_epochs": (2, 1), "search_subset": (10000, 1000),
    "run_subset": (2000, 500),
}
QUICK_OVERRIDES = ["data.val_size=500", "validation.examples=100"]  # --quick: short validation too


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defense", default="fgsm_rs")
    sizes = parser.add_argument_group("sizes (defaults: the full run / --quick)")
    for name, (full, quick) in SIZES.items():
        help_text = {
            "trials": "trials of the in-process search",
            "concurrent": "trials at once in the in-process search",
            "epochs": "epochs per trial (both in-driver searches)",
            "train_subset": "training images per trial (both in-driver searches)",
            "trainer_trials": "trials of the TorchTrainer (2-worker) search",
            "search_samples": "--samples of the CLI search",
            "search_epochs": "--epochs of the CLI search",
            "search_subset": "data.train_subset of the CLI search",
            "run_subset": "data.train_subset of the one-epoch `robustune train`",
        }[name]
        sizes.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N",
                           help=f"{help_text} (default {full}; --quick {quick})")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set data.data_dir=DIR")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere: a smoke test (minutes)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.trials <= args.concurrent:
        parser.error(f"--trials ({args.trials}) must exceed --concurrent ({args.concurrent}): the trials after "
                     "each slot's first one are what the in-process row measures")
    return parser, args


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Refuse a bad defense, override or missing dataset (exit 2) before anything runs. Returns the data
    folder as an absolute override when one was given (the runs' working directory is elsewhere)."""
    from robustune.config import ConfigError
    from robustune.resolve import load_config
    from robustune.data import ENV_DATA_DIR, DataError, check_available
    from robustune.defense import list_defenses

    if args.defense not in list_defenses():
        parser.error(f"unknown defense {args.defense}; choose from {', '.join(list_defenses())}")
    try:
        config = load_config(args.defense, overrides=args.overrides)
        check_available(config.data.name, config.data.data_dir, config.data.download)
    except (ConfigError, DataError) as error:
        parser.error(str(error))
    if os.environ.get(ENV_DATA_DIR):
        os.environ[ENV_DATA_DIR] = str(Path(os.environ[ENV_DATA_DIR]).expanduser().resolve())
    return [f"data.data_dir={Path(config.data.data_dir).expanduser().resolve()}"] if config.data.data_dir else []


# ------------------------------------------------------------------------------------- the clock
def startup_clock():
    """A Ray Tune callback taking driver-side timestamps per trial (an instance lives in the driver)."""
    from ray.tune import Callback

    from robustune.worker import FIRST_EPOCH_AT

    class StartupClock(Callback):
        def __init__(self):
            self.added: dict[str, float] = {}  # Tune created the trial (first seen at the end of a Tune step)
            self.started: dict[str, float] = {}  # Tune started it: a new actor ready, or a cached one reset
            self.first_epoch: dict[str, float] = {}  # its process started its first epoch
            self.pid: dict[str, int] = {}  # the process that reported its results

        def on_step_end(self, iteration, trials, **info):
            # Ray Tune has no callback for a trial's creation: a step creates it, before its actor is requested.
            now = time.time()
            for trial in trials:
                self.added.setdefault(trial.trial_id, now)

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id not in self.first_epoch:  # a restart before any result: the last start counts
                self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id in self.first_epoch or result.get(FIRST_EPOCH_AT) is None:
                return
            self.first_epoch[trial.trial_id] = float(result[FIRST_EPOCH_AT])
            self.pid[trial.trial_id] = int(result.get("pid") or 0)

        def trials(self) -> list[dict]:
            """Measured trials in start order: start -> first epoch, creation -> first epoch, process."""
            order = sorted((t for t in self.first_epoch if t in self.started), key=self.started.get)
            created = {t: min(self.added.get(t, self.started[t]), self.started[t]) for t in order}
            return [{"trial_id": t, "pid": self.pid[t], "start_s": self.first_epoch[t] - self.started[t],
                     "created_s": self.first_epoch[t] - created[t]} for t in order]

    return StartupClock()


def timed_search(args: argparse.Namespace, workdir: Path, name: str, samples: int, concurrent: int,
                 workers: int, overrides: list[str]) -> tuple[list[dict], int]:
    """One in-driver search with the clock; (its measured trials, how many trials it ran)."""
    from robustune.config import raw_config
    from robustune.search import SearchSettings, start_search

    settings = SearchSettings(defense=args.defense, samples=samples, epochs=args.epochs, max_concurrent=concurrent,
                              scheduler="none")
    base = raw_config(None, None, [f"data.train_subset={args.train_subset}", f"resources.num_workers={workers}",
                                   "resources.cpus_per_worker=1", *overrides,
                                   f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                                   f"tracking.output_dir={workdir / 'searches'}", f"tracking.run_name={name}"])
    clock = startup_clock()
    print(f"{name}: {samples} trials of {args.defense}, {concurrent} at a time, {workers} worker(s) each ...",
          flush=True)
    summary = start_search(settings, base, log=lambda _: None, callbacks=[clock])
    return clock.trials(), summary["trials"]


# ----------------------------------------------------------------------------------- CLI subprocesses
def cli(workdir: Path, *argv: str) -> float:
    """Run `robustune ARGV` in `workdir`; its wall seconds. A failure ends the benchmark with its output."""
    command = [sys.executable, "-m", "robustune.cli", *argv]
    print("$ robustune " + " ".join(argv), flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=workdir, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - started
    if result.returncode != 0:
        sys.stdout.write("\n".join(result.stdout.splitlines()[-40:]) + "\n")
        raise SystemExit(f"`robustune {' '.join(argv)}` failed with exit status {result.returncode}")
    return wall


def tracking_sets(workdir: Path, output: str, name: str) -> list[str]:
    return ["--set", f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            "--set", f"tracking.output_dir={workdir / output}", "--set", f"tracking.run_name={name}"]


# ------------------------------------------------------------------------------------------ the table
def spread(values: list[float]) -> str:
    if not values:
        return "no trial measured"
    return (f"{statistics.median(values):.2f} s median, {max(values):.2f} s max "
            f"({len(values)} trial{'s' if len(values) != 1 else ''})")


def met(value: float | None, target: float) -> str:
    return "no (nothing measured)" if value is None else "yes" if value <= target else "no"


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    data_dir = check_inputs(parser, args)
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides, *data_dir]
    user_sets = [part for text in overrides for part in ("--set", text)]

    started = time.time()
    here = os.getcwd()
    workdir = Path(tempfile.mkdtemp(prefix="robustune-startup-"))
    os.chdir(workdir)
    try:
        from robustune.cluster import ensure_ray

        ensure_ray()
        local, local_ran = timed_search(args, workdir, "in-process", args.trials, args.concurrent, 1, overrides)
        trainer, trainer_ran = timed_search(args, workdir, "torch-trainer", args.trainer_trials, 1, 2, overrides)
        import ray

        ray.shutdown()  # the CLI runs start their own Ray, as a user's would

        search_wall = cli(workdir, "search", args.defense, "--samples", str(args.search_samples),
                          "--epochs", str(args.search_epochs), "--set", f"data.train_subset={args.search_subset}",
                          *user_sets, *tracking_sets(workdir, "cli-search", "startup-search"))
        summary = json.loads((workdir / "cli-search" / "startup-search" / "summary.json").read_text())
        train_wall = cli(workdir, "train", args.defense, "--set", "train.epochs=1",
                         "--set", f"data.train_subset={args.run_subset}", "--set", "eval.enabled=false",
                         *user_sets, *tracking_sets(workdir, "cli-train", "startup-train"))
        report = json.loads((workdir / "cli-train" / "startup-train" / "report.json").read_text())
    finally:
        os.chdir(here)
        shutil.rmtree(workdir, ignore_errors=True)

    # The first trial of each process (slot) pays the process's start-up; the others reuse the process.
    seen: set[int] = set()
    first, reused = [], []
    for trial in local:
        (reused if trial["pid"] in seen else first).append(trial)
        seen.add(trial["pid"])
    reused_s = [t["start_s"] for t in reused]
    reused_median = statistics.median(reused_s) if reused_s else None
    share = float(summary["overhead_share"])
    inside = float(report["train_seconds"])

    from robustune.resolve import load_config

    setup = load_config(args.defense, overrides=overrides)
    lines = [
        f"{args.defense} on {setup.data.name}, {setup.model_name}, 1 CPU per worker; in-driver searches: "
        f"{args.train_subset} training images, {args.epochs} epoch(s) per trial, no early stopping; "
        f"{os.cpu_count()} CPU cores" + (" (--quick sizes)" if args.quick else ""), "",
        "| what | measured | target | met |",
        "|---|---|---|---|",
        f"| in-process path, trials after each slot's first one: trial start (reused actor) -> first epoch "
        f"({local_ran} trials, {args.concurrent} at a time, {len(seen)} processes) | {spread(reused_s)} "
        f"| <= {REUSED_TARGET_S:g} s (median) | {met(reused_median, REUSED_TARGET_S)} |",
        f"| in-process path, first trial of each slot: trial start (new actor) -> first epoch "
        f"| {spread([t['start_s'] for t in first])} | | |",
        f"| in-process path, first trial of each slot: trial created by Tune -> first epoch (the actor "
        f"process start included) | {spread([t['created_s'] for t in first])} | | |",
        f"| TorchTrainer path (2 workers), trials after the first: trial start -> first epoch "
        f"({trainer_ran} trials, one at a time) | {spread([t['start_s'] for t in trainer[1:]])} | | |",
        f"| TorchTrainer path (2 workers), first trial: trial start -> first epoch "
        f"| {spread([t['start_s'] for t in trainer[:1]])} | | |",
        f"| `robustune search {args.defense} --samples {args.search_samples} --epochs {args.search_epochs}` on "
        f"{args.search_subset} images ({summary['trials']} trials {summary['statuses']}, "
        f"{summary['wall_s']:.0f} s wall): share of trial slots outside training epochs | {share:.1%} "
        f"| <= {OVERHEAD_TARGET:.0%} | {'yes' if share <= OVERHEAD_TARGET else 'no'} |",
        f"| `robustune train {args.defense}`, 1 epoch of {args.run_subset} images, no test evaluation: wall time "
        f"of the command | {train_wall:.2f} s | | |",
        f"| the same run: inside its epoch (train_seconds in report.json) | {inside:.2f} s | | |",
        f"| the same run: fixed cost of a single run (wall - inside epochs) | {train_wall - inside:.2f} s | | |",
        "",
        "in-process trials (start -> first epoch, s; process): "
        + ", ".join(f"{t['start_s']:.2f} (pid {t['pid']})" for t in local)
        + "; TorchTrainer trials: " + ", ".join(f"{t['start_s']:.2f}" for t in trainer)
        + f"; CLI search wall {search_wall:.0f} s; benchmark wall {time.time() - started:.0f} s",
    ]
    print("\n" + "\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
