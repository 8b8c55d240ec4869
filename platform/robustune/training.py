"""Running a run on Ray: `run_training` (what `robustune train` calls) and the two ways a run executes.

- One worker (`resources.num_workers == 1`, CPU or one GPU): the worker function runs in the Ray process
  scheduled for the run: `execute_here` inside a Tune trial (search and study), a Ray task reserving the run's
  CPUs/GPU for `robustune train` (`execute_as_task`; Ray retries it from the run folder's newest checkpoint
  when its process dies, up to resources.max_failures times).
- Several workers: Ray Train's TorchTrainer runs the same worker function data-parallel (gloo or nccl), with
  its FailureConfig (`execute_with_trainer`).
Both paths run `robustune.worker.run_worker`; nothing about a defense differs between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from robustune import tracking
from robustune.checkpoints import latest_checkpoint
from robustune.cluster import check_cluster_fits, ensure_ray, worker_threads
from robustune.config import Config
from robustune.data import check_available
from robustune.loop import TrainingError
from robustune.run import Run, check_weights_sources
from robustune.storage import (Location, check_nodes_see, check_storage, is_object_store, location, output_root,
                               ray_storage)
from robustune.worker import LocalSession, run_worker, train_worker, write_line


@dataclass
class TrainingOutcome:
    run_id: str
    run_dir: Location
    tracking_uri: str
    report: dict[str, Any]


def run_training(config: Config | None = None, *, resume_dir: str | Location | None = None,
                 log: Callable[[str], None] = print, extra_tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, callbacks: list | None = None) -> TrainingOutcome:
    """Train `config` (or continue the run in `resume_dir`) on Ray, evaluate it, and track it in MLflow.
    Every check (data, tracking server, warm-start weights, cluster fit) runs before the run is created."""
    if resume_dir is not None:
        resume_dir = location(resume_dir)
        if is_object_store(resume_dir):  # a bad bucket or key says so before anything reads it
            check_storage(resume_dir.parent)
        run = Run.open(resume_dir)
        # A truncated or overwritten newest checkpoint: resume from the newest one that loads (with a warning).
        run.prepare_resume(log)
        ensure_ray()
        check_cluster_fits(run.config)
        check_nodes_see(run.path.parent)
        tracking.set_status(run.tracking_uri, run.run_id, "RUNNING")
        log(f"resuming run {run.name} (MLflow run {run.run_id})")
    else:
        assert config is not None, "run_training needs a config or a resume_dir"
        check_available(config.data.name, config.data.data_dir, config.data.download)
        uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
        tracking.check_server(uri)  # before any work
        check_weights_sources(config)
        root = output_root(config.tracking.output_dir)
        check_storage(root)  # an object store that does not answer, or has no such bucket, before Ray starts
        # Before the MLflow run and the run folder, so a run the cluster cannot fit is refused first; MLflow
        # loads while Ray starts.
        ensure_ray(meanwhile=lambda: tracking.load_modules(uri))
        check_cluster_fits(config)
        check_nodes_see(root)
        run = Run.create(config, extra_tags=extra_tags, parent_run_id=parent_run_id)
        tracking.use_outbox(run.run_id, run.path)
        log(f"run {run.name}: MLflow run {run.run_id} in experiment '{run.config.tracking.experiment}' "
            f"at {tracking.redact_uri(run.tracking_uri)}")
        log(f"run folder {run.path} (continue an interrupted run with: robustune train --resume {run.path})")
    resume = resume_dir is not None
    try:
        if run.config.resources.num_workers > 1:
            execute_with_trainer(run, resume=resume, callbacks=callbacks)
        else:
            execute_as_task(run, resume=resume)
    except KeyboardInterrupt:
        tracking.set_status(run.tracking_uri, run.run_id, "KILLED")
        raise
    except Exception as error:
        tracking.set_status(run.tracking_uri, run.run_id, "FAILED")
        note_outbox(run.path, log)
        raise TrainingError(f"training run {run.name} failed: {root_cause(error)}\n"
                            f"(MLflow run {run.run_id}; continue with: robustune train --resume {run.path})") from error
    if not run.finished:
        tracking.set_status(run.tracking_uri, run.run_id, "FAILED")
        raise TrainingError(f"training run {run.name} ended without its report {run.report_path}")
    note_outbox(run.path, log)
    return TrainingOutcome(run.run_id, run.path, run.tracking_uri, run.report())


def worker_request(run: Run, resume: bool) -> dict[str, Any]:
    """What the worker function needs, as plain data (it travels to Ray processes)."""
    resume_path = latest_checkpoint(run.path) if resume else None
    return {"config": run.config.to_dict(), "run_id": run.run_id, "run_dir": str(run.path),
            "threads": worker_threads(run.config), "resume_path": str(resume_path) if resume_path else None}


def local_device(use_gpu: bool) -> torch.device:
    # Ray hands a process that reserved a GPU exactly that GPU (CUDA_VISIBLE_DEVICES).
    return torch.device("cuda" if use_gpu else "cpu")


def execute_here(run: Run, forward: Callable[[dict[str, Any]], None] | None, resume: bool,
                 log: Callable[[str], None] = write_line) -> None:
    """Run a one-worker run in this process (a Tune trial actor); `forward` receives each epoch's result."""
    run_worker(worker_request(run, resume), LocalSession(run.path, local_device(run.config.resources.use_gpu), forward), log=log)


def run_one_worker(request: dict[str, Any]) -> None:
    """The Ray task of a one-worker `robustune train` (its process title is ray::run_one_worker)."""
    device = local_device(request["config"]["resources"]["use_gpu"])
    run_worker(request, LocalSession(location(request["run_dir"]), device, forward=None))


def execute_as_task(run: Run, resume: bool) -> None:
    """A one-worker run as one Ray task holding its CPUs (and GPU). A task whose process dies is retried,
    resuming from the run folder's newest checkpoint (resources.max_failures times; -1: always)."""
    import ray

    resources = run.config.resources
    task = ray.remote(run_one_worker).options(
        num_cpus=worker_threads(run.config), num_gpus=1 if resources.use_gpu else 0,
        max_retries=resources.max_failures, retry_exceptions=False)
    reference = task.remote(worker_request(run, resume))
    try:
        ray.get(reference)
    except KeyboardInterrupt:
        ray.cancel(reference, force=True)
        raise


def execute_with_trainer(run: Run, resume: bool, callbacks: list | None = None) -> None:
    """A data-parallel run on Ray Train's TorchTrainer (its storage is the run folder's parent)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = run.config.resources
    threads = worker_threads(run.config)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_request(run, resume),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=run.name, **ray_storage(run.path.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=resources.max_failures,
                                                           # a worker group that cannot start in 10 tries of 60 s
                                                           # fails the run instead of waiting forever
                                                           controller_failure_limit=10),
                             callbacks=callbacks),
    )
    trainer.fit()


def note_outbox(run_dir: Location, log: Callable[[str], None]) -> None:
    """Say so when some of the run's tracking records wait in its outbox (the server went away)."""
    queued = tracking.read_outbox(run_dir)
    if queued:
        outbox = tracking.outbox_path(run_dir)
        log(f"warning: the MLflow server did not answer; {len(queued)} tracking records of this run wait in "
            f"{outbox}: send them with `robustune sync {outbox.parent}` once it is back")


def root_cause(error: BaseException) -> str:
    """The innermost error's message (Ray wraps worker errors several times)."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
