"""Free adversarial training (Shafahi et al., NeurIPS 2019, "Adversarial Training for Free!").

Each batch is replayed ``replays`` (m) times. Every replay does ONE forward on x + delta and ONE backward,
which gives both the weight gradient (the optimizer steps through the loop's ``update(loss)``) and the input
gradient, reused for free to ascend the perturbation::

    for each of the m replays:
        loss = CE(f(clip01(x + delta)), y);  update(loss)            # weights step
        delta <- clip_eps(delta + alpha * sign(grad_delta loss))      # from the same backward

delta starts at zero and persists across batches (the "warm start" that makes the attack strong); it is a
buffer shaped like one batch, reset to zero when the batch size changes (e.g. at an epoch's smaller last
batch; the authors' code slices its buffer instead). The input is clipped to [0, 1], so the perturbed input
stays in the eps-ball and the image box.

Cost per batch: m forwards and m backwards (mFmB; each backward also produces the input gradient, which
standard training skips: ~25% more per pass on the small CNN). The learning rate is the loop's, constant
over a batch's replays; the reported training loss is the mean over the replays. To keep the total budget of a standard run the platform
divides the epochs by m: ``epochs_for(E) = ceil(E / m)``, so a 96-epoch-equivalent budget runs 12 epochs at
m=8. Reference recipe (METHODS.md; the Free-AT baseline runs of Wong et al. 2020 and Andriushchenko &
Flammarion 2020 on CIFAR-10): m=8, cyclic lr with maximum 0.04 (a platform setting, not a field:
``--set train.lr=0.04``), SGD momentum 0.9, wd 5e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustune.attacks import clamp_to_ball
from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("free")
@dataclass
class FreeAT(Defense):
    summary = "Free-AT: replay each batch m times, reusing each backward's input gradient to grow delta"
    replays: int = 8  # m (Shafahi et al.: m=8 on CIFAR-10; 4 on ImageNet)
    alpha_ratio: float = 1.0  # delta step in units of epsilon (the paper steps by eps)

    def __post_init__(self) -> None:
        if self.replays < 1:
            raise ValueError(f"replays must be >= 1, got {self.replays}")
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")

    def cost(self) -> Cost:
        return Cost(forward=self.replays, backward=self.replays)

    def epochs_for(self, budget_epochs: int) -> int:
        return math.ceil(budget_epochs / self.replays)

    def setup(self, model, ctx) -> None:
        super().setup(model, ctx)
        self.delta: Tensor | None = None

    def _current_delta(self, x: Tensor) -> Tensor:
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        return self.delta

    def loss(self, model, x, y, idx, step) -> StepResult:
        """One replay's loss on the current delta (no delta update); train_step is what training runs."""
        x_adv = clamp_to_ball(x + self._current_delta(x), x, self.ctx.epsilon)
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)

    def train_step(self, model, x, y, idx, step, update) -> StepResult:
        eps = self.ctx.epsilon
        alpha = self.alpha_ratio * eps
        losses = []
        logits = None
        for _ in range(self.replays):
            delta = self._current_delta(x).detach().requires_grad_(True)
            x_adv = clamp_to_ball(x + delta, x, eps)
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y)
            update(loss)  # zero_grad (model only), backward, gradient averaging, optimizer step
            if delta.grad is None:
                raise RuntimeError("free: update(loss) did not backpropagate to the input perturbation; "
                                   "Free-AT needs the training backward to fill delta.grad")
            with torch.no_grad():
                self.delta = (delta + alpha * delta.grad.sign()).clamp_(-eps, eps)
            losses.append(loss.detach())
        return StepResult(torch.stack(losses).mean(), logits.detach(),
                          {"free_first_replay_loss": losses[0].item()})

    def state_dict(self) -> dict[str, Any]:
        return {} if self.delta is None else {"delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"delta"}:
            raise ValueError(f"free: unexpected state keys {sorted(set(state) - {'delta'})}")
        self.delta = state["delta"].to(self.ctx.device) if "delta" in state else None
