"""Each defense's measured training-epoch time divided by standard training's, next to its declared floor.

The declared floor is the defense's forward/backward passes of the target model per batch, as a multiple of
standard training's 1F1B (a backward counted as two forwards). Every defense trains the same epoch (same
data subset, model, batch size, threads) through the real `TrainingLoop`. Standard and the defense run
alternately (one warm-up epoch each, then `--repeats` pairs) and the ratio is median(defense) /
median(standard) over those pairs, so a machine that drifts slower or faster during the run moves both
sides. Nothing is asserted; the table says which defenses sit within 15% of their floor. The floor counts
the target model's passes only: auxiliary networks (a generator, a strategy net, a re-constructor) are
named in the last column, and weigh far more next to the small CNN than next to a ResNet (compare with
`--set data.name=synthetic-cifar --set model.name=preact_resnet18`).

    python benchmarks/defense_cost.py [--methods ...] [--train-subset 5120] [--repeats 3] [--threads 1]
        [--device cpu|cuda] [--set KEY=VALUE] [--markdown FILE]

    e.g. PreActResNet-18 on CIFAR-shaped data on a GPU:
    python benchmarks/defense_cost.py --device cuda --set data.name=synthetic-cifar --set model.name=preact_resnet18
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch


def paired_epoch_seconds(method: str, overrides: list[str], repeats: int,
                         device: torch.device) -> tuple[float, float]:
    """Median epoch seconds of (standard, method), measured alternately in this process."""
    from robustune.resolve import load_config
    from robustune.loop import TrainingLoop

    loops = {name: TrainingLoop(load_config(name, overrides=overrides), device=device, log=lambda _: None)
             for name in ("standard", method)}
    for loop in loops.values():
        loop.train_one_epoch()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            times[name].append(loop.train_one_epoch()["time/epoch_s"])
    return statistics.median(times["standard"]), statistics.median(times[method])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", help="default: every registered defense")
    parser.add_argument("--train-subset", type=int, default=5120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()

    from robustune.defense import create_defense, list_defenses

    unknown = sorted(set(args.methods or []) - set(list_defenses()))
    if unknown:
        parser.error(f"unknown defense(s) {', '.join(unknown)}; choose from {', '.join(list_defenses())}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    overrides = [f"data.train_subset={args.train_subset}", "train.epochs=100", *args.overrides]
    methods = [m for m in (args.methods or list_defenses()) if m != "standard"]
    from robustune.resolve import load_config

    setup = load_config("standard", overrides=overrides)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    lines = [f"Training epoch of {args.train_subset} {setup.data.name} images, {setup.model_name}, batch "
             f"{setup.train.batch_size}, {where}, {args.repeats} alternating pairs with standard; "
             f"torch {torch.__version__}", "",
             "| defense | declared cost | floor (x standard) | standard s | defense s | measured (x standard) "
             "| measured / floor | within 15% | also runs (outside the floor) |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for method in methods:
        cost = create_defense(method).cost()
        standard, seconds = paired_epoch_seconds(method, overrides, args.repeats, device)
        measured, floor = seconds / standard, cost.relative_to_standard
        ratio = measured / floor
        lines.append(f"| {method} | {cost} | {floor:.2f} | {standard:.2f} | {seconds:.2f} | {measured:.2f} "
                     f"| {ratio:.2f} | {'yes' if ratio <= 1.15 else 'no'} | {cost.auxiliary} |")
        print(lines[-1], flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
