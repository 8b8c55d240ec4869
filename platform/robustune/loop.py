"""The training loop of one worker, in three parts that read alone:

- `TrainingSetup`: data, model, optimizer, defense and schedule for one worker (`build_setup`);
- `TrainingLoop.train_one_epoch`: one epoch with the defense; the learning rate is a pure function of the
  global step, so the schedule resumes exactly, and the random state is reseeded from (seed, epoch, rank),
  so a resumed run draws the same noise as an uninterrupted one;
- `TrainingLoop.validate` + `ModelSelection`: clean and PGD accuracy on the held-out split, the best epoch's
  weights, and the catastrophic-overfitting alarm;
- `epoch_diagnostics` + `diagnosis`: did the defense work at all? Generic checks on every epoch (a model at
  chance, training inputs that give the label away), reported with the overfitting alarm.

The loop knows nothing of Ray or MLflow: the worker function (robustune.worker) runs it on Ray, the
overhead benchmark runs it bare.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from robustune.attacks import pgd
from robustune.checkpoints import CheckpointError, check_weights_fit, model_weights_from
from robustune.config import Config, ConfigError, TrainConfig
from robustune.data import ArrayDataset, BatchLoader, DataSplits, dataset_info, load_dataset
from robustune.defense import Defense, DefenseContext, StepResult, average_gradients, create_defense
from robustune.models import create_model

TRAIN_CLEAN_EXAMPLES = 1000  # fixed training subset for the epoch-end clean accuracy

# Training diagnostics (see `epoch_diagnostics`). A model is collapsed when its clean accuracy is at most
# COLLAPSE_FACTOR x chance: 0.15 on 10 classes. Healthy runs measured above it after their first epoch (Fashion-
# MNIST, eps 0.1, FGSM / FGSM-RS / PGD-AT: val clean 0.22-0.29 on 1000-2000 images, 0.55-0.58 on 5000; the
# synthetic tiny-study trials 0.21 and up), while a model that learned nothing (lr 1e-7) sits at 0.10.
COLLAPSE_FACTOR = 1.5
# Label leak: accuracy on the defense's own training inputs (`train/acc`) exceeds the model's clean accuracy by
# more than this. An adversarial training input is harder than a clean one, so a healthy defense has train/acc
# below clean accuracy; far above it means the inputs carry the label (e.g. a perturbation that encodes it).
LABEL_LEAK_GAP = 0.3
# Run-level diagnostics and the per-epoch 0/1 metric each reads.
DIAGNOSTIC_METRICS = {"collapsed": "diag/collapsed", "label_leak": "diag/label_leak", "overfit": "alarm/overfit"}


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


def annealed_epoch(train: TrainConfig, epochs: int) -> int:
    """The first epoch from whose end on the learning rate stays at most half its peak: the earliest epoch at
    which trials can be ranked fairly. Before it, a model is judged mid-schedule at a high learning rate, where
    a high-learning-rate config looks worst and often ends best (fast-AT's cyclic schedule over 4 epochs: the
    rank correlation with the final validation PGD accuracy was 0.2 after epoch 1 and 0.6-0.8 after epoch 3,
    benchmarks/RESULTS.md). 1 where the rate never falls to half (a constant schedule: no epoch is fairer)."""
    half = train.lr / 2 * (1 + 1e-9)  # exactly half counts, float error aside
    last_high = max((epoch for epoch in range(1, epochs + 1) if learning_rate(train, epoch - 1, epochs) > half),
                    default=0)
    return 1 if last_high == epochs else last_high + 1


def fixed_slice(dataset: ArrayDataset, count: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """The first `count` examples, this rank's share (every world_size-th); the same on every epoch."""
    count = min(count, len(dataset))
    return dataset.images[:count][rank::world_size], dataset.labels[:count][rank::world_size]


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class TrainingSetup:
    splits: DataSplits
    train_loader: BatchLoader
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None where the model is only evaluated
    defense: Defense
    epochs: int
    steps_per_epoch: int


