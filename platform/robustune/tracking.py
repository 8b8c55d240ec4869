"""MLflow tracking: one run per training, created by the driver and written to by rank 0 only.

Workers address the run by id through an `MlflowClient`, never through MLflow's global active-run state,
so several trainings (search trials) can share a process or a cluster without stepping on each other.

A remote tracking server can go away mid-run. Every write goes through the helpers below; for a run whose
folder was registered with `use_outbox`, a write that cannot reach the server is appended to that folder's
`mlflow_outbox.jsonl` instead of failing the training (and, to keep the order, so is every later write for
that run). `robustune sync RUN_DIR` replays the outbox once the server is back (`replay_outbox`); metrics are
sent at most once per (key, step). Other failures (a bad value, a local store's error) still raise.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import numbers
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from robustune import storage
from robustune.config import Config, ConfigError, flatten

DEFAULT_STORE = "mlflow.db"  # in the working directory, where `mlflow ui` looks by default
OUTBOX_FILE = "mlflow_outbox.jsonl"  # in a run folder: writes that could not reach the tracking server
OUTBOX_FILES = "mlflow_outbox_files"  # in a run folder: copies of artifact files queued in the outbox
# MLflow's own defaults retry a refused connection 7 times with exponential backoff (minutes) and wait 120 s
# for an answer, so each logging call would stall a run whose server is gone. Fewer, shorter tries; the
# outbox keeps what does not get through. Values the user sets in the environment win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_URI_PASSWORD = re.compile(r"(?P<head>^[\w+.-]+://[^/@:]*:)[^/@]*(?=@)")


def redact_uri(uri: str | None) -> str | None:
    """The URI with any password replaced by *** (postgresql://user:secret@host/db -> postgresql://user:***@host/db)."""
    return _URI_PASSWORD.sub(r"\g<head>***", uri) if uri else uri


def public_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The config as logged and shared (MLflow params and artifacts, final.pt): no password of the tracking
    URI. The run folder's own config.yaml and search.json keep the real URI, which --resume needs."""
    data = dict(config.to_dict() if isinstance(config, Config) else config)
    if isinstance(data.get("tracking"), dict):
        data["tracking"] = {**data["tracking"], "tracking_uri": redact_uri(data["tracking"].get("tracking_uri"))}
    return data


class TrackingError(ConfigError):
    """The tracking server (tracking.tracking_uri / $MLFLOW_TRACKING_URI) does not answer; the message says
    what to do. A ConfigError: where to track is part of the configuration."""


def resolve_tracking_uri(configured: str | None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory.

    Local paths become absolute: Ray workers run in other folders than the driver.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri:  # a bare folder: MLflow's file store
        uri = Path(uri).resolve().as_uri()
    return uri


def load_modules(uri: str) -> None:
    """Import what `client(uri)` needs (seconds of CPU) and create nothing: a run, search or study does this
    while Ray starts (`robustune.cluster.ensure_ray`), and the checks after Ray's start may still refuse it,
    which must leave no store behind."""
    import mlflow.tracking  # noqa: F401

    if "://" in uri and not uri.startswith(("http://", "https://", "file:")):  # a database: MLflow's SQL store
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """The MLflow client for `uri`, one per process: a reused Ray process (a Tune trial actor) opens the store
    once, not for every run and every write."""
    from mlflow.tracking import MlflowClient

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if redact_uri(uri) != uri:  # MLflow prints "View run at <URI>" links with the password as given
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    # A local SQLite store keeps artifacts next to it (absolute, so runs logged from Ray workers land there too).
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


# MLflow 3's UI shows an experiment as "GenAI apps & agents" (overview, traces, token usage) or as "Machine
# learning" (its runs). The experiment tag mlflow.experimentKind records which one an experiment is; a UI that
# goes by the tag opens the runs and does not ask the user to choose. MLflow 3.17's UI goes by its sidebar switch
# instead (remembered per browser, GenAI at first) unless the link names the view: `ui_link` does.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
UI_MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the link's query that opens the runs in MLflow 3.17


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created as a model-training experiment when it does not exist yet. One made before
    robustune tagged its experiments gets the tag now; a kind someone chose in the UI stays."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        return mlflow_client.create_experiment(name, artifact_location=_artifact_location(uri),
                                               tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def ui_link(server_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The page of an experiment's runs (or of one run) in the MLflow UI at `server_url`, in its model-training
    view whatever view the browser last used."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{server_url.rstrip('/')}/{page}?{UI_MODEL_TRAINING_VIEW}"


def run_tags(config: Config) -> dict[str, str]:
    tags = {
        "method": config.method_name,
        "dataset": config.data.name,
        "model": config.model_name,
        "epsilon": f"{config.epsilon:.6g}",
        "seed": str(config.seed),
    }
    if config.study:
        tags["study"] = config.study
    return tags


RUN_FOLDER_TAG = "run_folder"


def create_run(config: Config, run_name: str, extra_tags: dict[str, str] | None = None,
               parent_run_id: str | None = None, run_folder: str | None = None,
               display_name: str | None = None) -> str:
    """Create the MLflow run with tags, every resolved config value as a param and the config as YAML.

    `display_name` is the name the MLflow UI shows (`pgd (tuned) seed 1`; default `run_name`). It need not be
    unique: the run is found by id, and its folder by `run_name`, which this does not change.
    With `run_folder`, a run already created for that folder is taken over instead: a process killed between
    creating the MLflow run and writing the folder's run.json (a search killed while a trial starts) must not
    leave a second run for the same folder when it resumes."""
    uri = config.tracking.tracking_uri
    mlflow_client = client(uri)
    display_name = display_name or run_name
    tags = {**run_tags(config), **(extra_tags or {}), "mlflow.runName": display_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    experiment = experiment_id(uri, config.tracking.experiment)
    existing = []
    if run_folder is not None:
        tags[RUN_FOLDER_TAG] = run_folder
        quoted = run_folder.replace("\\", "\\\\").replace("'", "\\'")
        existing = mlflow_client.search_runs([experiment], f"tags.{RUN_FOLDER_TAG} = '{quoted}'", max_results=1)
    run_id = existing[0].info.run_id if existing else \
        mlflow_client.create_run(experiment, run_name=display_name, tags=tags).info.run_id
    shared = public_config(config)
    log_params(uri, run_id, flatten(shared))
    log_text(uri, run_id, yaml.safe_dump(shared, sort_keys=False), "config.yaml")
    return run_id


def check_server(uri: str, timeout: float = 10.0) -> None:
    """TrackingError when `uri` is an MLflow server (http/https) that does not answer; local stores pass."""
    if not uri.startswith(("http://", "https://")):
        return
    # urllib does not take user:password@ from the URL itself: send it as basic auth (as MLflow's client does).
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health",
                                                              "", "")))
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, a server without /health): reachable
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(
            f"the MLflow tracking server {redact_uri(uri)} does not answer ({getattr(error, 'reason', error)}); "
            f"start it "
            f"(for example: mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db), "
            f"or set MLFLOW_TRACKING_URI (or tracking.tracking_uri) to a running server, or unset it to log to "
            f"the local store ./{DEFAULT_STORE}") from error


