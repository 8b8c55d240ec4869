"""ATLD: adversarial training with latent distribution (Qian, Zhang, Huang et al.; code: LitterQ/ATLD-pytorch).

A discriminator D reads the classifier's logits and outputs 1 + K numbers: a natural-vs-perturbed logit
(sigmoid = probability that the logits come from a natural input) and K class logits. Per batch:
1. Latent-manifold example (LMAE), no labels: from x (or, as in the authors' code, from a uniform random
   start in the eps-ball) take one signed step of `step_ratio * eps` that DEcreases D's loss on the perturbed
   side, BCE(D0(f(x')), 0), i.e. makes f(x') look more "perturbed" (maximizes the latent divergence, Eq. 7);
   projected to the eps-ball and [0, 1].
2. D trains `discriminator_steps` times (authors: 2, SGD lr 1e-3, momentum 0.9, weight decay 2e-4) on the
   detached natural and perturbed logits: BCE(natural = 1) + BCE(perturbed = 0) + soft CE of the class head on
   both, against label-smoothed targets.
3. The classifier minimizes soft CE(f(x_adv), y_ls) + w * MSE(f(x_adv), f(x).detach()). In the authors' code
   w = scale / 2 with scale = max(grad_x CE) / max(grad_x MSE) at x_adv (a constant, no gradient through it);
   here w = consistency_weight * scale with consistency_weight = 0.5 (`consistency="grad_ratio"`). We take the
   largest absolute gradient entry (the code's signed max is the same whenever the largest entry is
   positive, which on image batches is practically always) and set the scale to 0 when the MSE gradient is 0.
   `consistency="fixed"` uses w = consistency_weight and skips the two extra input-gradient passes.
Label smoothing follows the authors' formula: 1 - ls on the label, ls / (K - 1) elsewhere (ls = 0.5).

IMT (inference with manifold transformation) is a test-time defense: `inference_model` wraps the classifier
and D in `ManifoldTransformedModel`, whose forward takes one signed step of `imt_step_ratio * eps` that raises
D's natural score (lowers its "perturbed" score), halved when D's natural probability is in (0.3, 0.7)
(`imt_plus`, ATLD+, as in the authors' evaluation code), then classifies. Validation and the final report
attack that whole pipeline (the report also gives the bare classifier).

Cost (target model, per batch): 3F4B with `grad_ratio` (natural forward; LMAE forward + input backward;
x_adv forward; two input-gradient backwards for the scale; the parameter backward), 3F2B with `fixed`. D (an MLP
on K logits, auxiliary) is not counted. IMT adds 1F1B (input gradient) to every inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustune.attacks import clamp_to_ball, uniform_start
from robustune.losses import smoothed_targets, soft_cross_entropy
from robustune.defense import Cost, Defense, DefenseContext, StepResult, register_defense

IMT_UNCERTAIN = (0.3, 0.7)  # ATLD+: D's natural probability strictly inside this range halves the IMT step
D_MOMENTUM, D_WEIGHT_DECAY = 0.9, 2e-4  # the authors' discriminator SGD (with lr 1e-3)


class LatentDiscriminator(nn.Module):
    """MLP on the classifier's logits: output[:, 0] natural-vs-perturbed logit (natural = 1), output[:, 1:]
    class logits. (The authors use a WRN-28-5 body on the K logits viewed as a K x 1 x 1 image; an MLP is the
    same function class for a 1x1 input without the BatchNorm.)"""

    def __init__(self, num_classes: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.head = nn.Linear(hidden, 1 + num_classes)

    def forward(self, logits: Tensor) -> Tensor:
        return self.head(self.body(logits))


class ManifoldTransformedModel(nn.Module):
    """IMT: x -> classifier(x - step * sign(grad_x BCE(D0(f(x)), natural))), clipped to the eps-ball and [0, 1].

    Differentiable end to end. The step's direction sign(g(x)) is piecewise constant in x (its derivative is
    0 almost everywhere) and so is the ATLD+ halving mask, so the exact gradient of the pipeline w.r.t. x is
    the classifier's gradient at the transformed point passed through the clipping; the transformed point is
    therefore built from `x` itself with the sign treated as a constant (no create_graph needed; the same as
    BPDA-identity on the step, which here is exact). Works under torch.no_grad() (it enables gradients
    locally for the input gradient of D) and in eval mode. Deterministic.
    """

    def __init__(self, model: nn.Module, discriminator: nn.Module, *, epsilon: float, step: float,
                 halve_uncertain: bool):
        super().__init__()
        self.model = model
        self.discriminator = discriminator
        self.epsilon, self.step, self.halve_uncertain = epsilon, step, halve_uncertain

    def transform(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            natural_logit = self.discriminator(self.model(probe))[:, 0]
            loss = F.binary_cross_entropy_with_logits(natural_logit, torch.ones_like(natural_logit), reduction="sum")
            (grad,) = torch.autograd.grad(loss, probe)
        step = torch.full((len(x),), self.step, device=x.device, dtype=x.dtype)
        if self.halve_uncertain:
            p = torch.sigmoid(natural_logit.detach())
            step = torch.where((p > IMT_UNCERTAIN[0]) & (p < IMT_UNCERTAIN[1]), step / 2, step)
        return clamp_to_ball(x - step.view(-1, *([1] * (x.dim() - 1))) * grad.sign(), x, self.epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.transform(x))


@register_defense("atld")
@dataclass
class ATLD(Defense):
    """ATLD training (label-free latent-manifold examples against a logit discriminator D, auxiliary with its
    own SGD optimizer, not counted in the cost) and IMT at inference."""

    summary = "ATLD: label-free latent-manifold examples vs a logit discriminator, IMT at test time (Qian et al.)"
    step_ratio: float = 1.0  # LMAE step in units of eps (code: step = eps, one step)
    random_start: bool = True  # LMAE from x + U(-eps, eps) as in the authors' code; False: from x
    label_smoothing: float = 0.5  # code's ls_factor (paper: "label smoothing rate 0.5")
    discriminator_steps: int = 2  # D updates per batch (code)
    discriminator_lr: float = 1e-3  # D's SGD learning rate (code; momentum 0.9, weight decay 2e-4)
    discriminator_hidden: int = 128  # width of D's MLP
    consistency: Literal["grad_ratio", "fixed"] = "grad_ratio"  # MSE weight: code's gradient ratio, or constant
    consistency_weight: float = 0.5  # code: scale / 2 -> 0.5 (with "fixed": the MSE weight itself)
    imt: bool = True  # inference with manifold transformation (test-time defense)
    imt_plus: bool = True  # ATLD+: halve the IMT step when D's score is in (0.3, 0.7) (authors' eval code)
    imt_step_ratio: float = 1.0  # IMT step in units of eps (code: 4 x 2/255 = 8/255 = eps)

    def __post_init__(self) -> None:
        if self.step_ratio <= 0:
            raise ValueError(f"step_ratio must be > 0, got {self.step_ratio}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.discriminator_steps < 1:
            raise ValueError(f"discriminator_steps must be >= 1, got {self.discriminator_steps}")
        if self.discriminator_lr <= 0:
            raise ValueError(f"discriminator_lr must be > 0, got {self.discriminator_lr}")
        if self.discriminator_hidden < 1:
            raise ValueError(f"discriminator_hidden must be >= 1, got {self.discriminator_hidden}")
        if self.consistency not in ("grad_ratio", "fixed"):
            raise ValueError(f"consistency must be 'grad_ratio' or 'fixed', got {self.consistency!r}")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight}")
        if not 0.0 <= self.imt_step_ratio <= 1.0:
            raise ValueError(f"imt_step_ratio must be in [0, 1] (the step stays in the eps-ball), "
                             f"got {self.imt_step_ratio}")

    def cost(self) -> Cost:
        return Cost(forward=3, backward=4 if self.consistency == "grad_ratio" else 2)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, ctx: DefenseContext) -> None:
        super().setup(model, ctx)
        if ctx.num_classes < 2:
            raise ValueError(f"atld needs at least 2 classes, got {ctx.num_classes}")
        with torch.random.fork_rng(devices=[]):  # same D on every worker, independent of the global stream
            torch.manual_seed(ctx.seed + 0xA71D)
            self.discriminator = LatentDiscriminator(ctx.num_classes, self.discriminator_hidden).to(ctx.device)
        self.discriminator_optimizer = torch.optim.SGD(self.discriminator.parameters(), lr=self.discriminator_lr,
                                                       momentum=D_MOMENTUM, weight_decay=D_WEIGHT_DECAY)

    # ---------------------------------------------------------------------------------------- pieces
    def latent_manifold_example(self, model: nn.Module, x: Tensor) -> Tensor:
        """One signed step that makes D see f(x') as more "perturbed"; no labels involved."""
        eps = self.ctx.epsilon
        start = uniform_start(x, eps) if self.random_start else x.detach().clone()
        with torch.enable_grad():
            start.requires_grad_(True)
            perturbed_logit = self.discriminator(model(start))[:, 0]
            loss = F.binary_cross_entropy_with_logits(perturbed_logit, torch.zeros_like(perturbed_logit))
            (grad,) = torch.autograd.grad(loss, start)  # touches neither the model's nor D's .grad
        return clamp_to_ball(start.detach() - self.step_ratio * eps * grad.sign(), x, eps).detach()

    def discriminator_loss(self, natural_logits: Tensor, perturbed_logits: Tensor,
                           targets: Tensor) -> tuple[Tensor, Tensor]:
        """D's loss (BCE natural=1 / perturbed=0 + soft CE of the class head on both) and its accuracy."""
        out_nat, out_adv = self.discriminator(natural_logits), self.discriminator(perturbed_logits)
        loss = (F.binary_cross_entropy_with_logits(out_nat[:, 0], torch.ones_like(out_nat[:, 0]))
                + F.binary_cross_entropy_with_logits(out_adv[:, 0], torch.zeros_like(out_adv[:, 0]))
                + soft_cross_entropy(out_nat[:, 1:], targets) + soft_cross_entropy(out_adv[:, 1:], targets))
        accuracy = torch.cat([out_nat[:, 0] > 0, out_adv[:, 0] < 0]).float().mean()
        return loss, accuracy.detach()

    def train_discriminator(self, natural_logits: Tensor, perturbed_logits: Tensor,
                            targets: Tensor) -> tuple[float, float]:
        """`discriminator_steps` SGD steps of D on detached logits; returns the last step's loss and accuracy."""
        natural_logits, perturbed_logits = natural_logits.detach(), perturbed_logits.detach()
        for _ in range(self.discriminator_steps):
            loss, accuracy = self.discriminator_loss(natural_logits, perturbed_logits, targets)
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.ctx.average_gradients(self.discriminator.parameters())
            self.discriminator_optimizer.step()
        return loss.item(), accuracy.item()

    def classifier_loss(self, x_adv: Tensor, logits: Tensor, natural_logits: Tensor,
                        targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Soft CE on the LMAE logits + w * MSE to the natural logits; returns (loss, w, mse).
        With `grad_ratio`, `x_adv` must be the tensor `logits` was computed from, requiring grad."""
        ce = soft_cross_entropy(logits, targets)
        mse = F.mse_loss(logits, natural_logits.detach())
        weight = torch.tensor(self.consistency_weight, device=logits.device)
        if self.consistency == "grad_ratio":
            (g_ce,) = torch.autograd.grad(ce, x_adv, retain_graph=True)
            (g_mse,) = torch.autograd.grad(mse, x_adv, retain_graph=True)
            top_ce, top_mse = g_ce.abs().max(), g_mse.abs().max()
            scale = torch.where(top_mse > 0, top_ce / top_mse.clamp_min(1e-30), torch.zeros_like(top_ce))
            weight = weight * scale
        return ce + weight * mse, weight, mse.detach()

    # ---------------------------------------------------------------------------------------- training
    def train_step(self, model, x, y, idx, step, update) -> StepResult:
        targets = smoothed_targets(y, self.ctx.num_classes, self.label_smoothing)
        with torch.no_grad():
            natural_logits = model(x)
        x_adv = self.latent_manifold_example(model, x)
        x_adv.requires_grad_(self.consistency == "grad_ratio")
        logits = model(x_adv)
        d_loss, d_accuracy = self.train_discriminator(natural_logits, logits, targets)
        loss, weight, mse = self.classifier_loss(x_adv, logits, natural_logits, targets)
        update(loss)
        return StepResult(loss.detach(), logits.detach(), {
            "atld_d_loss": d_loss, "atld_d_acc": d_accuracy,
            "atld_consistency_weight": weight.item(), "atld_mse": mse.item(),
        })

    def inference_model(self, model: nn.Module) -> nn.Module:
        if not self.imt:
            return model
        return ManifoldTransformedModel(model, self.discriminator, epsilon=self.ctx.epsilon,
                                        step=self.imt_step_ratio * self.ctx.epsilon, halve_uncertain=self.imt_plus)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(),
                "discriminator_optimizer": self.discriminator_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
