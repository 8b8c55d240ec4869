"""Standard training: cross-entropy on clean inputs. The cost every other defense is measured against."""

from dataclasses import dataclass

import torch.nn.functional as F

from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("standard")
@dataclass
class Standard(Defense):
    summary = "cross-entropy on clean inputs (no defense; the cost and accuracy reference)"

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits = model(x)
        return StepResult(F.cross_entropy(logits, y), logits)
