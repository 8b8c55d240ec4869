"""Training: one loop (`TrainingLoop`) run by each Ray Train worker, and the driver (`run_training`).

The loop is the same code with and without Ray (the overhead benchmark runs it bare). Per epoch: train with
the defense, average BatchNorm buffers across workers, validate on the held-out split (clean and PGD),
raise the catastrophic-overfitting alarm, checkpoint (model, optimizer, schedule position, defense state,
best weights, metric history), then log to MLflow from rank 0. The learning rate is a pure function of the
global step, so the schedule resumes exactly; the random state is reseeded from (seed, epoch, rank) at the
start of each epoch, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import Tensor, nn

from robustune.attacks import pgd
from robustune.checkpoints import (STATE_FILE, CheckpointError, CheckpointWriteError, check_weights_fit,
                                   disk_full_cause, latest_checkpoint, load_checkpoint, model_weights_from,
                                   save_checkpoint, set_aside_unreadable_checkpoints, write_failure_message)
from robustune.config import Config, ConfigError, TrainConfig, resolve_config
from robustune.data import ArrayDataset, BatchLoader, check_available, load_dataset
from robustune.defense import DefenseContext, StepResult, average_gradients, create_defense
from robustune.models import create_model

RUN_FILE = "run.json"  # in the run folder: MLflow run id and tracking URI, for --resume
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"
FINAL_MODEL_FILE = "final.pt"
TRAIN_CLEAN_EXAMPLES = 1000  # fixed training subset for the epoch-end clean accuracy


class TrainingError(RuntimeError):
    """Training could not complete; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite: the run fails cleanly (a search marks the trial failed)."""


def learning_rate(train: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate for 0-based global `step`, stepped every iteration."""
    t = (step + 1) / total_steps
    if train.schedule == "cyclic":  # triangle 0 -> lr -> 0, peaking at lr_peak_fraction (fast AT)
        p = train.lr_peak_fraction
        return train.lr * (t / p if t <= p else max(0.0, (1 - t) / (1 - p)))
    if train.schedule == "multistep":
        return train.lr * train.lr_decay ** sum(t > m for m in train.milestones)
    if train.schedule == "cosine":
        return train.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return train.lr


