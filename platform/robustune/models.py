"""Model zoo with a *staged* forward pass.

Every model is a :class:`StagedModel`: ``normalize -> stages (in order) -> head``.
The generic forward in the base class can capture each stage output and add a
latent perturbation after any stage, which is what latent-space defenses such
as SLAT build on. Subclasses only build ``normalize``, ``stages`` and ``head``.

Inputs are always images in [0, 1]; normalization with the dataset mean/std
happens inside the model (as buffers), so attacks work in pixel space.

Usage::

    model = create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28),
                         mean=(0.2860,), std=(0.3530,))
    capture: dict[str, Tensor] = {}
    logits = model(x, latent_perturbations={"conv2": delta}, capture=capture)
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ModelError",
    "UnknownStageError",
    "StagedModel",
    "SmallCNN",
    "PreActResNet18",
    "WideResNet",
    "register_model",
    "list_models",
    "create_model",
    "default_model_for",
]


class ModelError(ValueError):
    """Invalid model name, model argument, input shape or stage name."""


class UnknownStageError(ModelError, KeyError):
    """A ``latent_perturbations`` key is not a stage name (also a KeyError)."""

    # KeyError.__str__ repr-quotes the message; keep the plain message.
    __str__ = Exception.__str__


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True classes/channels is a bug
        raise ModelError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # accepts numpy ints, rejects floats
    except TypeError:
        raise ModelError(f"{what} must be an integer, got {value!r}") from None


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str) or len(input_shape) != 3:
        raise ModelError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    shape = tuple(_as_int(v, "input_shape entries") for v in input_shape)
    if min(shape) < 1:
        raise ModelError(f"input_shape entries must be positive, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _check_stats(values: object, what: str, channels: int) -> list[float]:
    try:
        if isinstance(values, str):
            raise TypeError
        out = [float(v) for v in values]  # lists, tuples, tensors, numpy arrays
    except (TypeError, ValueError):
        raise ModelError(f"{what} must be a sequence of floats, got {values!r}") from None
    if len(out) == 1:
        out = out * channels  # one value for all channels
    if len(out) != channels:
        raise ModelError(f"{what} has {len(out)} values but input_shape has {channels} channels")
    if not all(math.isfinite(v) for v in out):
        raise ModelError(f"{what} must be finite, got {out}")
    return out


def _require_spatial(model: str, input_shape: tuple[int, int, int], hw: tuple[int, int]) -> None:
    if input_shape[1:] != hw:
        raise ModelError(
            f"{model} requires input_shape (C, {hw[0]}, {hw[1]}), got {input_shape}; "
            f"use default_model_for({input_shape}) to pick a compatible model"
        )


# --------------------------------------------------------------------------- #
# Base class
# --------------------------------------------------------------------------- #


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are buffers so they follow .to() and checkpoints."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class StagedModel(nn.Module):
    """Base class: ``head(stages(normalize(x)))`` with per-stage capture and perturbation.

    Subclasses call ``super().__init__`` (which validates the common arguments and
    builds ``self.normalize``) and then set ``self.stages`` (an ``nn.ModuleDict``
    in forward order) and ``self.head``. ``stage_names`` follows ``self.stages``.
    """

    stages: nn.ModuleDict
    head: nn.Module

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        num_classes = _as_int(num_classes, "num_classes")
        if num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        shape = _check_input_shape(input_shape)
        mean_ = _check_stats(mean, "mean", shape[0])
        std_ = _check_stats(std, "std", shape[0])
        if min(std_) <= 0:
            raise ModelError(f"std must be positive, got {std_}")
        self.num_classes: int = num_classes
        self.input_shape: tuple[int, int, int] = shape
        self.normalize = Normalize(mean_, std_)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    def forward(
        self,
        x: Tensor,
        latent_perturbations: dict[str, Tensor] | None = None,
        capture: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Return logits.

        ``capture[name]`` receives each stage output *before* its perturbation is
        added (still in the autograd graph); ``latent_perturbations[name]`` is
        added to that output before it flows into the next stage.
        """
        if latent_perturbations:
            for key in latent_perturbations:
                if key not in self.stages:
                    raise UnknownStageError(
                        f"latent_perturbations key {key!r} is not a stage of "
                        f"{type(self).__name__}; valid stages: {list(self.stages.keys())}"
                    )
        h = self.normalize(x)
        for name, stage in self.stages.items():
            h = stage(h)
            if capture is not None:
                capture[name] = h
            if latent_perturbations and name in latent_perturbations:
                h = h + latent_perturbations[name]  # out of place: keeps the captured tensor intact
        return self.head(h)


