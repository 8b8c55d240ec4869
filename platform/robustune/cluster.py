"""Ray helpers: connecting to (or starting) Ray, whether a run fits the cluster, and CPU shares.

Nothing here knows about runs, searches or studies; everything that places work on Ray asks these helpers.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from robustune.config import Config, ConfigError

ALLOW_PENDING_ENV = "ROBUSTUNE_ALLOW_PENDING_RESOURCES"
# Ray Train's controller polls its workers every 2 s by default, so `fit()` returns up to 2 s after the
# training function ended. A multi-worker run polls more often (propagated to the controller by Ray Train).
TRAIN_HEALTH_CHECK_S = "0.2"


# Whether Ray passes its workers' output (and its own warnings) on to this driver: on for `robustune train`,
# whose run prints its epochs from a Ray task; a study or search prints its own progress and turns it off
# unless --verbose (`show_worker_output`).
_worker_output = True


def show_worker_output(show: bool) -> None:
    global _worker_output
    _worker_output = show


def ensure_ray(meanwhile: Callable[[], object] | None = None) -> None:
    """Connect to $RAY_ADDRESS, or start a local Ray (token authentication stays as Ray sets it: on). A local
    Ray starts without its dashboard (seconds of start-up nobody looks at); RAY_INCLUDE_DASHBOARD=1 keeps it.

    `meanwhile` runs in a thread while Ray starts, which is mostly waiting for Ray's processes: the caller
    imports MLflow there (seconds of CPU). It has ended when this returns; an error it raised is dropped, for
    the caller's own next use of MLflow to raise."""
    import ray

    if ray.is_initialized():
        return
    side = threading.Thread(target=_ignoring_errors, args=(meanwhile,), daemon=True) if meanwhile else None
    if side is not None:
        side.start()
    try:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_HEALTH_CHECK_S)
        address = os.environ.get("RAY_ADDRESS")
        options = {} if address else {"include_dashboard": os.environ.get("RAY_INCLUDE_DASHBOARD") == "1"}
        ray.init(address=address, logging_level="WARNING" if _worker_output else "ERROR",
                 log_to_driver=_worker_output, **options)
    finally:
        if side is not None:
            side.join()  # the caller's own use of MLflow comes next


def _ignoring_errors(work: Callable[[], object]) -> None:
    try:
        work()
    except Exception:  # noqa: BLE001 - see ensure_ray
        pass


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def worker_threads(config: Config) -> int:
    """Torch threads (and Ray CPUs) of one worker: resources.cpus_per_worker, else this machine's CPUs shared
    among the run's workers."""
    if config.resources.cpus_per_worker:
        return config.resources.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // config.resources.num_workers)


def share_cpus(config: Config, runs: int | None) -> int:
    """Runs at once (`runs`, else what the CPUs fit) and, when unset, CPUs per worker so that many fit.
    Fills in config.resources.cpus_per_worker; returns the number of runs at once."""
    cpus, workers = cluster_cpus(), config.resources.num_workers
    if runs is None:
        runs = max(1, cpus // (workers * (config.resources.cpus_per_worker or 1)))
    if config.resources.cpus_per_worker is None:
        config.resources.cpus_per_worker = max(1, cpus // (runs * workers))
    return runs


def check_cluster_fits(config: Config) -> None:
    """ConfigError when the connected Ray cluster can never place the run's workers (more workers, CPUs per
    worker or GPUs than its nodes have), instead of a run that waits for them forever. An autoscaling
    cluster can still add nodes: set ROBUSTUNE_ALLOW_PENDING_RESOURCES=1 to submit anyway."""
    import ray

    if os.environ.get(ALLOW_PENDING_ENV) == "1":
        return
    resources = config.resources
    need = {"CPU": worker_threads(config), **({"GPU": 1} if resources.use_gpu else {})}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = sum(min(int(node.get(key, 0) // amount) for key, amount in need.items()) for node in nodes)
    if fits >= resources.num_workers:
        return
    have = ", ".join(f"{sum(node.get(key, 0) for node in nodes):g} {key}s" for key in need)
    wants = " and ".join(f"{amount} {key}{'s' if amount != 1 else ''}" for key, amount in need.items())
    fix = ("set resources.use_gpu=false or connect to a cluster with GPUs (RAY_ADDRESS)"
           if resources.use_gpu and not any(node.get("GPU", 0) for node in nodes) else
           "lower resources.num_workers or resources.cpus_per_worker, or connect to a bigger cluster (RAY_ADDRESS)")
    workers = f"{resources.num_workers} worker{'s' if resources.num_workers != 1 else ''}"
    raise ConfigError(f"resources: {workers} with {wants} each cannot fit the Ray cluster "
                      f"({len(nodes)} node{'s' if len(nodes) != 1 else ''}, {have}; room for {fits} such "
                      f"worker{'s' if fits != 1 else ''}); {fix}. On an autoscaling cluster that will add nodes, "
                      f"set {ALLOW_PENDING_ENV}=1 to submit anyway")


def run_resources(config: Config) -> dict[str, float]:
    """What the Ray process that runs a one-worker run reserves: its CPUs, and a GPU when it uses one. A
    multi-worker run's process only waits on its Ray Train workers (which hold the CPUs and GPUs): a token
    memory request keeps it schedulable without taking a share the workers need."""
    if config.resources.num_workers > 1:
        return {"CPU": 0, "memory": 64 * 1024 * 1024}
    return {"CPU": worker_threads(config), **({"GPU": 1} if config.resources.use_gpu else {})}