def fixed_slice(dataset: ArrayDataset, count: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """The first `count` examples, this rank's share (every world_size-th); the same on every epoch."""
    count = min(count, len(dataset))
    return dataset.images[:count][rank::world_size], dataset.labels[:count][rank::world_size]


@dataclass
class EpochRecord:
    epoch: int  # 1-based: the number of completed epochs
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingLoop:
    """Model, optimizer, defense and data for one worker; `run_epoch` trains one epoch and validates it."""

    def __init__(self, config: Config, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", log: Callable[[str], None] = print):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = torch.device(device)
        self.log = log
        train = config.train

        self.splits = load_dataset(config.data.name, data_dir=config.data.data_dir, val_size=config.data.val_size,
                                   train_subset=config.data.train_subset, test_subset=config.data.test_subset,
                                   seed=config.seed, download=config.data.download)
        self.info = self.splits.info
        augment = self.info.augment if config.data.augment is None else config.data.augment
        self.train_loader = BatchLoader(self.splits.train, batch_size=max(1, train.batch_size // world_size),
                                        shuffle=True, augment=augment, seed=config.seed, rank=rank,
                                        world_size=world_size, device=self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.defense = create_defense(config.method_name, config.method_params)
        self.epochs = self.defense.epochs_for(train.epochs)
        self.total_steps = self.steps_per_epoch * self.epochs

        torch.manual_seed(config.seed)  # identical initial weights on every worker
        self.model = create_model(config.model_name, num_classes=self.info.num_classes,
                                  input_shape=self.info.input_shape, mean=self.info.mean, std=self.info.std,
                                  **config.model_kwargs).to(self.device)
        if train.init_from:
            self.load_model_weights(model_weights_from(train.init_from), train.init_from)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=train.lr, momentum=train.momentum,
                                         weight_decay=train.weight_decay)
        self.defense.setup(self.model, DefenseContext(
            epsilon=config.epsilon, num_classes=self.info.num_classes, input_shape=self.info.input_shape,
            num_train_examples=len(self.splits.train), epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            device=self.device, rank=rank, world_size=world_size, seed=config.seed,
            learning_rate=lambda step: learning_rate(train, step, self.total_steps)))

        # data.val_size=0 (a refit on training + validation data): no validation, the last epoch is kept.
        self.has_validation = self.splits.val is not None
        if self.has_validation:
            self.val_images, self.val_labels = fixed_slice(self.splits.val, config.validation.examples, rank,
                                                           world_size)
        self.train_images, self.train_labels = fixed_slice(self.splits.train, TRAIN_CLEAN_EXAMPLES, rank, world_size)

        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0
        self.best_val_pgd = -1.0  # model selection: best validation PGD accuracy
        self.best_alarm_metric = float("-inf")
        self.best_weights: dict[str, Tensor] | None = None
        self.total_seconds = 0.0
        self.stop_reason = "completed"

    # ------------------------------------------------------------------------------------ weights/state
    def load_model_weights(self, weights: dict[str, Tensor], source: Any) -> None:
        check_weights_fit(weights, self.model.state_dict(), source, self.config.model_name)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:
            raise CheckpointError(f"checkpoint {source} does not fit model {self.config.model_name!r} "
                                  f"({str(error).splitlines()[0]}); was it saved from another model?") from error

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "defense": self.defense.state_dict(),
            "history": self.history,
            "best": {"epoch": self.best_epoch, "val_pgd_acc": self.best_val_pgd, "model": self.best_weights,
                     "alarm_metric": self.best_alarm_metric},
            "total_seconds": self.total_seconds,
            "stop_reason": self.stop_reason,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], source: Any) -> None:
        self.load_model_weights(state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.defense.load_state_dict(state["defense"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])
        self.best_epoch, self.best_val_pgd = state["best"]["epoch"], state["best"]["val_pgd_acc"]
        self.best_weights = state["best"]["model"]
        self.best_alarm_metric = state["best"]["alarm_metric"]
        self.total_seconds = state["total_seconds"]
        self.stop_reason = state["stop_reason"]

    # ------------------------------------------------------------------------------------------ epochs
    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world_size <= 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def _update(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {self.epoch + 1}, step {self.global_step} "
                f"(method {self.config.method_name}); lower train.lr or check the method's settings")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model.parameters(), self.world_size)
        if self.config.train.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()

    def train_one_epoch(self) -> dict[str, float]:
        """Train for one epoch; returns the epoch's training metrics (loss, accuracy, seconds)."""
        self.model.train()
        epoch = self.epoch
        # Reseed per (seed, epoch, rank): a resumed run draws the same random starts as an uninterrupted one.
        torch.manual_seed(self.config.seed * 1_000_003 + epoch * 1009 + self.rank)
        self.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        seen = 0
        extra_sums: dict[str, float] = {}
        started = time.perf_counter()
        for x, y, idx in self.train_loader:
            lr = learning_rate(self.config.train, self.global_step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            result: StepResult = self.defense.train_step(self.model, x, y, idx, self.global_step, self._update)
            loss_sum += result.loss.detach().to(torch.float64) * len(y)
            if result.logits is not None:
                correct += (result.logits.detach().argmax(1) == y).sum()
            for key, value in result.metrics.items():
                extra_sums[key] = extra_sums.get(key, 0.0) + float(value) * len(y)
            seen += len(y)
            self.global_step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        keys = sorted(extra_sums)
        totals = self._all_reduce([loss_sum.item(), correct.item(), float(seen)] + [extra_sums[k] for k in keys])
        metrics = {"train/loss": totals[0] / totals[2], "train/acc": totals[1] / totals[2],
                   "train/lr": lr, "time/epoch_s": seconds}
        metrics.update({f"train/{k}": v / totals[2] for k, v in zip(keys, totals[3:])})
        return metrics

    def _sync_batchnorm_buffers(self) -> None:
        # Workers see different batches; average running statistics so every worker evaluates the same model.
        if self.world_size <= 1:
            return
        for buffer in self.model.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer)
                buffer /= self.world_size

    def _count_correct(self, images: Tensor, labels: Tensor, attack: bool) -> tuple[float, float]:
        """(correct, total) over a fixed slice, clean or under the validation PGD (through the deployed
        model, so a test-time defense is attacked as a whole)."""
        model = self.defense.inference_model(self.model)
        correct, batch_size = 0, self.config.eval.batch_size
        eps = self.config.epsilon
        validation = self.config.validation
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(self.device).float().div_(255)
            y = labels[start:start + batch_size].to(self.device)
            if attack:
                x = pgd(model, x, y, eps, alpha=validation.pgd_alpha_ratio * eps, steps=validation.pgd_steps)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
        return float(correct), float(len(labels))

    def validate(self) -> dict[str, float]:
        self.model.eval()
        started = time.perf_counter()
        # Fixed generator state so validation noise does not depend on training progress.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 7919 + self.rank)
            counts = [*self._count_correct(self.train_images, self.train_labels, attack=False)]
            if self.has_validation:
                counts += [*self._count_correct(self.val_images, self.val_labels, attack=False),
                           *self._count_correct(self.val_images, self.val_labels, attack=True)]
        c = self._all_reduce(counts)
        metrics = {"train/clean_acc": c[0] / c[1], "time/val_s": time.perf_counter() - started}
        if self.has_validation:
            metrics.update({"val/clean_acc": c[2] / c[3], "val/pgd_acc": c[4] / c[5]})
        return metrics

    def run_epoch(self) -> dict[str, float]:
        """Train and validate one epoch; update best weights, the alarm and the history."""
        started = time.perf_counter()
        metrics = self.train_one_epoch()
        self._sync_batchnorm_buffers()
        metrics.update({f"train/{k}": v for k, v in self.defense.on_epoch_end(self.model, self.epoch).items()})
        metrics.update(self.validate())
        self.epoch += 1
        # Catastrophic overfitting: the watched metric (validation PGD accuracy by default) falls sharply
        # below the best seen so far. Without validation data a val/ metric cannot be watched.
        watched = self.config.train.overfit_metric
        if watched not in metrics and not (watched.startswith("val/") and not self.has_validation):
            raise ConfigError(f"train.overfit_metric {watched!r} is not a metric of this run; "
                              f"available: {', '.join(sorted(metrics))}")
        alarm = watched in metrics and metrics[watched] < self.best_alarm_metric - self.config.train.overfit_drop
        self.best_alarm_metric = max(self.best_alarm_metric, metrics.get(watched, float("-inf")))
        metrics["alarm/overfit"] = float(alarm)
        val_pgd = metrics.get("val/pgd_acc", -1.0)
        if self.has_validation and val_pgd > self.best_val_pgd:
            self.best_epoch, self.best_val_pgd = self.epoch, val_pgd
            if self.config.train.keep_best:
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.total_seconds += time.perf_counter() - started
        metrics["time/total_s"] = self.total_seconds
        metrics["epoch"] = float(self.epoch)
        self.history.append(metrics)
        if alarm and self.config.train.early_stop_on_overfit:
            self.stop_reason = "overfit"
        return metrics

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs or self.stop_reason != "completed"

    @property
    def uses_best_weights(self) -> bool:
        return self.best_weights is not None and (self.config.train.keep_best or self.stop_reason == "overfit")

    @property
    def selected_epoch(self) -> int:
        return self.best_epoch if self.uses_best_weights else self.epoch

    def final_weights(self) -> dict[str, Tensor]:
        """The best validation epoch's weights when keep_best (or early stop) applies, else the last."""
        return self.best_weights if self.uses_best_weights else self.model.state_dict()


def format_epoch(metrics: dict[str, float], epochs: int) -> str:
    validation = (f"val clean {metrics['val/clean_acc']:.3f}  val PGD {metrics['val/pgd_acc']:.3f}"
                  if "val/pgd_acc" in metrics else f"train clean {metrics['train/clean_acc']:.3f} (no validation)")
    line = (f"epoch {int(metrics['epoch'])}/{epochs}  loss {metrics['train/loss']:.4f}  "
            f"train acc {metrics['train/acc']:.3f}  {validation}  "
            f"{metrics['time/epoch_s']:.1f}s (+{metrics['time/val_s']:.1f}s val)")
    return line + ("  ALARM: catastrophic overfitting suspected" if metrics["alarm/overfit"] else "")


# ------------------------------------------------------------------------------------------------ worker
def quiet_ray_train_reports() -> None:
    """Ray Train logs every report (all metrics) at INFO from a logger named after its file; that drowns
    the one progress line per epoch."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: the lines stay, nothing else changes
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def write_line(text: str) -> None:
    # Not print(): Ray Train patches print in workers and the driver would show every line twice.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    import ray.train

    from robustune import tracking
    from robustune.evaluation import format_report

    config = resolve_config(loop_config["config"])
    quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    if config.resources.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    is_chief = rank == 0
    log = write_line if is_chief else (lambda text: None)
    uri, run_id, run_dir = config.tracking.tracking_uri, loop_config["run_id"], Path(loop_config["run_dir"])
    tracking.use_outbox(run_id, run_dir)  # a tracking server gone mid-run: records wait in the run folder

    loop = TrainingLoop(config, rank=rank, world_size=world_size, device=device, log=log)
    if world_size > 1:  # same start on every worker even if a custom init draws differently
        for tensor in loop.model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    state, source = newest_state(ray.train.get_checkpoint(), loop_config.get("resume_path"), device, warn=log,
                                 run_dir=run_dir)
    if state is not None:
        loop.load_state_dict(state, source)
        log(f"resumed from {source} after epoch {loop.epoch}")
        if is_chief:  # epochs checkpointed before an interruption but never logged reach MLflow now
            log_new_epochs(uri, run_id, loop.history)
        if loop.finished and loop.history:
            # Interrupted after its last epoch: report it again so a listener (a Tune trial) sees the result.
            ray.train.report(loop.history[-1])

    while not loop.finished:
        metrics = loop.run_epoch()
        log(format_epoch(metrics, loop.epochs))
        if is_chief:
            report_with_checkpoint(loop.state_dict(), metrics, run_dir, f"epoch_{loop.epoch:03d}")
            log_new_epochs(uri, run_id, [metrics])
        else:
            ray.train.report(metrics)

    if not is_chief:
        return
    if loop.stop_reason == "overfit":
        log(f"early stop at epoch {loop.epoch}: overfitting alarm; keeping epoch {loop.best_epoch}'s weights")
    loop.model.load_state_dict(loop.final_weights())
    summary = {"epochs_run": loop.epoch, "selected_epoch": loop.selected_epoch, "stop_reason": loop.stop_reason,
               "train_seconds": loop.total_seconds}
    tracking.set_tag(uri, run_id, "stop_reason", loop.stop_reason)
    tracking.set_tag(uri, run_id, "selected_epoch", str(loop.selected_epoch))
    final = {"model": loop.model.state_dict(), "defense": loop.defense.state_dict(),
             "config": tracking.public_config(config)}  # final.pt is logged to MLflow: no URI password
    if not config.eval.enabled:
        save_checkpoint(final, run_dir / FINAL_MODEL_FILE)  # for a later `robustune evaluate` or a study
        (run_dir / REPORT_FILE).write_text(json.dumps({"evaluated": False, **summary}, indent=2))
        return
    # Inside a Train worker the evaluation runs here, unsharded (the worker holds the CPUs shards would need).
    eval_config = dataclasses.replace(config.eval, workers=1)
    report = evaluate_deployed(loop.model, loop.defense, loop.splits.test, epsilon=config.epsilon,
                               eval_config=eval_config, device=device, seed=config.seed, state_dir=run_dir, log=log)
    report.update({"evaluated": True, **summary})
    log(format_report(report))
    save_checkpoint({**final, "report": report}, run_dir / FINAL_MODEL_FILE)
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    tracking.log_evaluation(uri, run_id, report, step=loop.epoch)
    tracking.log_file(uri, run_id, run_dir / FINAL_MODEL_FILE, "checkpoint")


def evaluate_deployed(model, defense, test, *, epsilon: float, eval_config, device, seed: int, state_dir: Path,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate what the defense deploys (its test-time step included); then the bare classifier if they differ."""
    from robustune.evaluation import evaluate

    test_images = test.images.float().div(255)
    deployed = defense.inference_model(model)
    report = evaluate(deployed, test_images, test.labels, epsilon=epsilon, config=eval_config, device=device,
                      seed=seed, state_dir=state_dir, log=log)
    if deployed is not model:
        # A test-time defense: the numbers above attacked the whole pipeline; the bare classifier's follow.
        report["attacked_through"] = (f"{type(deployed).__name__}: the defense's test-time step is part of the "
                                      "model every attack saw")
        log("evaluating the bare classifier (without the test-time step)")
        report["bare_classifier"] = evaluate(model, test_images, test.labels, epsilon=epsilon, config=eval_config,
                                             device=device, seed=seed, state_dir=Path(state_dir) / "bare", log=log)
    return report


def report_with_checkpoint(state: dict[str, Any], metrics: dict[str, float], run_dir: Path, name: str) -> None:
    """Report an epoch to Ray Train with its checkpoint, which Ray copies to RUN_DIR/<name>. When the disk is
    full (here in the local temporary folder, or in the run folder during Ray's copy), the run fails with a
    message naming the file, and no partial checkpoint file stays behind to be resumed from."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(state, Path(folder) / STATE_FILE)
        try:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        except Exception as error:
            full = disk_full_cause(error)
            if full is None:
                raise
            # Ray's copy stopped half-way: remove the partial file. The folder goes too when nothing else is in
            # it (it can hold a state.pt.unreadable, and Ray's run snapshot may refer to it: then it stays).
            (run_dir / name / STATE_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (run_dir / name).rmdir()
            raise CheckpointWriteError(write_failure_message(run_dir / name / STATE_FILE, full)) from error


def newest_state(ray_checkpoint, resume_path: str | None, device: torch.device,
                 warn: Callable[[str], None] = write_line, run_dir: Path | None = None) -> tuple[dict | None, Any]:
    """The newest checkpoint that loads among Ray Train's restored checkpoint (after a worker failure, or a rerun
    of the same run), the folder named by --resume, and the run folder's own epoch_NNN folders.

    Ray's record lags the last report by up to one poll of its controller: a worker killed just after reporting
    epoch N comes back with epoch N-1's record while epoch N's folder is on disk, and resuming from the record
    would train epoch N again. (Every rank scans the same folder: Ray Train's storage is shared by all nodes,
    and nothing writes to it while the worker group starts.) A checkpoint that does not load (cut short by a
    kill during the copy, or set aside by --resume as unreadable) is skipped with a warning."""
    candidates = []
    if ray_checkpoint is not None:
        try:
            with ray_checkpoint.as_directory() as folder:
                candidates.append((load_checkpoint(Path(folder) / STATE_FILE, map_location=device),
                                   ray_checkpoint.path))
        except (CheckpointError, OSError) as error:
            warn(f"warning: not resuming from Ray Train's checkpoint record {ray_checkpoint.path}: {error}")
    paths = [Path(resume_path)] if resume_path else []
    if run_dir is not None:
        paths += sorted((p for p in run_dir.glob("epoch_*") if (p / STATE_FILE).is_file()), reverse=True)
    seen = {str(ray_checkpoint.path) if ray_checkpoint is not None else None}
    for path in paths:
        if str(path) in seen:
            continue
        seen.add(str(path))
        try:
            candidates.append((load_checkpoint(path, map_location=device), path))
        except CheckpointError as error:
            warn(f"warning: not resuming from {path}: {error}")
    if not candidates:
        return None, None
    return max(candidates, key=lambda pair: pair[0]["epoch"])


def log_new_epochs(uri: str, run_id: str, records: list[dict[str, float]]) -> None:
    """Log epochs MLflow does not have yet: a rerun after a crash never logs an epoch twice."""
    from robustune import tracking

    logged = tracking.logged_steps(uri, run_id, "epoch")
    for record in records:
        if int(record["epoch"]) not in logged:
            tracking.log_metrics(uri, run_id, record, step=int(record["epoch"]))


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class TrainingOutcome:
    run_id: str
    run_dir: Path
    tracking_uri: str
    report: dict[str, Any]


def ensure_ray() -> None:
    """Connect to $RAY_ADDRESS, or start a local Ray (token authentication stays as Ray sets it: on)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")


