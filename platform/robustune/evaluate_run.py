"""`robustune evaluate`: the fixed evaluation protocol applied to a finished run or a checkpoint.

The source is a run folder (it holds `final.pt` and `run.json`), a `final.pt` file, or an MLflow run id (its
`checkpoint/final.pt` artifact is downloaded when the run folder is not on this machine). The model, the defense
(for a test-time step such as ATLD's IMT) and the test split are rebuilt from the config saved in the checkpoint;
AutoAttack is sharded across `eval.workers` Ray tasks (a study's evaluation, itself a Ray task, runs it in that task:
`evaluate_in_task`) and resumes from `<run>/eval-<protocol>/` after an interruption. When the source belongs to an
MLflow run, the numbers, report and `eval/warning` tag go there.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from robustune.config import ConfigError, EvalConfig, build_dataclass
from robustune.storage import Location, check_storage, is_object_store, location

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Source:
    checkpoint: Location
    state_root: Location  # where the evaluation's resumable state and report go
    run_id: str | None
    tracking_uri: str | None


def locate(source: str, tracking_uri: str | None = None) -> Source:
    """Where the checkpoint is, and which MLflow run (if any) it belongs to."""
    from robustune import tracking
    from robustune.run import FINAL_MODEL_FILE, RUN_FILE

    path = location(source)
    if is_object_store(path):  # an unreachable store or a missing bucket says so, not a traceback
        check_storage(path.parent)
    if path.is_dir():
        checkpoint = path / FINAL_MODEL_FILE
        if not checkpoint.is_file():
            raise ConfigError(f"{path} holds no {FINAL_MODEL_FILE}: pass a finished run folder, a final.pt file "
                              "or an MLflow run id")
        run_file = path / RUN_FILE
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        return Source(checkpoint, path, run.get("run_id"), run.get("tracking_uri"))
    if path.is_file():
        return Source(path, path.parent / f"{path.stem}-eval", None, None)
    if RUN_ID_PATTERN.match(source):
        uri = tracking.resolve_tracking_uri(tracking_uri)
        try:
            run = tracking.client(uri).get_run(source)
        except Exception as error:  # MLflow raises its own exception types for unknown ids
            raise ConfigError(f"MLflow run {source} not found at {tracking.redact_uri(uri)}: "
                              f"{str(error).splitlines()[0]}") from error
        params = run.data.params
        folder = location(params.get("tracking.output_dir") or ".") / params.get("tracking.run_name", "")
        if (folder / FINAL_MODEL_FILE).is_file():
            return Source(folder / FINAL_MODEL_FILE, folder, source, uri)
        cache = Path(tempfile.gettempdir()) / "robustune-eval" / source
        cache.mkdir(parents=True, exist_ok=True)
        try:
            downloaded = tracking.client(uri).download_artifacts(source, f"checkpoint/{FINAL_MODEL_FILE}", str(cache))
        except Exception as error:
            raise ConfigError(f"MLflow run {source} has no checkpoint/{FINAL_MODEL_FILE} artifact and its run "
                              f"folder {folder} is not on this machine") from error
        return Source(Path(downloaded), cache, source, uri)
    if is_object_store(source):
        raise ConfigError(f"{source} holds nothing: pass a finished run folder or final.pt in the storage")
    raise ConfigError(f"{source!r} is neither a run folder, a checkpoint file nor an MLflow run id "
                      "(32 hex characters)")


def evaluate_run(source: str, eval_settings: dict[str, Any], *, tracking_uri: str | None = None,
                 log: Callable[[str], None] = print, track: bool = True) -> dict[str, Any]:
    """Evaluate a saved model by the protocol in `eval_settings` (EvalConfig fields); log it to its MLflow run
    (`track`; else the caller logs it, with `robustune.tracking.log_evaluation`)."""
    from robustune import tracking
    from robustune.evaluation import attacked_slice, evaluate_deployed, format_report
    from robustune.run import load_trained

    eval_config = build_dataclass(EvalConfig, {"enabled": True, **eval_settings}, "eval")
    where = locate(source, tracking_uri)
    trained = load_trained(where.checkpoint)
    config, device = trained.config, trained.device
    protocol = eval_config.protocol
    state_dir = where.state_root / f"eval-{protocol}"
    attacked = attacked_slice(eval_config, len(trained.splits.test.labels))
    chunks = -(-(attacked.stop - attacked.start) // eval_config.batch_size)
    shards = min(eval_config.workers, chunks)
    log(f"evaluating {where.checkpoint} ({config.method_name}, {config.model_name}, eps {config.epsilon:.4g}) "
        f"with the {protocol} protocol; AutoAttack in {shards} shard(s); state in {state_dir}")
    if shards < eval_config.workers:  # shards are whole chunks, so that flags do not depend on the shard count
        log(f"note: eval.workers={eval_config.workers} but {attacked.stop - attacked.start} attacked points in "
            f"chunks of eval.batch_size={eval_config.batch_size} make {chunks} chunk(s); lower eval.batch_size "
            "to use every worker")
    report = evaluate_deployed(trained.model, trained.defense, trained.splits.test, epsilon=config.epsilon,
                               eval_config=eval_config, device=device, seed=config.seed, state_dir=state_dir, log=log)
    report.update({"source": str(where.checkpoint), "method": config.method_name})
    (state_dir / "report.json").write_text(json.dumps(report, indent=2))
    if where.run_id and where.tracking_uri:
        if track:
            tracking.log_evaluation(where.tracking_uri, where.run_id, report, step=0)
        report["run_id"] = where.run_id
    log(format_report(report))
    return report


def evaluate_in_task(source: str, eval_settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """`evaluate_run` as the body of a Ray task that holds `threads` CPUs (a study runs its evaluations so, several
    at once). AutoAttack's chunks run here, one after another: as nested tasks they would wait for CPUs (or a GPU)
    that the study's evaluations hold. The chunks, and so the flags, are the same as sharded ones
    (robustune.evaluation). Returns the report, its log lines (the study's driver passes them on as the evaluation
    ends, so that concurrent evaluations do not interleave) and the wall seconds the task held its resources.
    The driver logs the report to MLflow: a task often runs in a fresh Ray worker, where opening MLflow alone
    takes seconds of CPU."""
    import torch

    started = time.time()
    torch.set_num_threads(threads)
    lines: list[str] = []
    report = evaluate_run(source, {**eval_settings, "workers": 1}, log=lines.append, track=False)
    return {"report": report, "lines": lines, "seconds": time.time() - started}


# ------------------------------------------------------------------------------------------------ CLI
def add_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="evaluate a finished run or checkpoint by the fixed protocol (quick or full)",
        description="Evaluate a saved model by a fixed, versioned protocol: quick/1 (PGD-20 + APGD-CE + APGD-T on "
                    "the first N test points) or full/1 (PGD-50 x 10 restarts, CW-50 and AutoAttack standard on "
                    "the whole test set), with gradient-masking checks. AutoAttack runs sharded across Ray tasks "
                    "and resumes after an interruption.",
        epilog=textwrap.dedent("""\
            examples:
              robustune evaluate runs/fgsm_rs-fashion-mnist-20261121-101500-ab12
              robustune evaluate 0123456789abcdef0123456789abcdef --protocol full --workers 4
              robustune evaluate path/to/final.pt --points 500
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run folder, final.pt file, or MLflow run id")
    parser.add_argument("--protocol", choices=["quick", "full"], default="quick", help="default quick")
    parser.add_argument("--points", type=int, default=1000, help="quick: attacked test points (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="AutoAttack shards, one Ray task each (default 1)")
    parser.add_argument("--batch-size", type=int, default=500, help="attack batch = AutoAttack chunk (default 500)")
    parser.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    parser.add_argument("--tracking-uri", help="MLflow store of a run id (default $MLFLOW_TRACKING_URI or ./mlflow.db)")


def command(args: argparse.Namespace) -> int:
    evaluate_run(args.source, {"protocol": args.protocol, "points": args.points, "workers": args.workers,
                               "batch_size": args.batch_size, "checks": not args.no_checks},
                 tracking_uri=args.tracking_uri)
    return 0