def build_setup(config: Config, rank: int, world_size: int, device: torch.device,
                restoring: bool = False, training: bool = True) -> TrainingSetup:
    """Data (loaded once per process), this worker's batches, the model (identical initial weights on every
    worker; train.init_from loaded), SGD, and the defense set up with the loop's schedule. `restoring`: the
    caller loads a checkpoint's defense state next (DefenseContext.restoring). `training` False: no SGD (its
    optimizer is None), for a model that is only evaluated: a process's first torch optimizer imports
    torch._dynamo, over a second of CPU in every fresh evaluation process."""
    train = config.train
    data = config.data
    splits = load_dataset(data.name, data_dir=data.data_dir, val_size=data.val_size,
                          train_subset=data.train_subset, test_subset=data.test_subset, seed=config.seed,
                          download=data.download)
    info = splits.info
    augment = info.augment if data.augment is None else data.augment
    train_loader = BatchLoader(splits.train, batch_size=max(1, train.batch_size // world_size), shuffle=True,
                               augment=augment, seed=config.seed, rank=rank, world_size=world_size, device=device)
    defense = create_defense(config.method_name, config.method_params)
    epochs = defense.epochs_for(train.epochs)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * epochs

    torch.manual_seed(config.seed)  # identical initial weights on every worker
    model = build_model(config, device)
    if train.init_from:
        load_weights(model, model_weights_from(train.init_from), train.init_from, config.model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay) if training else None
    defense.setup(model, DefenseContext(
        epsilon=config.epsilon, num_classes=info.num_classes, input_shape=info.input_shape,
        num_train_examples=len(splits.train), epochs=epochs, steps_per_epoch=steps_per_epoch, device=device,
        rank=rank, world_size=world_size, seed=config.seed,
        learning_rate=lambda step: learning_rate(train, step, total_steps),
        validation=((splits.val.images.float().div(255), splits.val.labels) if splits.val is not None else None),
        warm_started=bool(train.init_from), restoring=restoring))
    return TrainingSetup(splits, train_loader, model, optimizer, defense, epochs, steps_per_epoch)


def build_model(config: Config, device: torch.device | str = "cpu") -> nn.Module:
    """The run's model, freshly initialized (the seed decides its weights)."""
    info = dataset_info(config.data.name)
    return create_model(config.model_name, num_classes=info.num_classes, input_shape=info.input_shape,
                        mean=info.mean, std=info.std, **config.model_kwargs).to(device)


def load_weights(model: nn.Module, weights: dict[str, Tensor], source: Any, model_name: str) -> None:
    check_weights_fit(weights, model.state_dict(), source, model_name)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {source} does not fit model {model_name!r} "
                              f"({str(error).splitlines()[0]}); was it saved from another model?") from error


