"""FGSM adversarial training from a zero start (Goodfellow et al.); known to overfit catastrophically."""

from dataclasses import dataclass

import torch.nn.functional as F

from robustune.attacks import fgsm
from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("fgsm")
@dataclass
class FGSM(Defense):
    summary = "one signed-gradient step of size alpha from the clean input"
    alpha_ratio: float = 1.0  # step size in units of epsilon

    def __post_init__(self) -> None:
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")

    def cost(self) -> Cost:
        return Cost(forward=2, backward=2)

    def loss(self, model, x, y, idx, step) -> StepResult:
        eps = self.ctx.epsilon
        x_adv = fgsm(model, x, y, eps, alpha=self.alpha_ratio * eps, random_start=False)
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)
