"""FGSM + GradAlign (Andriushchenko & Flammarion, NeurIPS 2020, "Understanding and Improving Fast
Adversarial Training").

Training examples come from one FGSM step of ``alpha_ratio`` * eps (1.25 eps as in FGSM-RS) from the clean
input (``random_start=False``, the authors' ``--attack_init=zero`` for GradAlign) or from a uniform random
start. The loss adds the gradient-alignment regularizer::

    CE(f(x + delta), y) + lambda_ * (1 - mean_i cos(grad_x CE(x_i), grad_x CE(x_i + eta_i))),  eta ~ U(-eps, eps)

computed as in the authors' code: the clean input gradient is a constant (no backprop through it), the
gradient at the noisy point is taken with ``create_graph=True`` so the training backward differentiates
through it (double backprop); examples where either gradient is exactly zero are left out of the mean.
x + eta is kept in [0, 1] (the authors' code does not clip this point).

lambda_ scales with eps. The authors' table (log-linear, lambda(eps) = 0.02 * 10^(eps*255/8), CIFAR-10):

    eps*255:  1     2     3     4     5     6     7     8     9     10    11    12    13    14    15    16
    lambda:  .027  .036  .047  .063  .084  .112  .150  .200  .267  .356  .474  .632  .843  1.124 1.500 2.000

The default 0.2 is their eps=8/255 value; at other radii set ``method.lambda_`` from the table (the search
space covers the range). Recipe: 30 epochs, cyclic lr peaking at 0.3 at 2/5 of training, batch 128.

Cost (target model, per batch), counted honestly:
- FGSM input gradient: 1F 1B. With a zero start this gradient IS grad_x CE(x), so the regularizer reuses it
  (the authors compute it a second time).
- input gradient at x + eta with create_graph: 1F 1B.
- training forward on x + delta: 1F.
- training backward: 1B through the training forward plus the double backward through the noisy gradient's
  graph, which traverses that backward graph and its forward graph again (~2B).
Total 3F5B with ``random_start=False``; 4F6B with ``random_start=True`` (the clean gradient is then a
separate 1F1B); 2F2B with ``lambda_=0`` (plain FGSM/FGSM-RS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustune.attacks import clamp_to_ball, input_gradient, uniform_start
from robustune.defense import Cost, Defense, StepResult, register_defense


def grad_align_regularizer(model: nn.Module, x: Tensor, y: Tensor, epsilon: float,
                           grad_clean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(1 - mean cosine between the clean input gradient and the one at a uniform point of the eps-ball,
    differentiable w.r.t. the model's parameters; that mean cosine, detached)."""
    if grad_clean is None:
        grad_clean, _ = input_gradient(model, x, y)
    x_noisy = uniform_start(x.detach(), epsilon).requires_grad_(True)
    noisy_loss = F.cross_entropy(model(x_noisy), y, reduction="sum")
    (grad_noisy,) = torch.autograd.grad(noisy_loss, x_noisy, create_graph=True)
    g1, g2 = grad_clean.detach().flatten(1), grad_noisy.flatten(1)
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    valid = (n1 > 0) & (n2 > 0)
    if not bool(valid.any()):
        zero = grad_noisy.sum() * 0.0  # keeps the graph so the caller's backward stays uniform
        return zero, torch.ones((), device=x.device)
    cos = (g1[valid] * g2[valid]).sum(dim=1) / (n1[valid] * n2[valid])
    mean_cos = cos.mean()
    return 1.0 - mean_cos, mean_cos.detach()


@register_defense("fgsm_ga")
@dataclass
class FGSMGradAlign(Defense):
    summary = "FGSM (1.25 eps step) plus GradAlign: lambda * (1 - cos) of input gradients at x and x + noise"
    alpha_ratio: float = 1.25  # FGSM step in units of epsilon (authors' --fgsm_alpha 1.25)
    random_start: bool = False  # authors' GradAlign runs use --attack_init=zero
    lambda_: float = 0.2  # regularizer weight at eps=8/255; scale with eps by the table in the docstring

    def __post_init__(self) -> None:
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")
        if self.lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {self.lambda_}")

    def cost(self) -> Cost:
        if self.lambda_ == 0:
            return Cost(forward=2, backward=2)
        return Cost(forward=4, backward=6) if self.random_start else Cost(forward=3, backward=5)

    def loss(self, model, x, y, idx, step) -> StepResult:
        eps = self.ctx.epsilon
        x_start = uniform_start(x, eps) if self.random_start else x.detach()
        grad_start, _ = input_gradient(model, x_start, y)
        x_adv = clamp_to_ball(x_start + self.alpha_ratio * eps * grad_start.sign(), x, eps).detach()
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y)
        if self.lambda_ == 0:
            return StepResult(ce, logits)
        reg, mean_cos = grad_align_regularizer(model, x, y, eps,
                                               grad_clean=None if self.random_start else grad_start)
        return StepResult(ce + self.lambda_ * reg, logits,
                          {"grad_align_cos": mean_cos.item(), "grad_align_reg": reg.item()})
