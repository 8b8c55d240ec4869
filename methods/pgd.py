"""PGD adversarial training (Madry et al. 2018): K projected steps from a random start."""

from dataclasses import dataclass

import torch.nn.functional as F

from robustune.attacks import pgd
from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("pgd")
@dataclass
class PGD(Defense):
    summary = "K-step PGD from a random start (Madry); the strong, expensive baseline"
    steps: int = 10
    alpha_ratio: float = 0.25  # step size in units of epsilon (2/255 at 8/255)
    epsilon_ratio: float = 1.0  # training radius in units of the threat model's epsilon (LAS-AT's epsilon_train)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")
        if not 0 < self.epsilon_ratio:
            raise ValueError(f"epsilon_ratio must be > 0, got {self.epsilon_ratio}")

    def cost(self) -> Cost:
        return Cost(forward=self.steps + 1, backward=self.steps + 1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        eps = self.ctx.epsilon
        train_eps = min(1.0, self.epsilon_ratio * eps)
        x_adv = pgd(model, x, y, train_eps, alpha=self.alpha_ratio * eps, steps=self.steps)
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)
