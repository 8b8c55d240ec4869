"""L-infinity attacks used by training and evaluation alike.

Every attack works on whole batches on the model's device, keeps the model's train/eval mode as the caller
set it, and returns adversarial inputs inside the epsilon-ball and [0, 1]. `epsilon` and `alpha` may be a
float or a per-example tensor of shape (B,) (LAS-AT draws a radius per image).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossName = Literal["ce", "cw"]


def per_example(value: float | Tensor, like: Tensor) -> float | Tensor:
    """Broadcast a scalar or per-example (B,) value against an image batch (B, C, H, W)."""
    if isinstance(value, Tensor) and value.dim() > 0:
        return value.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return float(value)


def clamp_to_ball(x_adv: Tensor, x: Tensor, epsilon: float | Tensor) -> Tensor:
    """Project into the L-infinity ball of radius epsilon around x, then into the image box [0, 1]."""
    eps = per_example(epsilon, x)
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin, per example: best wrong logit minus the true logit (>0 means misclassified)."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.clone()
    wrong.scatter_(1, y[:, None], float("-inf"))
    return wrong.amax(dim=1) - true_logit


def attack_loss(logits: Tensor, y: Tensor, loss: LossName) -> Tensor:
    """Per-example loss the attacker ascends."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return margin_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}; expected 'ce' or 'cw'")


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: LossName = "ce") -> tuple[Tensor, Tensor]:
    """Gradient of the summed per-example loss w.r.t. the input, and the logits (detached)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(attack_loss(logits, y, loss).sum(), x)
    return grad, logits.detach()


def uniform_start(x: Tensor, epsilon: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x + U(-eps, eps), clipped to [0, 1]."""
    noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1
    return (x + noise * per_example(epsilon, x)).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, epsilon: float | Tensor, *, alpha: float | Tensor | None = None,
         random_start: bool = False, loss: LossName = "ce", generator: torch.Generator | None = None) -> Tensor:
    """One signed-gradient step of `alpha` (default epsilon) from x or from a uniform random start."""
    alpha = epsilon if alpha is None else alpha
    x_start = uniform_start(x, epsilon, generator) if random_start else x.detach()
    grad, _ = input_gradient(model, x_start, y, loss)
    return clamp_to_ball(x_start + per_example(alpha, x) * grad.sign(), x, epsilon).detach()


def pgd(model: nn.Module, x: Tensor, y: Tensor, epsilon: float | Tensor, *, alpha: float | Tensor, steps: int,
        restarts: int = 1, random_start: bool = True, loss: LossName = "ce",
        steps_per_example: Tensor | None = None, generator: torch.Generator | None = None,
        stop_when_all_fooled: bool = False) -> Tensor:
    """Projected gradient ascent under L-infinity (Madry et al.).

    With several restarts, each example keeps the first restart's point that fools the model, else the
    point with the highest loss. `steps_per_example` (B,) stops each example after its own number of steps
    (the loop runs to the batch maximum), which LAS-AT's per-image strategies need. `stop_when_all_fooled`
    ends a restart at the first iterate that fools every example (an attack whose question is whether it
    can fool them all need not take its remaining steps).
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"pgd needs steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    step_size = per_example(alpha, x)
    for _ in range(restarts):
        x_adv = uniform_start(x, epsilon, generator) if random_start else x.clone()
        for step in range(steps):
            grad, logits = input_gradient(model, x_adv, y, loss)
            if stop_when_all_fooled and bool((logits.argmax(1) != y).all()):
                break
            update = step_size * grad.sign()
            if steps_per_example is not None:
                active = (steps_per_example > step).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
                update = update * active
            x_adv = clamp_to_ball(x_adv + update, x, epsilon)
        with torch.no_grad():
            logits = model(x_adv)
            loss_now = attack_loss(logits, y, loss)
            fooled_now = logits.argmax(1) != y
            # Prefer a fooling point; among equals (both fooling or both not), the higher loss.
            take = (fooled_now & ~fooled) | ((fooled_now == fooled) & (loss_now > best_loss))
            best[take] = x_adv[take]
            best_loss = torch.where(take, loss_now, best_loss)
            fooled |= fooled_now
    return best.detach()
