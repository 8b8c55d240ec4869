"""The `robustune` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap

import yaml

EPILOG_TRAIN = textwrap.dedent("""\
    examples:
      robustune train fgsm_rs --set epsilon=0.1 --set train.epochs=3
      robustune train pgd --set method.steps=7 --set data.train_subset=10000
      robustune train eae --set train.init_from=runs/standard-.../final.pt
      robustune train --resume runs/fgsm_rs-fashion-mnist-20261121-101500-ab12
      robustune train pgd --config my.yaml --print-config

    Keys are dotted paths into the config (see --print-config): method.<field>, model.<kwarg>, epsilon,
    seed, data.*, train.*, validation.*, eval.*, resources.*, tracking.*. Epsilon and step sizes accept
    fractions such as 8/255. Results go to MLflow ($MLFLOW_TRACKING_URI, default ./mlflow.db); run folders
    (checkpoints, final.pt, state) to tracking.output_dir ($ROBUSTUNE_OUTPUT_DIR, default ./runs): a folder, a
    path every node mounts, or an object store (s3://bucket/prefix, gs://bucket/prefix).
""")


VERBOSE_HELP = ("also print every worker's per-epoch lines, each evaluation's details, and Ray's and MLflow's "
                "own log lines (by default a live display on a terminal, plain progress lines elsewhere)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustune",
        description="Train, tune and compare fast adversarial-training defenses on Ray, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser(
        "train", help="train one defense on Ray Train, evaluate it on the test split, log it to MLflow",
        description="Train one defense on Ray Train; validate every epoch on held-out data; evaluate the "
                    "selected weights on the test split (clean, PGD, AutoAttack); log everything to MLflow.",
        epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("method", nargs="?", help="defense to train (`robustune methods` lists them)")
    train.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="YAML config file; repeat to layer several (later wins)")
    train.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="override one setting, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue an interrupted run from its last checkpoint, in the same MLflow run")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (defaults filled in) and exit without training")

    search = commands.add_parser(
        "search", help="tune a defense's knobs with Ray Tune + Optuna (TPE) + ASHA on validation data",
        description="Search a defense's knobs: each trial is one training run (Ray Train inside the trial, "
                    "an MLflow child run under the search's parent run); ASHA stops hopeless trials after any "
                    "epoch; the objective is validation PGD accuracy (the test split is never used). Results: "
                    "MLflow and results.parquet in the search folder.",
        epilog=textwrap.dedent("""\
            examples:
              robustune search fgsm_rs --samples 8 --epochs 3
              robustune search pgd --space my_space.yaml --objective constrained --min-clean 0.8
              robustune search fgsm_rs --objective pareto --max-concurrent 2
              robustune search --resume runs/search-fgsm_rs-20261121-101500 --refit
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument("defense", nargs="?", help="defense to tune (`robustune methods`)")
    search.add_argument("--space", metavar="FILE", help="search-space YAML (default: the defense's shipped space)")
    search.add_argument("--samples", type=int, default=8,
                        help="number of trials (default 8; the grid searcher runs its whole grid)")
    search.add_argument("--max-concurrent", type=int, help="trials at once (default: what the CPUs fit)")
    search.add_argument("--epochs", type=int, help="epochs per trial (default: train.epochs)")
    search.add_argument("--objective", choices=["robust", "pareto", "constrained"], default="robust",
                        help="robust: max validation PGD accuracy; pareto: PGD and clean accuracy (Pareto front); "
                             "constrained: max PGD accuracy subject to clean accuracy >= --min-clean")
    search.add_argument("--min-clean", type=float, help="constrained objective's clean-accuracy floor")
    search.add_argument("--searcher", choices=["tpe", "random", "grid"], default="tpe",
                        help="Optuna sampler (seeded); grid runs every point of an even grid over the space")
    search.add_argument("--grid-points", type=int, default=3,
                        help="grid searcher: values per numeric knob (default 3; choices take all their values)")
    search.add_argument("--scheduler", choices=["asha", "none"], default="asha", help="early stopping of trials")
    search.add_argument("--grace-period", type=int, metavar="EPOCHS",
                        help="ASHA: epochs before a trial can be stopped (default: the first epoch where the "
                             "learning rate has fallen to half its peak, as the search's log says)")
    search.add_argument("--seed", type=int, default=0, help="searcher seed")
    search.add_argument("--no-default-point", action="store_true",
                        help="do not evaluate the defense's defaults as the first trial")
    search.add_argument("--config", action="append", default=[], metavar="FILE", help="base run config YAML")
    search.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a base setting, e.g. --set data.train_subset=10000")
    search.add_argument("--resume", metavar="SEARCH_DIR", help="continue an interrupted search")
    search.add_argument("--refit", action="store_true",
                        help="then retrain the best config on training + validation data and evaluate it on test")
    search.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)

    study = commands.add_parser(
        "study", help="run a study: tune and train several defenses the same way, evaluate, build the leaderboard",
        description="Run a study definition (YAML; default: the shipped default study, LAS-AT against PGD-AT tuned "
                    "on LAS-AT's training compute, with tuned FGSM-RS and standard training as reference rows, on "
                    "Fashion-MNIST, 6 seeds): searches on validation data, "
                    "final runs over the study's seeds, one fixed evaluation protocol on the test split, and the "
                    "leaderboard. Everything is logged under one MLflow parent run; an interrupted study continues "
                    "with --resume.",
        epilog=textwrap.dedent("""\
            examples:
              robustune study                                   # search_spaces/studies/default.yaml
              robustune study my_study.yaml --set data.train_subset=20000
              robustune study --check                           # validate the definition, run nothing
              robustune study --resume runs/study-default-20261121-101500
              RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- robustune study
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_argument("file", nargs="?", help="study definition YAML (default: the shipped default study)")
    study.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="override a run setting of every defense, e.g. --set train.epochs=2 (repeatable)")
    study.add_argument("--resume", metavar="STUDY_DIR", help="continue an interrupted study")
    study.add_argument("--check", action="store_true", help="validate the definition and exit")
    study.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)

    from robustune import evaluate_run, leaderboard
    from robustune.defense import defense_commands

    evaluate_run.add_parser(commands)
    leaderboard.add_parser(commands)
    for contributed in defense_commands():  # subcommands a defense declares in its own file
        contributed.add_parser(commands)
    from robustune import sync

    sync.add_parser(commands)

    commands.add_parser("methods", help="list the defenses with their cost and one-line description",
                        description="List every registered defense: name, cost in forward/backward passes "
                                    "per batch (standard training is 1F1B), and what it does.")
    return parser


def command_methods() -> int:
    from robustune.defense import create_defense, list_defenses

    rows = []
    for name in list_defenses():
        defense = create_defense(name)
        rows.append((name, str(defense.cost()), type(defense).summary))
    width, cost_width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'method':<{width}}  {'cost/batch':>{cost_width}}  description")
    for name, cost, summary in rows:
        print(f"{name:<{width}}  {cost:>{cost_width}}  {summary}")
    return 0


def command_train(args: argparse.Namespace) -> int:
    from robustune import tracking
    from robustune.resolve import load_config
    from robustune.training import run_training

    if args.resume:
        if args.method or args.config or args.overrides:
            raise SystemExit("robustune train: --resume continues a run with its own saved config; "
                             "drop the method, --config and --set arguments")
        outcome = run_training(resume_dir=args.resume)
    else:
        if not args.method:
            raise SystemExit("robustune train: name a method (see `robustune methods`), or --resume RUN_DIR")
        config = load_config(args.method, args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        outcome = run_training(config)
    report = outcome.report
    print()
    if not report.get("evaluated"):
        print(f"done: {report['epochs_run']} epochs ({report['stop_reason']}); test evaluation disabled (eval.enabled)")
    else:
        print(f"done: test clean {report['clean_acc']:.4f}, PGD-{report['pgd']['steps']} {report['pgd_acc']:.4f}, "
              + (f"AutoAttack ({report['autoattack']['version']}) {report['aa_acc']:.4f}"
                 if report.get("aa_acc") is not None else "AutoAttack not run"))
    print(f"MLflow run {outcome.run_id} at {tracking.redact_uri(outcome.tracking_uri)}")
    print(f"  see it with: mlflow ui --backend-store-uri {tracking.redact_uri(outcome.tracking_uri)}   "
          "(then open http://127.0.0.1:5000)")
    print(f"  run folder: {outcome.run_dir}")
    return 0


def quiet_output(verbose: bool) -> None:
    """A study or search prints its own lines and progress. Without --verbose, Ray does not pass on its workers'
    output, and Ray, MLflow and Python warnings say only what is an error; with it, every worker line is
    passed on (no "[repeated]" folding), without colour codes when the output is not a terminal."""
    import logging
    import os

    from robustune import cluster

    cluster.show_worker_output(verbose)
    if verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if not sys.stdout.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def command_search(args: argparse.Namespace) -> int:
    from robustune import progress
    from robustune.config import raw_config
    from robustune.search import SearchSettings, resume_search, start_search

    quiet_output(args.verbose)
    if args.resume:
        with progress.showing("search") as shown:
            resume_search(args.resume, log=shown.log, refit=args.refit)
        return 0
    if not args.defense:
        raise SystemExit("robustune search: name a defense (see `robustune methods`), or --resume SEARCH_DIR")
    settings = SearchSettings(defense=args.defense, samples=args.samples, max_concurrent=args.max_concurrent,
                              epochs=args.epochs, objective=args.objective, min_clean=args.min_clean,
                              seed=args.seed, searcher=args.searcher, grid_points=args.grid_points,
                              scheduler=args.scheduler, grace_period=args.grace_period,
                              include_default=not args.no_default_point, space_file=args.space)
    with progress.showing(f"search {args.defense}") as shown:
        start_search(settings, raw_config(None, args.config, args.overrides), log=shown.log, refit=args.refit)
    return 0


def command_study(args: argparse.Namespace) -> int:
    from robustune import progress
    from robustune.study import load_study, resume_study, start_study

    quiet_output(args.verbose)
    if args.resume:
        if args.file or args.overrides:
            raise SystemExit("robustune study: --resume continues a study with its own saved definition; "
                             "drop the file and --set arguments")
        with progress.showing("study") as shown:
            resume_study(args.resume, log=shown.log, detail=shown.log if args.verbose else shown.ignore)
        return 0
    study = load_study(args.file, args.overrides)
    if args.check:
        print(f"study {study.name} ({study.source}): valid; {len(study.entries)} defenses "
              f"({', '.join(e.label for e in study.entries)}), seeds {study.seeds}")
        return 0
    with progress.showing(f"study {study.name}") as shown:
        start_study(study, log=shown.log, detail=shown.log if args.verbose else shown.ignore)
    return 0


def main(argv: list[str] | None = None) -> int:
    from robustune.checkpoints import CheckpointError
    from robustune.config import ConfigError
    from robustune.data import DataError
    from robustune.models import ModelError
    from robustune.training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return command_methods()
        if args.command == "train":
            return command_train(args)
        if args.command == "search":
            return command_search(args)
        if args.command == "study":
            return command_study(args)
        if args.command == "evaluate":
            from robustune import evaluate_run

            return evaluate_run.command(args)
        if args.command == "report":
            from robustune import leaderboard

            return leaderboard.command(args)
        if args.command == "sync":
            from robustune import sync

            return sync.command(args)
        from robustune.defense import defense_commands

        for contributed in defense_commands():
            if args.command == contributed.name:
                return contributed.run(args)
    except (ConfigError, DataError, ModelError, CheckpointError, TrainingError) as error:
        print(f"robustune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