ALLOW_PENDING_ENV = "ROBUSTUNE_ALLOW_PENDING_RESOURCES"


def check_cluster_fits(config: Config) -> None:
    """ConfigError when the connected Ray cluster can never place the run's workers (more workers, CPUs per
    worker or GPUs than its nodes have), instead of a trainer that waits for them forever. An autoscaling
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


def check_weights_sources(config: Config, run_dir: Path | None = None) -> None:
    """Before any work: the warm-start weights (train.init_from) and, for a resume, the run's newest checkpoint
    must load safely and fit the configured model (CheckpointError naming the file and the keys otherwise)."""
    from robustune.data import dataset_info

    sources = [config.train.init_from] if config.train.init_from else []
    newest = latest_checkpoint(run_dir) if run_dir is not None else None
    if newest is not None:
        sources.append(newest / STATE_FILE)
    if not sources:
        return
    info = dataset_info(config.data.name)
    expected = create_model(config.model_name, num_classes=info.num_classes, input_shape=info.input_shape,
                            mean=info.mean, std=info.std, **config.model_kwargs).state_dict()
    for source in sources:
        check_weights_fit(model_weights_from(source), expected, source, config.model_name)


def worker_threads(config: Config) -> int:
    if config.resources.cpus_per_worker:
        return config.resources.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // config.resources.num_workers)


def new_run_name(config: Config) -> str:
    return f"{config.method_name}-{config.data.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def prepare_run(config: Config, extra_tags: dict[str, str] | None = None,
                parent_run_id: str | None = None) -> tuple[Config, str, Path]:
    """Fix the places (absolute tracking URI and output folder), create the MLflow run and the run folder."""
    from robustune import tracking

    config.tracking.tracking_uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    config.tracking.output_dir = str(Path(config.tracking.output_dir).resolve())
    run_name = config.tracking.run_name or new_run_name(config)
    run_dir = Path(config.tracking.output_dir) / run_name
    if run_dir.exists():
        raise ConfigError(f"run folder {run_dir} already exists; choose another tracking.run_name, "
                          f"or continue it with --resume {run_dir}")
    config.tracking.run_name = run_name
    run_id = tracking.create_run(config, run_name, extra_tags=extra_tags, parent_run_id=parent_run_id)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": config.tracking.tracking_uri,
                                                "run_name": run_name}))
    return config, run_id, run_dir


def open_run(run_dir: str | Path) -> tuple[Config, str, Path]:
    """The config and MLflow run of an existing run folder (for --resume)."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / RUN_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--resume {run_dir}: not a robustune run folder (no {RUN_FILE} / {CONFIG_FILE}); "
                          "pass the folder `robustune train` printed at its start")
    config = resolve_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    return config, run_id, run_dir