# ------------------------------------------------------------------------------------------------ outbox
_OUTBOXES: dict[str, Path] = {}  # run id -> its run folder's outbox, in this process


def outbox_path(run_dir: str | Path) -> Path:
    """A run's outbox: RUN_DIR/mlflow_outbox.jsonl, or a folder on this node's disk when the run folder is in
    an object store (which cannot append)."""
    return storage.node_local(storage.location(run_dir)) / OUTBOX_FILE


def use_outbox(run_id: str, run_dir: str | Path) -> Path:
    """From now on, writes for `run_id` that cannot reach the tracking server go to the run's outbox."""
    path = outbox_path(run_dir)
    _OUTBOXES[run_id] = path
    return path


def read_outbox(run_dir: str | Path) -> list[dict[str, Any]]:
    """The queued records of a run folder, oldest first (a line cut short by a crash is skipped)."""
    path = outbox_path(run_dir)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _queued(outbox: Path | None) -> bool:
    return outbox is not None and outbox.is_file() and outbox.stat().st_size > 0


def _unreachable(uri: str, error: BaseException) -> bool:
    """Did `error` come from not reaching the server (refused, reset, timed out, retries exhausted)?"""
    if not uri.startswith(("http://", "https://")):
        return False
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, requests.exceptions.RequestException):
        return True
    # MLflow's REST layer wraps every transport failure as "API request to <url> failed with [timeout] exception".
    return isinstance(error, MlflowException) and re.search(r"failed with (timeout )?exception", str(error)) is not None


def _short_reason(error: BaseException) -> str:
    """'[Errno 111] Connection refused' out of MLflow's and urllib3's nested wrapping, else the first line."""
    text = str(error).strip()
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text) or re.search(r"timed out|Read timed out", text)
    if found:
        return found.group(0).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _append(outbox: Path, record: dict[str, Any]) -> None:
    if record["op"] == "log_file":  # keep a copy unless the file lives in the run folder already
        source = Path(record["path"]).resolve()
        if outbox.parent.resolve() not in source.parents:
            copy = outbox.parent / OUTBOX_FILES / str(time.time_ns()) / source.name  # the name is the artifact's
            copy.parent.mkdir(parents=True)
            shutil.copy2(source, copy)
            record = {**record, "path": str(copy)}
    # One O_APPEND write per record: lines from the driver and the worker never interleave.
    outbox.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(outbox, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (json.dumps(record, default=str) + "\n").encode())
    finally:
        os.close(descriptor)


