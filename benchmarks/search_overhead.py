"""Search overhead: the share of trial slots (wall time x concurrent trials) spent outside training epochs.

Runs the same small FGSM-RS search on Fashion-MNIST with trials of increasing length and prints, for each,
the wall time, the time inside training epochs (train + validation, summed over trials) and the overhead
share (Ray, Tune and worker start-up, MLflow, checkpoints, slots left idle). Nothing is asserted.

    python benchmarks/search_overhead.py [--samples 4] [--epochs 1 3 6] [--train-subset 20000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defense", default="fgsm_rs")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--train-subset", type=int, default=20000)
    args = parser.parse_args()

    from robustune.config import raw_config
    from robustune.search import SearchSettings, start_search

    workdir = Path(tempfile.mkdtemp(prefix="robustune-search-bench-"))
    rows = []
    for epochs in args.epochs:
        settings = SearchSettings(defense=args.defense, samples=args.samples, epochs=epochs,
                                  max_concurrent=args.max_concurrent, scheduler="none")
        base = raw_config(None, None, [f"data.train_subset={args.train_subset}",
                                       f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                                       f"tracking.output_dir={workdir / f'runs-{epochs}'}"])
        summary = start_search(settings, base, log=lambda _: None)
        rows.append((epochs, summary))
    print(f"\n{args.defense} search, {args.samples} trials, {args.max_concurrent} at a time, "
          f"Fashion-MNIST ({args.train_subset} training images), no early stopping")
    print("| epochs per trial | wall s | trial slots s | inside epochs s | overhead share |")
    print("|---|---|---|---|---|")
    for epochs, s in rows:
        slots = s["wall_s"] * args.max_concurrent
        inside = slots * (1 - s["overhead_share"])
        print(f"| {epochs} | {s['wall_s']:.1f} | {slots:.1f} | {inside:.1f} | {s['overhead_share']:.1%} |")


if __name__ == "__main__":
    main()