def run_training(config: Config | None = None, *, resume_dir: str | Path | None = None,
                 log: Callable[[str], None] = print, extra_tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, callbacks: list | None = None) -> TrainingOutcome:
    """Train `config` (or continue the run in `resume_dir`) on Ray Train, evaluate, and track it in MLflow."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from robustune import tracking

    if resume_dir is not None:
        config, run_id, run_dir = open_run(resume_dir)
        # A truncated or overwritten newest checkpoint: resume from the newest one that loads (with a warning).
        set_aside_unreadable_checkpoints(run_dir, log)
        check_weights_sources(config, run_dir)
        tracking.check_server(config.tracking.tracking_uri)
        tracking.use_outbox(run_id, run_dir)
        if tracking.read_outbox(run_dir):  # records kept while the server was away go first
            log(f"sent {tracking.replay_outbox(run_dir)} MLflow records queued in {run_dir / tracking.OUTBOX_FILE}")
        ensure_ray()
        check_cluster_fits(config)
        tracking.set_status(config.tracking.tracking_uri, run_id, "RUNNING")
        log(f"resuming run {run_dir.name} (MLflow run {run_id})")
    else:
        assert config is not None, "run_training needs a config or a resume_dir"
        check_available(config.data.name, config.data.data_dir, config.data.download)
        tracking.check_server(tracking.resolve_tracking_uri(config.tracking.tracking_uri))  # before any work
        check_weights_sources(config)
        ensure_ray()  # before the MLflow run and the run folder: a run the cluster cannot fit is refused first
        check_cluster_fits(config)
        config, run_id, run_dir = prepare_run(config, extra_tags, parent_run_id)
        tracking.use_outbox(run_id, run_dir)
        log(f"run {run_dir.name}: MLflow run {run_id} in experiment '{config.tracking.experiment}' "
            f"at {tracking.redact_uri(config.tracking.tracking_uri)}")
        log(f"run folder {run_dir} (continue an interrupted run with: robustune train --resume {run_dir})")
    uri = config.tracking.tracking_uri

    ensure_ray()
    resources = config.resources
    threads = worker_threads(config)
    resume_path = latest_checkpoint(run_dir) if resume_dir is not None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "run_id": run_id, "run_dir": str(run_dir), "threads": threads,
                           "resume_path": str(resume_path) if resume_path else None},
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=resources.max_failures,
                                                           # a worker group that cannot start in 10 tries of 60 s
                                                           # fails the run instead of waiting forever
                                                           controller_failure_limit=10),
                             callbacks=callbacks),
    )
    try:
        trainer.fit()
    except KeyboardInterrupt:
        tracking.set_status(uri, run_id, "KILLED")
        raise
    except Exception as error:
        tracking.set_status(uri, run_id, "FAILED")
        note_outbox(run_dir, log)
        raise TrainingError(f"training run {run_dir.name} failed: {root_cause(error)}\n"
                            f"(MLflow run {run_id}; continue with: robustune train --resume {run_dir})") from error
    report_path = run_dir / REPORT_FILE
    if not report_path.is_file():
        tracking.set_status(uri, run_id, "FAILED")
        raise TrainingError(f"training run {run_dir.name} ended without its evaluation report {report_path}")
    tracking.set_status(uri, run_id, "FINISHED")
    note_outbox(run_dir, log)
    return TrainingOutcome(run_id, run_dir, uri, json.loads(report_path.read_text()))


def note_outbox(run_dir: Path, log: Callable[[str], None]) -> None:
    """Say so when some of the run's tracking records wait in its outbox (the server went away)."""
    from robustune import tracking

    queued = tracking.read_outbox(run_dir)
    if queued:
        log(f"warning: the MLflow server did not answer; {len(queued)} tracking records of this run wait in "
            f"{run_dir / tracking.OUTBOX_FILE}: send them with `robustune sync {run_dir}` once it is back")


def root_cause(error: BaseException) -> str:
    """The innermost error's message (Ray wraps worker errors several times)."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
