"""Standard training: cross-entropy on clean inputs. The cost every other defense is measured against."""

from dataclasses import dataclass

import torch.nn.functional as F

from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("standard")
@dataclass
class Standard(Defense):
    summary = "cross-entropy on clean inputs (no defense; the cost and accuracy reference)"
    # The reference for clean accuracy keeps its most accurate epoch. Selected on validation PGD (the rule for a
    # defense), a short run kept an undertrained early epoch: in the default study 0.44 and 0.35 clean accuracy
    # with 0.27 "robust" AutoAttack accuracy, where its last epochs reach ~0.75 clean. Its validation PGD
    # accuracy falls as it trains, as it should, so the overfitting alarm watches clean accuracy too.
    train_defaults = {"select_metric": "val/clean_acc", "overfit_metric": "val/clean_acc"}

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits = model(x)
        return StepResult(F.cross_entropy(logits, y), logits)