# --------------------------------------------------------------------------- #
# small_cnn
# --------------------------------------------------------------------------- #


class SmallCNN(StagedModel):
    """Fast-AT MNIST CNN, widened (default for 28x28 inputs).

    Stages: ``conv1`` (Conv 4x4/2 + ReLU -> 32w x 14 x 14), ``conv2`` (Conv 4x4/2 + ReLU
    -> 64w x 7 x 7), ``fc1`` (Flatten + Linear + ReLU -> 128w). Head: Linear(128w, classes).
    No BatchNorm, so train/eval behave the same and attacks see a fixed function.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std)
        _require_spatial("small_cnn", self.input_shape, (28, 28))
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not width > 0:
            raise ModelError(f"small_cnn width must be a positive number, got {width!r}")
        c1, c2, f1 = (max(1, round(base * width)) for base in (32, 64, 128))
        in_ch = self.input_shape[0]
        self.stages = nn.ModuleDict(
            {
                "conv1": nn.Sequential(nn.Conv2d(in_ch, c1, 4, stride=2, padding=1), nn.ReLU()),
                "conv2": nn.Sequential(nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU()),
                "fc1": nn.Sequential(nn.Flatten(), nn.Linear(c2 * 7 * 7, f1), nn.ReLU()),
            }
        )
        self.head = nn.Linear(f1, self.num_classes)


# --------------------------------------------------------------------------- #
# preact_resnet18 (Wong, Rice & Kolter 2020, "Fast is better than free")
# --------------------------------------------------------------------------- #


class PreActBlock(nn.Module):
    """Pre-activation basic block; the shortcut conv sees the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut  # out of place: x may be a captured stage output


class PreActResNet18(StagedModel):
    """PreAct ResNet-18 of the fast adversarial-training literature (32x32 inputs).

    Stages: ``stem`` (conv3x3, 64), ``layer1`` (64, stride 1), ``layer2`` (128, /2),
    ``layer3`` (256, /2), ``layer4`` (512, /2); each layer is 2 PreActBlocks.
    Head: BN + ReLU + global avg-pool + Linear(512, classes).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std)
        _require_spatial("preact_resnet18", self.input_shape, (32, 32))
        in_ch = self.input_shape[0]
        stages: dict[str, nn.Module] = {"stem": nn.Conv2d(in_ch, 64, 3, stride=1, padding=1, bias=False)}
        in_planes = 64
        for i, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            stages[f"layer{i}"] = nn.Sequential(
                PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)
            )
            in_planes = planes
        self.stages = nn.ModuleDict(stages)
        # The 4x4 final map is pooled to 1x1, as avg_pool2d(out, 4) in the reference code.
        self.head = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(512, self.num_classes),
        )


# --------------------------------------------------------------------------- #
# wide_resnet (Zagoruyko & Komodakis; the variant used in Madry / TRADES code)
# --------------------------------------------------------------------------- #


class WideBasicBlock(nn.Module):
    """WRN basic block. When channels change, the pre-activation is shared by both branches."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # Reference: identity shortcut uses the raw input, projection uses the pre-activation.
        shortcut = x if self.shortcut is None else self.shortcut(act)
        return shortcut + out


