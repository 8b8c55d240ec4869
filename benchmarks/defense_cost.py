"""Each defense's measured training-epoch time divided by standard training's, next to its declared floor.

The declared floor is the defense's forward/backward passes of the target model per batch, as a multiple of
standard training's 1F1B (a backward counted as two forwards). Every defense trains the same epoch (same
data subset, model, batch size, threads) through the real `TrainingLoop`; one warm-up epoch, then the
median of `--repeats` epochs. Nothing is asserted; the table says which defenses sit within 15% of their
floor.

    python benchmarks/defense_cost.py [--train-subset 5120] [--repeats 3] [--threads 2] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def epoch_seconds(method: str, overrides: list[str], repeats: int) -> float:
    from robustune.config import load_config
    from robustune.training import TrainingLoop

    loop = TrainingLoop(load_config(method, overrides=overrides), log=lambda _: None)
    loop.train_one_epoch()  # warm-up
    times = []
    for _ in range(repeats):
        times.append(loop.train_one_epoch()["time/epoch_s"])
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", help="default: every registered defense")
    parser.add_argument("--train-subset", type=int, default=5120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()

    from robustune.defense import create_defense, list_defenses

    torch.set_num_threads(args.threads)
    overrides = [f"data.train_subset={args.train_subset}", "train.epochs=100", *args.overrides]
    methods = args.methods or list_defenses()
    standard = epoch_seconds("standard", overrides, args.repeats)
    print(f"\nepoch of {args.train_subset} Fashion-MNIST images, small CNN, batch 128, {args.threads} thread(s); "
          f"standard: {standard:.2f}s")
    print("| defense | declared cost | floor (x standard) | measured (x standard) | measured / floor |")
    print("|---|---|---|---|---|")
    for method in methods:
        cost = create_defense(method).cost()
        seconds = standard if method == "standard" else epoch_seconds(method, overrides, args.repeats)
        measured = seconds / standard
        floor = cost.relative_to_standard
        print(f"| {method} | {cost} | {floor:.2f} | {measured:.2f} | {measured / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
