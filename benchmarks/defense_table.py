"""Results table: every defense trained with the same budget, evaluated by the same protocol.

Fashion-MNIST, small CNN, epsilon 0.1, the same training subset, epochs and schedule for all; each through
the real path (Ray Train + MLflow); test clean, PGD-20 and AutoAttack (fast: APGD-CE + APGD-T) accuracy, each
with its 95% interval over the points it was measured on, and the training time. Defaults of each defense
unless `--set` says otherwise (applies to all), and per-defense extra settings with `--extra NAME:KEY=VALUE`.
Prints a Markdown table; nothing is asserted.

    python benchmarks/defense_table.py [--methods standard fgsm_rs pgd ...] [--train-subset 10000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--aa-points", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME:KEY=VALUE")
    args = parser.parse_args()

    import ray

    from robustune.resolve import load_config
    from robustune.defense import list_defenses
    from robustune.training import run_training

    workdir = Path(tempfile.mkdtemp(prefix="robustune-table-"))
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        name, _, override = item.partition(":")
        extra.setdefault(name, []).append(override)
    ray.init(logging_level="WARNING")
    rows = []
    for method in args.methods or list_defenses():
        overrides = [f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}",
                     f"train.epochs={args.epochs}", "epsilon=0.1", f"eval.points={args.aa_points}",
                     f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                     f"tracking.output_dir={workdir / 'runs'}", *args.overrides, *extra.get(method, [])]
        try:
            report = run_training(load_config(method, overrides=overrides), log=lambda _: None).report
        except Exception as error:  # a defense that fails is a row, not the end of the table
            rows.append(f"| {method} | failed: {str(error).splitlines()[0][:120]} | | | | | |")
            print(rows[-1], flush=True)
            continue
        bare = report.get("bare_classifier")
        note = (f" (bare classifier: {bare['clean_acc']:.3f} / {bare['pgd_acc']:.3f} / {bare['aa_acc']:.3f})"
                if bare else "")
        adaptive = report.get("adaptive")
        if adaptive:
            note += " (crafted on " + ", ".join(f"{name}: {value:.3f}" for name, value in
                                                 adaptive["pgd_acc_on_surrogate"].items()) + ", scored deployed)"
        rows.append(f"| {method} | {' '.join(extra.get(method, [])) or 'defaults'} | {cell(report, 'clean_acc')} | "
                    f"{cell(report, 'pgd_acc')} | {cell(report, 'aa_acc')} | {cell(report, 'robust_acc')}{note} | "
                    f"{report['train_seconds']:.0f} |")
        print(rows[-1], flush=True)
    ray.shutdown()
    print(f"\nFashion-MNIST, small CNN, eps 0.1, {args.train_subset} training images, {args.epochs} epochs; "
          f"clean accuracy on {args.test_subset} test points; PGD-20, AutoAttack fast (APGD-CE + APGD-T) and "
          f"'robust to every attack' (per point) on the first {args.aa_points}; "
          "[95% Wilson interval over those points]")
    print("| defense | settings | clean | PGD-20 | AutoAttack (fast) | robust to every attack | "
          "train s (incl. validation) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def cell(report: dict, name: str) -> str:
    """An accuracy with its 95% interval over the points it was measured on: 0.612 [0.590, 0.633]."""
    low, high = report["intervals"][name]
    return f"{report[name]:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    main()