class WideResNet(StagedModel):
    """Wide ResNet WRN-depth-width (32x32 inputs).

    Stages: ``stem`` (conv3x3, 16), ``block1`` (16w, stride 1), ``block2`` (32w, /2),
    ``block3`` (64w, /2); each block group has (depth - 4) / 6 basic blocks.
    Head: BN + ReLU + global avg-pool + Linear(64w, classes).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        depth: int = 28,
        width: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std)
        _require_spatial("wide_resnet", self.input_shape, (32, 32))
        depth = _as_int(depth, "wide_resnet depth")
        width = _as_int(width, "wide_resnet width")
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ModelError(f"wide_resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if width < 1:
            raise ModelError(f"wide_resnet width must be >= 1, got {width}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ModelError(f"wide_resnet dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        stages: dict[str, nn.Module] = {
            "stem": nn.Conv2d(self.input_shape[0], channels[0], 3, stride=1, padding=1, bias=False)
        }
        for i, stride in enumerate([1, 2, 2], start=1):
            blocks = [
                WideBasicBlock(channels[i - 1] if j == 0 else channels[i], channels[i], stride if j == 0 else 1, float(dropout))
                for j in range(n)
            ]
            stages[f"block{i}"] = nn.Sequential(*blocks)
        self.stages = nn.ModuleDict(stages)
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels[3]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # 8x8 -> 1x1, as avg_pool2d(out, 8) in the reference code
            nn.Flatten(),
            nn.Linear(channels[3], self.num_classes),
        )
        # Reference initialization (Madry / TRADES WRN).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

_BuilderT = TypeVar("_BuilderT", bound=Callable[..., StagedModel])
_MODEL_REGISTRY: dict[str, Callable[..., StagedModel]] = {}
_REQUIRED_ARGS = ("num_classes", "input_shape", "mean", "std")


def register_model(name: str) -> Callable[[_BuilderT], _BuilderT]:
    """Register a builder ``fn(*, num_classes, input_shape, mean, std, **model_kwargs) -> StagedModel``."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: _BuilderT) -> _BuilderT:
        if name in _MODEL_REGISTRY:
            raise ModelError(f"model {name!r} is already registered")
        _MODEL_REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_MODEL_REGISTRY)


def _model_kwargs(builder: Callable[..., StagedModel]) -> list[str] | None:
    """Names of the optional kwargs a builder accepts; None if it takes **kwargs."""
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.name not in _REQUIRED_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs: object,
) -> StagedModel:
    """Build a registered model; all argument problems raise ModelError."""
    builder = _MODEL_REGISTRY.get(name)
    if builder is None:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    accepted = _model_kwargs(builder)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ModelError(
                f"model {name!r} got unknown argument(s) {unknown}; "
                f"accepted: {accepted if accepted else 'none besides num_classes/input_shape/mean/std'}"
            )
    model = builder(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, **kwargs)
    if not isinstance(model, StagedModel):
        raise ModelError(f"builder for {name!r} returned {type(model).__name__}, expected a StagedModel")
    return model


def check_model_arguments(name: str, kwargs: dict[str, object], *, num_classes: int,
                          input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float]) -> None:
    """Every problem with a model's name and arguments as ModelError, without building its weights: the
    model is constructed on torch's meta device (shapes only, no memory, no initialization cost)."""
    with torch.device("meta"):
        create_model(name, num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, **kwargs)


def default_model_for(input_shape: Sequence[int]) -> str:
    """Default architecture for an input shape (C, H, W); (H, W) is accepted too."""
    if not isinstance(input_shape, Sequence) or len(input_shape) not in (2, 3):
        raise ModelError(f"input_shape must be (C, H, W), got {input_shape!r}")
    hw = tuple(_as_int(v, "input_shape entries") for v in input_shape[-2:])
    if hw == (28, 28):
        return "small_cnn"
    if hw == (32, 32):
        return "preact_resnet18"
    raise ModelError(f"no default model for input_shape {tuple(input_shape)}; supported: 28x28 (small_cnn), 32x32 (preact_resnet18)")


@register_model("small_cnn")
def small_cnn(
    *, num_classes: int, input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float], width: float = 1
) -> StagedModel:
    return SmallCNN(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, width=width)


@register_model("preact_resnet18")
def preact_resnet18(
    *, num_classes: int, input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float]
) -> StagedModel:
    return PreActResNet18(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std)


@register_model("wide_resnet")
def wide_resnet(
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
) -> StagedModel:
    return WideResNet(
        num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, depth=depth, width=width, dropout=dropout
    )


@register_model("wrn_28_10")
def wrn_28_10(
    *, num_classes: int, input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float], dropout: float = 0.0
) -> StagedModel:
    return WideResNet(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, depth=28, width=10, dropout=dropout)


@register_model("wrn_34_10")
def wrn_34_10(
    *, num_classes: int, input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float], dropout: float = 0.0
) -> StagedModel:
    return WideResNet(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, depth=34, width=10, dropout=dropout)