def _send(uri: str, run_id: str, op: str, **fields: Any) -> None:
    """Apply one write, or queue it in the run's outbox when the server cannot be reached (or others wait)."""
    outbox = _OUTBOXES.get(run_id)
    record = {"op": op, "uri": uri, "run_id": run_id, **fields}
    if _queued(outbox):  # writes already wait: queue behind them so they replay in order
        _append(outbox, record)
        return
    try:
        _APPLY[op](uri, run_id, **fields)
    except Exception as error:
        if outbox is None or not _unreachable(uri, error):
            raise
        _append(outbox, record)
        sys.stderr.write(f"warning: the MLflow server {redact_uri(uri)} is unreachable ({_short_reason(error)}); "
                         f"this run's tracking records go to {outbox} from now on: send them with "
                         f"`robustune sync {outbox.parent}` once the server is back\n")
        sys.stderr.flush()


def _apply_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    batch = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
        client(uri).log_batch(run_id, params=batch[start:start + 100])


def _apply_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp: int) -> None:
    from mlflow.entities import Metric

    batch = [Metric(key, value, timestamp, step) for key, value in metrics.items()]
    for start in range(0, len(batch), 1000):
        client(uri).log_batch(run_id, metrics=batch[start:start + 1000])


def _apply_status(uri: str, run_id: str, status: str, timestamp: int) -> None:
    if status == "RUNNING":
        client(uri).update_run(run_id, status="RUNNING")
    else:
        client(uri).set_terminated(run_id, status=status, end_time=timestamp)


_APPLY: dict[str, Callable[..., None]] = {
    "log_params": _apply_params,
    "log_metrics": _apply_metrics,
    "log_text": lambda uri, run_id, text, artifact_file: client(uri).log_text(run_id, text, artifact_file),
    "log_dict": lambda uri, run_id, data, artifact_file: client(uri).log_dict(run_id, data, artifact_file),
    "log_file": lambda uri, run_id, path, artifact_path: client(uri).log_artifact(run_id, path, artifact_path),
    "set_tag": lambda uri, run_id, key, value: client(uri).set_tag(run_id, key, value),
    "set_status": _apply_status,
}


def replay_outbox(run_dir: str | Path, uri: str | None = None) -> int:
    """Send a run folder's queued records to the tracking server (its own URI unless `uri` is given), in order;
    returns how many were queued. Metrics the server already has at that step are skipped, so a replay after a
    partial one, or of an epoch logged again after a resume, never duplicates. On failure the records not sent
    stay queued and TrackingError says so."""
    outbox = outbox_path(run_dir)
    records = read_outbox(run_dir)
    if not records:
        outbox.unlink(missing_ok=True)
        return 0
    check_server(uri or records[0]["uri"])  # still down: say so, send nothing
    have: dict[tuple[str, str], set[int]] = {}  # (run id, metric key) -> steps the server has
    for index, record in enumerate(records):
        target = uri or record["uri"]
        fields = {k: v for k, v in record.items() if k not in ("op", "uri", "run_id")}
        try:
            if record["op"] == "log_metrics":
                run_id, step = record["run_id"], fields["step"]
                for key in fields["metrics"]:
                    if (run_id, key) not in have:
                        have[run_id, key] = {m.step for m in client(target).get_metric_history(run_id, key)}
                fields["metrics"] = {k: v for k, v in fields["metrics"].items() if step not in have[run_id, k]}
                if fields["metrics"]:
                    _APPLY["log_metrics"](target, run_id, **fields)
                for key in fields["metrics"]:
                    have[run_id, key].add(step)
            else:
                _APPLY[record["op"]](target, record["run_id"], **fields)
        except Exception as error:
            left = outbox.with_name(outbox.name + ".tmp")
            left.write_text("".join(json.dumps(r) + "\n" for r in records[index:]))
            os.replace(left, outbox)
            raise TrackingError(f"{run_dir}: sent {index} of {len(records)} queued MLflow records; the rest stay in "
                                f"{outbox} ({record['op']} failed: {_short_reason(error)}); run `robustune sync {run_dir}` "
                                "again once the server answers") from error
    outbox.unlink()
    shutil.rmtree(outbox.parent / OUTBOX_FILES, ignore_errors=True)
    return len(records)


# ------------------------------------------------------------------------------------------------ writes
def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    _send(uri, run_id, "log_params", params={key: _param_value(value) for key, value in params.items()})


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _send(uri, run_id, "log_text", text=text, artifact_file=artifact_file)


