"""SLAT: single-step latent adversarial training (Park & Lee, "Reliably fast adversarial training via latent
adversarial perturbation"; paper: slat-latent-adversarial-perturbation.txt).

Per batch: one clean forward with `capture={}` and ONE `torch.autograd.grad` call give the loss gradient at
the input and at the output of every chosen stage h_k together (Eq. 4: the latent gradients come "for free"
with the input gradient). Then a second forward trains on the input perturbed by
delta_0 = eta_0 * sign(grad_x L), projected to the epsilon-ball and [0, 1], with delta_k = eta_k *
sign(grad_{h_k} L) added to each chosen stage output through `latent_perturbations` (Algorithm 1). Both
perturbations come from the clean example (the paper's ablation shows the random-start variant is worse).
Cost 2F2B, the same as FGSM (the first backward goes to the input and the stage outputs only).

Which stages (`latent_stages`, `stages`): the paper perturbs the input plus the ends of the first two groups
of a WRN-28-10 (conv1 = the stem conv, conv2 = the first block group); perturbing the deep groups (conv3,
conv4) alone drops PGD accuracy to 0 (Table 3), so depth is the searched knob: `latent_stages = k` perturbs
the first k entries of `model.stage_names` (small_cnn: conv1, conv2, fc1; preact_resnet18: stem,
layer1..layer4; wide_resnet: stem, block1..block3), k = 2 by default, 0 gives plain FGSM (the paper's
ablation baseline). `stages` names them explicitly instead (any subset, e.g. [stem, block2]) and then
replaces `latent_stages`; a name the model lacks is an error at setup that lists the model's stages.

Step sizes are ratios of epsilon: eta_0 = input_step_ratio * eps, eta_k = latent_step_ratio * eps. The paper
uses 8/255 everywhere at eps = 8/255 (both ratios 1.0) and studies eta_k from 0.6 eps to 1.0 eps (best at 1.0);
the authors' public code uses 0.75 * eta for the latent layers of its PreActResNet-18. Note eta_k is an
absolute size in the units of the stage's activations (as in the paper), not a fraction of their scale, so
the paper's ratio does not transfer across architectures: on a WRN/PreActResNet the first stages' outputs
have mean |h| ~ 0.5-0.9 and 8/255 is ~4% of that, while small_cnn's conv2 outputs have mean |h| ~ 0.09, the
size of eta_k = 1.0 * 0.1 at Fashion-MNIST's eps. There the latent perturbation, a function of the label
through the gradient sign, dominates the features and the model learns to read the label from it ("label
leaking": accuracy on the perturbed batch 0.82, clean accuracy 0.10 after 100 steps); latent_step_ratio 0.1
trains well (300 steps: clean 0.74, PGD-10 0.59). Watch `train/clean_batch_acc` (accuracy of the clean first
pass, free) against `train/acc` (accuracy on the perturbed pass): the latter far above the former is leaking.

Variants from the authors' code and the paper's ablation (off by default): `random_magnitude` draws each
element's magnitude as min(|0.5 + 0.5 N(0,1)|, 1) * eta (input and latent layers alike, as the authors'
NoisyCNNModule does); `random_start` starts the input step from a uniform point in the epsilon-ball, as
FGSM-RS (the ablation's "FGSM-RS w/ latent adversarial perturbation"; the gradients, latent ones included,
are then taken at that point).

Recipe (paper): WRN-28-10, 30 epochs, cyclic lr 0 -> 0.2 over 12 epochs -> 0 over 18, SGD; no label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from robustune.attacks import clamp_to_ball, uniform_start
from robustune.config import ConfigError
from robustune.defense import Cost, Defense, StepResult, register_defense


@register_defense("slat")
@dataclass
class SLAT(Defense):
    summary = "FGSM at the input plus signed-gradient steps on the first latent stages, from one backward"
    latent_stages: int = 2  # perturb the first k stages of model.stage_names (paper: conv1, conv2 of a WRN)
    stages: list[str] = field(default_factory=list)  # explicit stage names instead of latent_stages
    input_step_ratio: float = 1.0  # eta_0 / epsilon (paper: 8/255 at eps 8/255)
    latent_step_ratio: float = 1.0  # eta_k / epsilon for every chosen stage (paper: 1.0; studied 0.6-1.0)
    random_magnitude: bool = False  # authors' code variant: per-element magnitude min(|0.5+0.5N|, 1) * eta
    random_start: bool = False  # ablation variant: FGSM-RS-style uniform start for the input step

    def __post_init__(self) -> None:
        if self.latent_stages < 0:
            raise ValueError(f"latent_stages must be >= 0, got {self.latent_stages}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat a name, got {self.stages}")
        if not self.input_step_ratio >= 0:
            raise ValueError(f"input_step_ratio must be >= 0, got {self.input_step_ratio}")
        if not self.latent_step_ratio >= 0:
            raise ValueError(f"latent_step_ratio must be >= 0, got {self.latent_step_ratio}")

    def cost(self) -> Cost:
        return Cost(forward=2, backward=2)

    def setup(self, model, ctx) -> None:
        super().setup(model, ctx)
        self.perturbed_stages = self.resolve_stages(model)

    def resolve_stages(self, model) -> list[str]:
        """The stage names this defense perturbs on `model`, in forward order; ConfigError naming the valid
        stages when a name is unknown or latent_stages exceeds the model's stage count."""
        valid = list(getattr(model, "stage_names", ()))
        if self.stages:
            unknown = [name for name in self.stages if name not in valid]
            if unknown:
                raise ConfigError(f"method.stages: {unknown} {'is' if len(unknown) == 1 else 'are'} not a stage "
                                  f"of {type(model).__name__}; valid stages: {valid}")
            return [name for name in valid if name in self.stages]
        if self.latent_stages > len(valid):
            raise ConfigError(f"method.latent_stages={self.latent_stages} but {type(model).__name__} has only "
                              f"{len(valid)} stages: {valid}")
        return valid[:self.latent_stages]

    def _magnitude(self, eta: float, like: torch.Tensor) -> torch.Tensor | float:
        if not self.random_magnitude:
            return eta
        return (0.5 + 0.5 * torch.randn_like(like)).abs().clamp_(max=1.0) * eta

    def loss(self, model, x, y, idx, step) -> StepResult:
        eps = self.ctx.epsilon
        stages = self.perturbed_stages
        x0 = uniform_start(x, eps) if self.random_start else x.detach()
        x0 = x0.clone().requires_grad_(True)
        capture: dict[str, torch.Tensor] = {}
        clean_logits = model(x0, capture=capture)
        clean_loss = F.cross_entropy(clean_logits, y)
        grads = torch.autograd.grad(clean_loss, [x0] + [capture[name] for name in stages])
        x_adv = clamp_to_ball(x0.detach() + self._magnitude(self.input_step_ratio * eps, x) * grads[0].sign(),
                              x, eps)
        eta = self.latent_step_ratio * eps
        deltas = {name: (self._magnitude(eta, g) * g.sign()).detach() for name, g in zip(stages, grads[1:])}
        logits = model(x_adv, latent_perturbations=deltas)
        # Accuracy of the first pass (clean, or the random start): compared with train/acc it exposes label leaking.
        clean_acc = (clean_logits.detach().argmax(1) == y).float().mean().item()
        return StepResult(F.cross_entropy(logits, y), logits, {"clean_batch_acc": clean_acc})
