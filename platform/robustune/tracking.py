"""MLflow tracking: one run per training, created by the driver and written to by rank 0 only.

Workers address the run by id through an `MlflowClient`, never through MLflow's global active-run state,
so several trainings (search trials) can share a process or a cluster without stepping on each other.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from robustune.config import Config, flatten

DEFAULT_STORE = "mlflow.db"  # in the working directory, where `mlflow ui` looks by default


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


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    # A local SQLite store keeps artifacts next to it (absolute, so runs logged from Ray workers land there too).
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def experiment_id(uri: str, name: str) -> str:
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=_artifact_location(uri))


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


def create_run(config: Config, run_name: str, extra_tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """Create the MLflow run with tags, every resolved config value as a param and the config as YAML."""
    uri = config.tracking.tracking_uri
    mlflow_client = client(uri)
    tags = {**run_tags(config), **(extra_tags or {}), "mlflow.runName": run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id(uri, config.tracking.experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    log_params(uri, run_id, flatten(config.to_dict()))
    log_text(uri, run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
    return run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    batch = [Param(key, _param_value(value)) for key, value in params.items()]
    for start in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
        client(uri).log_batch(run_id, params=batch[start:start + 100])


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_dict(uri: str, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    client(uri).log_dict(run_id, data, artifact_file)


def log_file(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
    for start in range(0, len(batch), 1000):
        client(uri).log_batch(run_id, metrics=batch[start:start + 1000])


def logged_steps(uri: str, run_id: str, key: str) -> set[int]:
    """Steps at which metric `key` was logged (to fill gaps after a resume without duplicating)."""
    return {m.step for m in client(uri).get_metric_history(run_id, key)}


def set_status(uri: str, run_id: str, status: str) -> None:
    """status: RUNNING, FINISHED, FAILED or KILLED."""
    mlflow_client = client(uri)
    if status == "RUNNING":
        mlflow_client.update_run(run_id, status="RUNNING")
    else:
        mlflow_client.set_terminated(run_id, status=status)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    client(uri).set_tag(run_id, key, value)


def write_temp_and_log(uri: str, run_id: str, filename: str, write) -> None:
    """Log a file produced by `write(path)` under its own name."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / filename
        write(path)
        log_file(uri, run_id, path)
