"""EAE: adversarial training with endogenous adversarial examples in logit space (Qian et al.,
"Towards Speeding up Adversarial Training in Latent Spaces"; paper: eae-latent-space-at.txt).

No input gradient at all. Per training example, from the logits z of the clean input: the class c (the
label, see `top_class`), the runner-up s = argmax_{j != c} z_j and their logit difference LD = z_c - z_s.
Where LD < gamma the logits are moved onto the decision boundary by the closed-form minimum-L2 step of the
paper's Eq. 7: z_c -= LD/2, z_s += LD/2, every other logit unchanged (the two classes tie exactly). The move is
a perturbation, so it is a constant for backpropagation (like an input-space adversarial example); the loss
is cross-entropy with the true label on the moved logits. Examples with LD >= gamma keep plain CE. Cost: the
one forward and one backward of standard training (1F1B), which is the whole point of the method.

Examples the model gets wrong (`top_class`): the paper assumes the top class is the label (Sec. 3.2,
"Assume that the ground-truth class y is consistent with the predicted class") while its Algorithm 1 takes
the largest and second-largest logits whatever the label is. Its optimization problem (Eq. 1/3) asks for the
minimum-norm Delta such that z_y + Delta_y < max_{j != y} z_j + Delta_j; for a misclassified example that
constraint already holds at Delta = 0 (the lambda = 0 branch of its KKT conditions, Eq. 6), so the minimum-
norm endogenous example IS the clean logit vector. Default `top_class="label"` follows that: c = label,
only correctly classified examples with 0 <= LD < gamma are moved, misclassified ones train on plain CE.
`top_class="predicted"` is Algorithm 1 taken literally: c = argmax z, the top two logits are tied whenever
their gap is below gamma, whatever the label, and CE still uses the label. The two agree on every correctly
classified example.

Picking gamma: the paper's rule is the mean LD ("MLD") of the *seed examples*: correctly classified
examples that FGSM at the target epsilon fools on the pretrained model. `robustune calibrate-eae
--checkpoint runs/<run>/final.pt` measures it on the validation split (`robustune.calibrate`). Reported MLDs:
3.63 (eps=0.01) to 5.98 (eps=0.05) on CIFAR-10/ResNet-18, 1.86 to 5.17 on ImageNet-100/AlexNet; thumb rule
gamma in [2, 4]; a larger gamma costs clean accuracy (~6 points over the range) for < 1.6 points robustness.
Default gamma = 3.63, the value of the paper's main CIFAR-10 experiment (Sec. 6.4).

Warm start: the paper fine-tunes a pretrained model (4 epochs, cyclic lr 0 -> 0.2 -> 0 on CIFAR-10). Train
one first, then start EAE from its weights with the platform's `train.init_from`:

    robustune train standard --set train.epochs=10
    robustune calibrate-eae --checkpoint runs/<standard run>/final.pt          # prints a suggested gamma
    robustune train eae --set train.init_from=runs/<standard run>/final.pt --set method.gamma=<gamma> \\
        --set train.epochs=4 --set train.lr=0.2

The paper reports robustness under transfer (black-box) attacks only; the platform's white-box PGD and
AutoAttack numbers are the honest answer to how much it actually buys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from robustune.defense import Cost, Defense, StepResult, register_defense

TOP_CLASS_CHOICES = ("label", "predicted")


def endogenous_logits(logits: Tensor, labels: Tensor, gamma: float,
                      top_class: Literal["label", "predicted"] = "label") -> tuple[Tensor, Tensor, Tensor]:
    """The paper's Eq. 7 applied per example: (moved logits, moved mask (B,), LD (B,)).

    The moved logits equal `logits` except that, for examples with LD < gamma (and LD >= 0 when
    `top_class="label"`), the class and the runner-up both sit exactly at their midpoint. The move is a
    constant for autograd: the gradient w.r.t. `logits` is the CE gradient evaluated at the moved point.
    """
    z = logits.detach()
    if top_class == "label":
        top = labels
    elif top_class == "predicted":
        top = z.argmax(dim=1)
    else:
        raise ValueError(f"top_class must be one of {TOP_CLASS_CHOICES}, got {top_class!r}")
    top_logit = z.gather(1, top[:, None]).squeeze(1)
    others = z.scatter(1, top[:, None], float("-inf"))
    runner_logit, runner = others.max(dim=1)
    ld = top_logit - runner_logit
    moved = ld < gamma
    if top_class == "label":
        moved &= ld >= 0  # misclassified: the constraint of Eq. 1 already holds, minimum-norm Delta = 0
    mid = (top_logit + runner_logit) / 2
    rows = torch.arange(z.shape[0], device=z.device)
    target = z.clone()
    target[rows, top] = mid
    target[rows, runner] = mid
    changed = torch.zeros_like(z, dtype=torch.bool)
    changed[rows, top] = moved
    changed[rows, runner] = moved
    # Forward value exactly `target` where moved (mid + 0), gradient the identity everywhere.
    return torch.where(changed, target + (logits - z), logits), moved, ld


@register_defense("eae")
@dataclass
class EAE(Defense):
    summary = "logit-space examples: tie the top two logits where their gap < gamma; no input gradient"
    gamma: float = 3.63  # LD threshold; paper's CIFAR-10 run (MLD of FGSM seed examples at eps 0.01); thumb rule 2-4
    top_class: Literal["label", "predicted"] = "label"  # see the module docstring: misclassified examples

    def __post_init__(self) -> None:
        if not self.gamma >= 0:  # also rejects NaN
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.top_class not in TOP_CLASS_CHOICES:
            raise ValueError(f"top_class must be one of {TOP_CLASS_CHOICES}, got {self.top_class!r}")

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits = model(x)
        moved_logits, moved, ld = endogenous_logits(logits, y, self.gamma, self.top_class)
        metrics = {"eae_fraction": moved.float().mean().item()}  # share of the batch moved to the boundary
        return StepResult(F.cross_entropy(moved_logits, y), logits, metrics)
