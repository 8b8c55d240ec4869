"""`robustune sync`: send the tracking records a run kept while its MLflow server was unreachable.

A run whose tracking server goes away mid-run keeps training; what it could not send (per-epoch metrics, tags,
status, artifacts) waits in RUN_DIR/mlflow_outbox.jsonl (see robustune.tracking; for a run folder in an object
store, in ~/.cache/robustune/<scheme>/<bucket>/<key>/ on the node that wrote it). Once the server is back:

    robustune sync runs/fgsm_rs-fashion-mnist-20261121-101500-ab12
    robustune sync                      # every run folder under runs/ with queued records
"""

from __future__ import annotations

import argparse
import sys

from robustune.config import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sync", help="send tracking records a run kept while the MLflow server was unreachable",
        description="Replay the records queued in each run folder's mlflow_outbox.jsonl (metrics, tags, status, "
                    "artifacts) to the MLflow server the run was created on, in order. Metrics the server already "
                    "has at a step are skipped, so syncing twice never duplicates; records that still cannot be "
                    "sent stay queued.")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="run folders to sync (default: every run folder under --runs with queued records)")
    parser.add_argument("--runs", metavar="DIR",
                        help="where to look for run folders when no RUN_DIR is given (default: "
                             "$ROBUSTUNE_OUTPUT_DIR, else runs)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="send to this server instead of the one each run was created on (the server moved)")


def command(args: argparse.Namespace) -> int:
    from robustune import storage, tracking

    if args.run_dirs:
        folders = [storage.location(folder) for folder in args.run_dirs]
        for folder in folders:
            if not (folder.is_dir() or tracking.outbox_path(folder).is_file()):
                raise ConfigError(f"{folder} is not a run folder (pass the folder `robustune train` printed)")
    else:
        # Outboxes of runs kept in an object store wait on this node's disk (storage.node_local).
        root = storage.node_local(storage.output_root(args.runs))
        folders = sorted(outbox.parent for outbox in root.rglob(tracking.OUTBOX_FILE))
        if not folders:
            print(f"nothing to sync: no run folder under {root} has queued tracking records")
            return 0
    failed = 0
    for folder in folders:
        try:
            sent = tracking.replay_outbox(folder, uri=args.tracking_uri)
        except tracking.TrackingError as error:
            print(f"robustune sync: error: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: sent {sent} queued records" if sent else f"{folder}: nothing queued")
    return 2 if failed else 0
