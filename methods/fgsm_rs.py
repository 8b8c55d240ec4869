"""FGSM with a uniform random start (Wong, Rice and Kolter 2020, "Fast is better than free")."""

from dataclasses import dataclass

import torch.nn.functional as F

from robustune.attacks import fgsm
from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("fgsm_rs")
@dataclass
class FGSMRandomStart(Defense):
    summary = "FGSM from a uniform random start in the epsilon-ball, step 1.25 epsilon (fast AT)"
    alpha_ratio: float = 1.25  # step size in units of epsilon; > ~1.5 tends to overfit catastrophically

    def __post_init__(self) -> None:
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")

    def cost(self) -> Cost:
        return Cost(forward=2, backward=2)

    def loss(self, model, x, y, idx, step) -> StepResult:
        eps = self.ctx.epsilon
        x_adv = fgsm(model, x, y, eps, alpha=self.alpha_ratio * eps, random_start=True)
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)