def log_dict(uri: str, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    _send(uri, run_id, "log_dict", data=data, artifact_file=artifact_file)


def log_file(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file as an artifact (a file in an object store through a local copy: MLflow opens local files)."""
    with storage.local_file(storage.location(path)) as local:
        _send(uri, run_id, "log_file", path=str(local), artifact_path=artifact_path)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    values = {key: float(value) for key, value in metrics.items() if value is not None}
    _send(uri, run_id, "log_metrics", metrics=values, step=int(step), timestamp=int(time.time() * 1000))


def logged_steps(uri: str, run_id: str, key: str) -> set[int]:
    """Steps at which metric `key` was logged (to fill gaps after a resume without duplicating). While the
    run's writes wait in its outbox: the steps queued there (a replay skips those the server has)."""
    outbox = _OUTBOXES.get(run_id)
    queued = {int(r["step"]) for r in read_outbox(outbox.parent)
              if r["op"] == "log_metrics" and r["run_id"] == run_id and key in r["metrics"]} if outbox else set()
    if _queued(outbox):
        return queued
    try:
        return {m.step for m in client(uri).get_metric_history(run_id, key)}
    except Exception as error:
        if outbox is None or not _unreachable(uri, error):
            raise
        return queued


def set_status(uri: str, run_id: str, status: str) -> None:
    """status: RUNNING, FINISHED, FAILED or KILLED."""
    _send(uri, run_id, "set_status", status=status, timestamp=int(time.time() * 1000))


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    _send(uri, run_id, "set_tag", key=key, value=value)


LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # the run tag that tells MLflow's UI which artifacts are tables


def log_table(uri: str, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Log `rows` as a table the MLflow UI renders (artifact_file: a .json path, e.g. leaderboard/table.json).

    The file and the tag are mlflow.log_table's (JSON {"columns", "data"}, pandas' "split" layout; the table
    listed in mlflow.loggedArtifacts), but a table logged again replaces the old one: MlflowClient.log_table
    appends to it, so a rebuilt leaderboard would list every defense twice."""
    if not artifact_file.endswith(".json"):
        raise ValueError(f"a table artifact is a .json file, got {artifact_file!r}")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, in first-seen order
    table = {"columns": columns, "data": [[_table_cell(row.get(column)) for column in columns] for row in rows]}
    log_dict(uri, run_id, table, artifact_file)  # rewrites the file
    listed = json.loads(client(uri).get_run(run_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in listed:
        set_tag(uri, run_id, LOGGED_ARTIFACTS_TAG, json.dumps([*listed, entry]))


def _table_cell(value: Any) -> Any:
    """A JSON value for one cell: numbers (numpy's too) as numbers, NaN and infinities (which JSON lacks) empty,
    lists and the like as their JSON text."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return json.dumps(value, default=str)


def log_evaluation(uri: str, run_id: str, report: dict[str, Any], step: int) -> None:
    """A final evaluation's numbers (the stable `test/*` names; `test/bare_*` for a test-time defense's bare
    classifier), its report, the protocol tag, and the `eval/warning` tag when any check or attack warned."""
    def numbers(prefix: str, part: dict[str, Any]) -> dict[str, float]:
        names = ("clean_acc", "pgd_acc", "cw_acc", "aa_acc", "robust_acc")
        return {f"{prefix}{name}": part[name] for name in names if part.get(name) is not None}

    def intervals(prefix: str, part: dict[str, Any]) -> dict[str, float]:
        bounds = part.get("intervals") or {}
        return {f"{prefix}{name}_ci_{side}": value for name, pair in bounds.items()
                for side, value in zip(("low", "high"), pair)}

    metrics = {**numbers("test/", report), **intervals("test/", report)}
    if report.get("bare_classifier"):
        metrics.update(numbers("test/bare_", report["bare_classifier"]))
        metrics.update(intervals("test/bare_", report["bare_classifier"]))
    for name, value in ((report.get("adaptive") or {}).get("pgd_acc_on_surrogate") or {}).items():
        metrics[f"test/adaptive_{name}_pgd_acc"] = value  # crafted on that surrogate, scored on the deployed model
    log_metrics(uri, run_id, metrics, step=step)
    protocol = report["protocol"].split("/")[0]
    log_dict(uri, run_id, report, f"eval/{protocol}/report.json")
    if report.get("outcomes_path"):  # per-point outcomes (Parquet), for paired comparisons between runs
        log_file(uri, run_id, storage.location(report["outcomes_path"]), f"eval/{protocol}")
    set_tag(uri, run_id, "eval/protocol", report["protocol"])
    warnings = list(report.get("warnings", []))
    warnings += [f"bare classifier: {w}" for w in (report.get("bare_classifier") or {}).get("warnings", [])]
    if warnings:
        set_tag(uri, run_id, "eval/warning", "; ".join(warnings)[:5000])