# ------------------------------------------------------------------------------------ model selection
@dataclass
class ModelSelection:
    """The best validation epoch by `train.select_metric` (its weights when train.keep_best) and the
    catastrophic-overfitting alarm: the watched metric (validation PGD accuracy by default) falls sharply below
    the best seen so far."""

    train: TrainConfig
    has_validation: bool
    best_epoch: int = 0
    best_score: float = -1.0  # the best epoch's select_metric
    best_alarm_metric: float = float("-inf")
    best_weights: dict[str, Tensor] | None = None
    stop_reason: str = "completed"

    def observe(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Take one validated epoch; returns whether the alarm fired."""
        watched = self.train.overfit_metric
        # Without validation data a val/ metric cannot be watched.
        if watched not in metrics and not (watched.startswith("val/") and not self.has_validation):
            raise ConfigError(f"train.overfit_metric {watched!r} is not a metric of this run; "
                              f"available: {', '.join(sorted(metrics))}")
        alarm = watched in metrics and metrics[watched] < self.best_alarm_metric - self.train.overfit_drop
        self.best_alarm_metric = max(self.best_alarm_metric, metrics.get(watched, float("-inf")))
        score = metrics.get(self.train.select_metric, -1.0)
        if self.has_validation and score > self.best_score:
            self.best_epoch, self.best_score = epoch, score
            if self.train.keep_best:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if alarm and self.train.early_stop_on_overfit:
            self.stop_reason = "overfit"
        return alarm

    @property
    def uses_best_weights(self) -> bool:
        return self.best_weights is not None and (self.train.keep_best or self.stop_reason == "overfit")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.best_epoch, "score": self.best_score, "model": self.best_weights,
                "alarm_metric": self.best_alarm_metric}

    def load_state_dict(self, best: dict[str, Any], stop_reason: str) -> None:
        # "val_pgd_acc": checkpoints written before select_metric existed (always validation PGD then)
        self.best_epoch, self.best_score = best["epoch"], best.get("score", best.get("val_pgd_acc"))
        self.best_weights, self.best_alarm_metric = best["model"], best["alarm_metric"]
        self.stop_reason = stop_reason


# ------------------------------------------------------------------------------------------ diagnostics
def epoch_diagnostics(metrics: dict[str, float], num_classes: int) -> dict[str, float]:
    """The epoch's diagnostics from its validated metrics, as MLflow metrics:

    - `diag/collapsed` (0/1): the clean accuracy (`val/clean_acc`; `train/clean_acc` for a run without
      validation data) is at most COLLAPSE_FACTOR / num_classes: the model is at chance, the defense did not work;
    - `diag/label_leak` (0/1) and `diag/leak_gap`: `train/late_acc` (the accuracy on the defense's training
      inputs, from StepResult.logits, over the epoch's last quarter of batches: close to the end-of-epoch model
      the clean accuracy is measured on) minus the model's clean accuracy, leak when above LABEL_LEAK_GAP. The
      clean accuracy here is the higher of validation and training-set clean accuracy, so a model that simply
      memorized a small training set (clean training images right too) is not taken for a leak."""
    clean = metrics.get("val/clean_acc", metrics["train/clean_acc"])
    reference = max(metrics.get("val/clean_acc", 0.0), metrics["train/clean_acc"])
    gap = metrics["train/late_acc"] - reference
    return {"diag/collapsed": float(clean <= COLLAPSE_FACTOR / num_classes),
            "diag/label_leak": float(gap > LABEL_LEAK_GAP), "diag/leak_gap": gap}


def diagnosis(history: list[dict[str, float]]) -> dict[str, list[int]]:
    """The run's diagnostics so far: for each that fired, its epochs (1-based). `collapsed` counts only when the
    run's latest epoch is at chance (the epochs of that final stretch): a model can sit near chance for an
    epoch while it warms up and then learn. `label_leak` and `overfit` list every epoch they fired at."""
    fired: dict[str, list[int]] = {}
    for name, key in DIAGNOSTIC_METRICS.items():
        epochs = [int(m["epoch"]) for m in history if (m.get(key) or 0.0) > 0]
        if name == "collapsed":
            tail = []
            for m in reversed(history):
                if not (m.get(key) or 0.0) > 0:
                    break
                tail.insert(0, int(m["epoch"]))
            epochs = tail
        if epochs:
            fired[name] = epochs
    return fired


def describe_diagnosis(fired: dict[str, list[int]]) -> str:
    """'collapsed@2-3; label_leak@1,3' (the MLflow tag `diagnostic`, the search results column); '' when none."""
    def epochs(values: list[int]) -> str:
        consecutive = values == list(range(values[0], values[-1] + 1))
        return f"{values[0]}-{values[-1]}" if consecutive and len(values) > 2 else ",".join(map(str, values))

    return "; ".join(f"{name}@{epochs(values)}" for name, values in fired.items())


# ----------------------------------------------------------------------------------------------- loop
class TrainingLoop:
    """Model, optimizer, defense and data for one worker; `run_epoch` trains one epoch and validates it."""

    def __init__(self, config: Config, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", log: Callable[[str], None] = print):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = torch.device(device)
        self.log = log
        setup = build_setup(config, rank, world_size, self.device)
        self.splits, self.train_loader = setup.splits, setup.train_loader
        self.model, self.optimizer, self.defense = setup.model, setup.optimizer, setup.defense
        self.epochs, self.steps_per_epoch = setup.epochs, setup.steps_per_epoch
        self.total_steps = self.steps_per_epoch * self.epochs
        self.info = self.splits.info

        # data.val_size=0 (a refit on training + validation data): no validation, the last epoch is kept.
        self.has_validation = self.splits.val is not None
        if self.has_validation:
            self.val_images, self.val_labels = fixed_slice(self.splits.val, config.validation.examples, rank,
                                                           world_size)
        self.train_images, self.train_labels = fixed_slice(self.splits.train, TRAIN_CLEAN_EXAMPLES, rank, world_size)
        self.selection = ModelSelection(config.train, self.has_validation)

        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.total_seconds = 0.0

    # ------------------------------------------------------------------------------------ weights/state
    def load_model_weights(self, weights: dict[str, Tensor], source: Any) -> None:
        load_weights(self.model, weights, source, self.config.model_name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "defense": self.defense.state_dict(),
            "history": self.history,
            "best": self.selection.state_dict(),
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
        self.selection.load_state_dict(state["best"], state["stop_reason"])
        self.total_seconds = state["total_seconds"]

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
        # The same accuracy over the epoch's last quarter only: what the leak rule compares with the end-of-epoch
        # clean accuracy (a model that collapsed mid-epoch scored well on its early batches, and that is no leak).
        late_correct = torch.zeros((), device=self.device, dtype=torch.float64)
        late_from = (3 * self.steps_per_epoch) // 4
        seen = late_seen = 0
        extra_sums: dict[str, float] = {}
        started = time.perf_counter()
        for batch_index, (x, y, idx) in enumerate(self.train_loader):
            lr = learning_rate(self.config.train, self.global_step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            result: StepResult = self.defense.train_step(self.model, x, y, idx, self.global_step, self._update)
            loss_sum += result.loss.detach().to(torch.float64) * len(y)
            if result.logits is not None:
                hits = (result.logits.detach().argmax(1) == y).sum()
                correct += hits
                if batch_index >= late_from:
                    late_correct += hits
                    late_seen += len(y)
            for key, value in result.metrics.items():
                extra_sums[key] = extra_sums.get(key, 0.0) + float(value) * len(y)
            seen += len(y)
            self.global_step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        keys = sorted(extra_sums)
        totals = self._all_reduce([loss_sum.item(), correct.item(), float(seen), late_correct.item(),
                                   float(late_seen)] + [extra_sums[k] for k in keys])
        metrics = {"train/loss": totals[0] / totals[2], "train/acc": totals[1] / totals[2],
                   "train/late_acc": totals[3] / max(totals[4], 1.0), "train/lr": lr, "time/epoch_s": seconds}
        metrics.update({f"train/{k}": v / totals[2] for k, v in zip(keys, totals[5:])})
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
        """Train and validate one epoch; update the model selection, the alarm and the history."""
        started = time.perf_counter()
        metrics = self.train_one_epoch()
        self._sync_batchnorm_buffers()
        metrics.update({f"train/{k}": v for k, v in self.defense.on_epoch_end(self.model, self.epoch).items()})
        metrics.update(self.validate())
        self.epoch += 1
        metrics["alarm/overfit"] = float(self.selection.observe(self.epoch, metrics, self.model))
        metrics.update(epoch_diagnostics(metrics, self.info.num_classes))
        self.total_seconds += time.perf_counter() - started
        metrics["time/total_s"] = self.total_seconds
        metrics["epoch"] = float(self.epoch)
        self.history.append(metrics)
        return metrics

    # ------------------------------------------------------------------------------------------ result
    @property
    def stop_reason(self) -> str:
        return self.selection.stop_reason

    @property
    def best_epoch(self) -> int:
        return self.selection.best_epoch

    @property
    def best_weights(self) -> dict[str, Tensor] | None:
        return self.selection.best_weights

    @property
    def best_alarm_metric(self) -> float:
        return self.selection.best_alarm_metric

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs or self.stop_reason != "completed"

    @property
    def selected_epoch(self) -> int:
        return self.selection.best_epoch if self.selection.uses_best_weights else self.epoch

    def final_weights(self) -> dict[str, Tensor]:
        """The best validation epoch's weights when keep_best (or early stop) applies, else the last."""
        return self.selection.best_weights if self.selection.uses_best_weights else self.model.state_dict()


def format_epoch(metrics: dict[str, float], epochs: int) -> str:
    validation = (f"val clean {metrics['val/clean_acc']:.3f}  val PGD {metrics['val/pgd_acc']:.3f}"
                  if "val/pgd_acc" in metrics else f"train clean {metrics['train/clean_acc']:.3f} (no validation)")
    line = (f"epoch {int(metrics['epoch'])}/{epochs}  loss {metrics['train/loss']:.4f}  "
            f"train acc {metrics['train/acc']:.3f}  {validation}  "
            f"{metrics['time/epoch_s']:.1f}s (+{metrics['time/val_s']:.1f}s val)")
    warnings = [text for key, text in (("alarm/overfit", "catastrophic overfitting suspected"),
                                       ("diag/collapsed", "model at chance (collapsed)"),
                                       ("diag/label_leak", f"label leak suspected (train acc - clean acc "
                                                           f"{metrics.get('diag/leak_gap', 0.0):+.2f})"))
                if metrics.get(key)]
    return line + "".join(f"  ALARM: {text}" for text in warnings)
