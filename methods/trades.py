"""TRADES (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and Accuracy").

Loss::

    CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x'))     (KL summed over classes, averaged over the batch)

x' maximizes the same KL: ``steps`` signed-gradient steps of ``alpha_ratio`` * eps from x + init_std * N(0, 1),
each projected into the eps-ball and [0, 1]. No labels are used by the attack. The authors' CIFAR-10 setting
is eps 0.031, step 0.007 (alpha_ratio = 0.007 / 0.031), 10 steps, beta 6 (their published WRN numbers; beta 1
trades robustness for clean accuracy). As in their code the gradient of the KL flows through both f(x) and
f(x') in the training loss.

Deviation: the authors switch the model to eval mode while crafting x'; here, as for every platform attack,
the attack runs in the model's current mode (the same for models without BatchNorm/dropout). The clean
logits used as the attack's target are those of the training forward (computed once, detached for the
attack), where the authors recompute them at every attack step.

Cost (target model, per batch): the clean training forward (1F, its detached softmax is the attack target),
``steps`` attack steps (steps F + steps B), the forward on x' (1F) and the training backward through both the
clean and the adversarial forward graphs (2B): (steps+2)F (steps+2)B, 12F12B at the default 10 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustune.attacks import clamp_to_ball
from robustune.defense import Cost, Defense, StepResult, register_defense


def kl_to_clean(logits_clean: Tensor, logits_adv: Tensor, reduction: str = "batchmean") -> Tensor:
    """KL(softmax(clean) || softmax(adv)); 'batchmean' = summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1),
                    reduction=reduction, log_target=True)


@register_defense("trades")
@dataclass
class TRADES(Defense):
    summary = "TRADES: clean CE + beta * KL(f(x) || f(x')) with x' from PGD on the KL"
    beta: float = 6.0  # robustness weight (authors: 6 for the published CIFAR-10 WRN numbers)
    steps: int = 10  # PGD steps on the KL (authors: 10)
    alpha_ratio: float = 0.007 / 0.031  # step in units of epsilon (authors: 0.007 at eps 0.031)
    init_std: float = 0.001  # std of the Gaussian start, absolute pixel units (authors: 0.001 * N(0, 1))

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")

    def cost(self) -> Cost:
        return Cost(forward=self.steps + 2, backward=self.steps + 2)

    def adversarial(self, model: nn.Module, x: Tensor, logits_clean: Tensor) -> Tensor:
        """x' maximizing KL(softmax(logits_clean) || softmax f(x')) in the eps-ball and [0, 1]."""
        eps = self.ctx.epsilon
        alpha = self.alpha_ratio * eps
        target = logits_clean.detach()
        x = x.detach()
        x_adv = clamp_to_ball(x + self.init_std * torch.randn_like(x), x, eps)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = kl_to_clean(target, model(x_adv), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = clamp_to_ball(x_adv.detach() + alpha * grad.sign(), x, eps)
        return x_adv.detach()

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits_clean = model(x)
        x_adv = self.adversarial(model, x, logits_clean)
        logits_adv = model(x_adv)
        natural = F.cross_entropy(logits_clean, y)
        robust = kl_to_clean(logits_clean, logits_adv)
        return StepResult(natural + self.beta * robust, logits_adv,
                          {"trades_natural": natural.item(), "trades_kl": robust.item()})
