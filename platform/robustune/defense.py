"""The defense interface and registry.

A defense is a dataclass whose fields are its hyperparameters (typed, with the paper's defaults), registered
by name with `@register_defense`. The training loop owns the model, optimizer, schedule, data and device; a
defense owns only its perturbation, its loss and any auxiliary nets, optimizers and per-example buffers. It
sees the loop through hooks: `setup`, `loss` (or `train_step` when it needs several optimizer steps per
batch), `on_epoch_end` and `state_dict`/`load_state_dict` (so a checkpoint restores it). It declares its
cost in forward/backward passes of the target model so benchmarks compare measured time with that floor.
A defense may also contribute `robustune` subcommands of its own (`commands`, see `DefenseCommand`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

from robustune.config import ConfigError, build_dataclass


@dataclass(frozen=True)
class Cost:
    """Forward and backward passes of the target model per training batch (standard training: 1F1B)."""

    forward: float
    backward: float
    # Auxiliary networks the defense also runs per batch, outside this count (their cost relative to the
    # target depends on the target: large next to a small CNN, small next to a ResNet). Not compared.
    auxiliary: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.forward:g}F{self.backward:g}B"

    @property
    def relative_to_standard(self) -> float:
        # A backward pass costs about twice a forward one.
        return (self.forward + 2 * self.backward) / 3


@dataclass
class DefenseContext:
    """What the loop tells a defense at setup."""

    epsilon: float
    num_classes: int
    input_shape: tuple[int, int, int]
    num_train_examples: int  # sample indices run over 0..num_train_examples-1 (per-example buffers)
    epochs: int
    steps_per_epoch: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    learning_rate: Callable[[int], float] | None = None  # the loop's schedule: lr at a global step
    # Held-out validation data (images float in [0, 1] on the CPU, labels int64), carved from the training
    # split, never test: for a defense whose knob is set from data before training (EAE's gamma). None when
    # the run has no validation split.
    validation: tuple[Tensor, Tensor] | None = None
    warm_started: bool = False  # the model starts from train.init_from weights, not from a random init
    # A checkpoint's defense state is loaded right after setup (a trained model loaded for evaluation): skip
    # one-time work before training whose result that state holds (EAE's calibrated gamma).
    restoring: bool = False

    def current_learning_rate(self, step: int) -> float:
        if self.learning_rate is None:
            raise RuntimeError("this DefenseContext was built without the loop's learning-rate schedule")
        return self.learning_rate(step)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average gradients over data-parallel workers; a defense calls it for its own auxiliary nets."""
        average_gradients(parameters, self.world_size)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` in place over workers (e.g. to merge per-example buffers each worker filled for
        its own shard, so every worker and the checkpoint hold the whole buffer). No-op on one worker."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


@dataclass
class StepResult:
    """One training batch: the loss to minimize and the logits of the inputs it was computed on."""

    loss: Tensor
    logits: Tensor | None = None  # for the running training accuracy (on the defense's training inputs)
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-batch numbers, averaged per epoch


@dataclass(frozen=True)
class DefenseCommand:
    """A `robustune <name>` subcommand that belongs to one defense (EAE's gamma calibration, say). The defense
    declares it in its own file (`Defense.commands`) and the CLI registers whatever `defense_commands()`
    lists, so the platform never names a defense and a defense's tool lives next to the defense."""

    name: str
    add_parser: Callable[[Any], Any]  # registers the subparser `name` on an argparse subparsers object
    run: Callable[[argparse.Namespace], int]  # runs it on the parsed arguments; returns the exit status


class Defense:
    """Base class. Subclasses are dataclasses registered with @register_defense(name)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `robustune methods`
    # Names of its own `on_epoch_end` metrics whose first and last epoch the leaderboard shows next to the
    # defense's row (e.g. a learned part's entropy or accuracy: did it learn within the run?).
    progress_metrics: ClassVar[tuple[str, ...]] = ()
    commands: ClassVar[tuple[DefenseCommand, ...]] = ()  # CLI subcommands the defense contributes
    # Training settings (fields of `train`) the defense needs to train at all, used wherever the config does
    # not set them (a config or `--set train.<key>=...` still wins), e.g. ATLD's gradient clipping.
    train_defaults: ClassVar[dict[str, Any]] = {}

    def cost(self) -> Cost:
        raise NotImplementedError

    def setup(self, model: nn.Module, ctx: DefenseContext) -> None:
        """Called once before training (and before a checkpoint's state is loaded)."""
        self.ctx = ctx

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, step: int) -> StepResult:
        raise NotImplementedError

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, step: int,
                   update: Callable[[Tensor], None]) -> StepResult:
        """One batch. `update(loss)` backpropagates, syncs gradients and steps the optimizer; the default
        calls it once on `loss()`. Defenses that replay a batch (Free-AT) override this."""
        result = self.loss(model, x, y, idx, step)
        update(result.loss)
        return result

    def epochs_for(self, budget_epochs: int) -> int:
        """Epochs to run for a budget of `budget_epochs` standard-length epochs (Free-AT replays each batch
        m times, so it runs budget/m epochs)."""
        return budget_epochs

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The model as deployed: a test-time defense (ATLD's IMT) wraps it, and every validation and test
        attack then goes through the wrapper, never around it."""
        return model

    def attack_surrogates(self, model: nn.Module) -> dict[str, nn.Module]:
        """For a test-time defense: models (inputs in [0, 1] -> logits) on which the evaluation crafts extra
        adversarial examples that it then scores on the deployed model (`inference_model`), such as the bare
        classifier (a transfer attack around the test-time step) or a joint model of every part an attacker
        could aim at. A point counts as robust only if it survives every attack, so these can only lower the
        deployed number. Empty for a defense without a test-time step."""
        return {}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Metrics to log for the epoch (names without prefix; logged as train/<name>)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: checkpoints load with weights_only=True."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"defense {self.name!r} keeps no state but the checkpoint holds {sorted(state)}")

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_REGISTRY: dict[str, type[Defense]] = {}


def register_defense(name: str) -> Callable[[type[Defense]], type[Defense]]:
    def decorator(cls: type[Defense]) -> type[Defense]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"defense {name!r}: decorate the class with @dataclass below @register_defense")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"defense {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_methods() -> None:
    importlib.import_module("robustune.methods")


def list_defenses() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def defense_class(name: str) -> type[Defense]:
    _load_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))} "
                          "(`robustune methods` describes them)")
    return _REGISTRY[name]


def defense_commands() -> list[DefenseCommand]:
    """Every registered defense's CLI commands, sorted by name. Two different commands with one name are an
    error (ValueError naming both defenses) rather than one silently hiding the other."""
    owners: dict[str, tuple[DefenseCommand, str]] = {}
    for defense in list_defenses():
        for command in _REGISTRY[defense].commands:
            if command.name in owners and owners[command.name][0] is not command:
                raise ValueError(f"CLI command {command.name!r} is declared by two defenses: "
                                 f"{owners[command.name][1]!r} and {defense!r}")
            owners.setdefault(command.name, (command, defense))
    return [owners[name][0] for name in sorted(owners)]


def create_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """The defense `name` with its fields from `params` (validated: unknown keys and bad values are errors)."""
    return build_dataclass(defense_class(name), params or {}, "method")


def average_gradients(parameters: Iterable[nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of `parameters` as one flat buffer.

    The loop averages gradients itself rather than wrapping the model in DDP: defenses run extra forward
    passes, take input gradients and double-backpropagate (GradAlign), which DDP's reducer does not allow.
    """
    if world_size <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
