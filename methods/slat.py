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

Step sizes. The input step is a ratio of epsilon: eta_0 = input_step_ratio * eps (paper: 8/255 at eps 8/255).
The latent step eta_k is, in the paper, the same absolute number 8/255 for every layer (studied from 0.6 to
1.0 times that, best at 1.0; the authors' public code uses 0.75 * 8/255 for the latent layers of its
PreActResNet-18). An absolute eta_k is in the units of the stage's activations, so it means something only
next to their scale, and that scale depends on the architecture: on small_cnn (no BatchNorm, Fashion-MNIST,
eps 0.1) eta_k = 1.0 * eps was about as large as the conv2 outputs themselves (mean |h| ~ 0.09). The latent
perturbation, a function of the label through the gradient sign, then dominated the features and the model
learned to read the label from it ("label leaking": accuracy on the perturbed batch 0.82, clean accuracy 0.10
after 100 steps), and every tuned SLAT trial of the default study collapsed.

So by default (`latent_step="relative"`) eta_k = latent_step_activation_ratio * mean|h_k|, with mean|h_k| the
mean absolute output of stage k over the batch in the clean pass (the pass that gives the latent gradients;
detached, recomputed every batch, one number per stage). The default ratio 0.035 is the paper's 8/255
expressed against the activations it was applied to, measured once (a script outside the repository, not a
test) as mean|h_k| of the platform's models with BatchNorm in training mode and CIFAR normalization, on three
kinds of 32x32 input (Fashion-MNIST padded and tinted to 3 channels, smooth colour noise with CIFAR's channel
statistics, uniform noise): WRN-28-10 at init: stem 0.48-0.92, block1 1.52-1.59; PreActResNet-18 at init:
stem 0.41-0.61, layer1 0.60-0.77; PreActResNet-18 after 40 FGSM-RS steps (SGD lr 0.1): stem 0.47-1.07,
layer1 1.60-2.18 (the scale grows as training starts). 8/255 divided by these is 0.014-0.077 over stages,
inputs and time, median 0.034, hence 0.035. One ratio cannot copy the paper exactly: its absolute step is
~2-3x smaller relative to the deeper of the two stages than to the stem, and a fully trained WRN's scale
(30 epochs) was not measured. On small_cnn (Fashion-MNIST, 10k images, 3 epochs, eps 0.1) the default gives
eta_conv1 0.007 -> 0.012 and eta_conv2 0.004 -> 0.007 over the epochs (what latent_step_ratio ~0.04-0.12
gave before), trains without leaking and ends near FGSM-RS (PGD-20 0.617 vs 0.647).
eta_k does not follow epsilon: the paper fixes eta_k = 8/255 "for every dataset and layer" and does not say
how it set eta_k when it trained at other radii (Fig. 3). `latent_step="absolute"` is the paper's form,
eta_k = latent_step_ratio * eps for every stage (latent_step_ratio 1.0 = the paper), exactly the earlier
behaviour; each ratio is refused when set under the other form, where it would do nothing.
`train/latent_step_<stage>` logs the eta_k used (epoch mean). Label leaking shows as `train/acc` (accuracy
on the perturbed pass) far above `train/clean_batch_acc` (the clean first pass, free); the loop's
`diag/leak_gap` measures the same against clean accuracy.

Variants from the authors' code and the paper's ablation (off by default): `random_magnitude` draws each
element's magnitude as min(|0.5 + 0.5 N(0,1)|, 1) * eta (input and latent layers alike, as the authors'
NoisyCNNModule does); `random_start` starts the input step from a uniform point in the epsilon-ball, as
FGSM-RS (the ablation's "FGSM-RS w/ latent adversarial perturbation"; the gradients, latent ones included,
are then taken at that point).

Recipe (paper): WRN-28-10, 30 epochs, cyclic lr 0 -> 0.2 over 12 epochs -> 0 over 18, SGD; no label smoothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from robustune.attacks import clamp_to_ball, uniform_start
from robustune.config import ConfigError
from robustune.defense import Cost, Defense, StepResult, register_defense

LatentStep = Literal["relative", "absolute"]
# eta_k / mean|h_k|: the median ratio of the paper's 8/255 to CIFAR WRN / PreActResNet first-stage activations
DEFAULT_ACTIVATION_RATIO = 0.035
DEFAULT_EPSILON_RATIO = 1.0  # the paper's eta_k = 8/255 at eps = 8/255


@register_defense("slat")
@dataclass
class SLAT(Defense):
    summary = "FGSM at the input plus signed-gradient steps on the first latent stages, from one backward"
    latent_stages: int = 2  # perturb the first k stages of model.stage_names (paper: conv1, conv2 of a WRN)
    stages: list[str] = field(default_factory=list)  # explicit stage names instead of latent_stages
    input_step_ratio: float = 1.0  # eta_0 / epsilon (paper: 8/255 at eps 8/255)
    # How eta_k is set: "relative" (eta_k = latent_step_activation_ratio * mean|h_k| of the batch, per stage) or
    # "absolute" (the paper's form: eta_k = latent_step_ratio * epsilon, in activation units, for every stage).
    latent_step: LatentStep = "relative"
    latent_step_activation_ratio: float = DEFAULT_ACTIVATION_RATIO  # eta_k / mean|h_k|; only for "relative"
    latent_step_ratio: float = DEFAULT_EPSILON_RATIO  # eta_k / eps; only for "absolute" (paper 1.0, studied 0.6-1)
    random_magnitude: bool = False  # authors' code variant: per-element magnitude min(|0.5+0.5N|, 1) * eta
    random_start: bool = False  # ablation variant: FGSM-RS-style uniform start for the input step

    def __post_init__(self) -> None:
        if self.latent_stages < 0:
            raise ValueError(f"latent_stages must be >= 0, got {self.latent_stages}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat a name, got {self.stages}")
        if not self.input_step_ratio >= 0:
            raise ValueError(f"input_step_ratio must be >= 0, got {self.input_step_ratio}")
        if self.latent_step not in get_args(LatentStep):
            raise ValueError(f"latent_step must be one of {list(get_args(LatentStep))}, got {self.latent_step!r}")
        for name in ("latent_step_activation_ratio", "latent_step_ratio"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        # The knob of the other form would be silently ignored: refuse it, so a setting always means something.
        if self.latent_step == "relative" and self.latent_step_ratio != DEFAULT_EPSILON_RATIO:
            raise ValueError(f"latent_step_ratio={self.latent_step_ratio} (eta_k / epsilon) only applies with "
                             f"latent_step='absolute'; with latent_step='relative' set "
                             f"latent_step_activation_ratio (eta_k / mean|h_k|) instead")
        if self.latent_step == "absolute" and self.latent_step_activation_ratio != DEFAULT_ACTIVATION_RATIO:
            raise ValueError(f"latent_step_activation_ratio={self.latent_step_activation_ratio} (eta_k / mean|h_k|) "
                             f"only applies with latent_step='relative'; with latent_step='absolute' set "
                             f"latent_step_ratio (eta_k / epsilon) instead")

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

    def _magnitude(self, eta: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
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
        etas = {name: self.latent_step_size(capture[name]) for name in stages}
        deltas = {name: (self._magnitude(etas[name], g) * g.sign()).detach() for name, g in zip(stages, grads[1:])}
        logits = model(x_adv, latent_perturbations=deltas)
        # Accuracy of the first pass (clean, or the random start): compared with train/acc it exposes label leaking.
        clean_acc = (clean_logits.detach().argmax(1) == y).float().mean().item()
        metrics = {"clean_batch_acc": clean_acc}
        metrics.update({f"latent_step_{name}": float(eta) for name, eta in etas.items()})  # eta_k actually used
        return StepResult(F.cross_entropy(logits, y), logits, metrics)

    def latent_step_size(self, activation: torch.Tensor) -> torch.Tensor | float:
        """eta_k for a stage whose clean-pass output (the whole batch) is `activation`."""
        if self.latent_step == "absolute":
            return self.latent_step_ratio * self.ctx.epsilon
        # Detached: the step size is a constant of the perturbation, as eps is, not something to train through.
        return self.latent_step_activation_ratio * activation.detach().abs().mean()
