"""ATLD: adversarial training with latent distribution (Qian, Zhang, Huang et al.; code: LitterQ/ATLD-pytorch).

A discriminator D reads the classifier's logits and outputs 1 + K numbers: a natural-vs-perturbed logit
(sigmoid = probability that the logits come from a natural input) and K class logits. Per batch:
1. Latent-manifold example (LMAE), no labels: from x (or, as in the authors' code, from a uniform random
   start in the eps-ball) take one signed step of `step_ratio * eps` that DEcreases D's loss on the perturbed
   side, BCE(D0(f(x')), 0), i.e. makes f(x') look more "perturbed" (maximizes the latent divergence, Eq. 7);
   projected to the eps-ball and [0, 1].
2. D trains `discriminator_steps` times on the detached natural and perturbed logits: BCE(natural = 1) +
   BCE(perturbed = 0) + soft CE of the class head on both, against label-smoothed targets.
3. The classifier minimizes soft CE(f(x_adv), y_ls) + w * MSE(f(x_adv), f(x).detach()). In the authors' code
   w = scale / 2 with scale = max(grad_x CE) / max(grad_x MSE) at x_adv (a constant, no gradient through it);
   here w = consistency_weight * scale with consistency_weight = 0.5 (`consistency="grad_ratio"`). We take the
   largest absolute gradient entry (the code's signed max is the same whenever the largest entry is
   positive, which on image batches is practically always) and set the scale to 0 when the MSE gradient is 0.
   `consistency="fixed"` uses w = consistency_weight and skips the two extra input-gradient passes.
Label smoothing follows the authors' formula: 1 - ls on the label, ls / (K - 1) elsewhere (ls = 0.5).

Discriminator training (two defaults changed; `discriminator_optimizer="sgd", discriminator_input="logits"`
with the default lr 1e-3 and 2 steps is the authors' exact setting). The authors train D with SGD, lr 1e-3,
momentum 0.9, weight decay 2e-4, 2 steps per batch, over 200-400 CIFAR epochs: some 10^5 D steps. A 3-epoch
run on 10k Fashion-MNIST images gives D 2 x 79 x 3 = 474 steps, and in so few SGD at 1e-3 barely moves D: it
keeps calling most inputs one way (measured, epoch 1: natural/perturbed accuracy 0.87/0.19 at seed 0), so
the LMAE step follows a D that knows nothing and is close to random noise.
- Optimizer: Adam, lr 1e-3, betas (0.5, 0.999) (the usual GAN-discriminator setting). Rule: Adam's step per
  parameter is about lr whatever the size of the gradient, so D moves from the first batch instead of
  waiting for small gradients to build momentum (tests/test_atld.py: above 0.65 on both sides after 40
  batches, where the authors' D is still at chance).
- Input: each logit vector standardized (zero mean, unit standard deviation over its K entries) before D's
  MLP. Why: within a short run the classifier's logits change scale many times over (the MSE between natural
  and LMAE logits grew from 1-50 in epoch 1 to hundreds or thousands by epoch 3 in runs with
  `train.grad_clip`), and a D on raw logits, Adam or SGD, fell back to chance by epoch 3 (balanced accuracy
  0.50-0.60, 3 seeds each), typically calling nearly everything one way.
  The softmax prediction does not depend on a shift, and the pattern of a logit vector (which classes stand
  out, by how many standard deviations) is what separates an input pushed towards another class. With the
  standardized input D stayed above chance on both sides at epoch 3 in all 6 runs measured (3 seeds, with
  and without `train.grad_clip`: 0.58-0.81 natural, 0.65-0.80 perturbed). The unit test of the optimizer
  does not show this; the evidence is those runs.
Progress: `on_epoch_end` reports `disc_acc_natural` and `disc_acc_perturbed`, D's accuracy on each side,
each batch scored before D trains on it. D has learned when both are above 0.5 (a D that always answers
"natural" scores 1.0 and 0.0).

Gradient clipping (a training default of this defense, `train_defaults`; `--set train.grad_clip=null` turns it
off). The MSE term is quadratic in the logit gap, and under SGD at the platform's lr 0.05 its gradient steps
blow up: with a fixed weight of 1 or 5 the loss became NaN or inf within epoch 1, and with the code's gradient
ratio the MSE grew to hundreds by epoch 3 and the classifier sank towards chance (`benchmarks/defense_table.py
--methods atld --set seed=S`, 10k images, 3 epochs, test PGD-20 through IMT at seeds 0, 1, 2: 0.207, 0.147,
0.367; clean 0.453, 0.221, 0.599). Clipping the classifier's gradient norm at 1 kept it training at every seed:
0.317, 0.350, 0.320 (clean 0.465, 0.574, 0.553; robust to every attack 0.300, 0.270, 0.237 instead of 0.140,
0.107, 0.183); seed 2 trained without it too and lost 4.7 PGD-20 points with it. The authors' CIFAR recipe (WRN, lr 0.1 with decay over hundreds of epochs) does not
mention clipping; it changes the step length, not the objective.

What clipping does not fix (the method, at this budget): ATLD's training examples are not adversarial to the
classifier. The LMAE ascends D's "perturbed" score, not the classification loss, and the classifier is more
accurate on the LMAE inputs than on clean ones: at epoch 3 (accuracy on the training inputs over the last
quarter of the epoch vs clean training accuracy) 0.66 vs 0.44 with clipping and 0.82 vs 0.62 with the MSE
term off, where FGSM-RS's training inputs score 0.66 against 0.78 clean. A model trained on inputs that are
easier than clean ones gains little against loss-maximizing attacks, so ATLD stays well below FGSM-RS's
PGD-20 accuracy (0.64) here whatever its knobs; the weight-0 variant (no MSE) reached 0.410 through IMT.

IMT (inference with manifold transformation) is a test-time defense: `inference_model` wraps the classifier
and D in `ManifoldTransformedModel`, whose forward takes one signed step of `imt_step_ratio * eps` that raises
D's natural score (lowers its "perturbed" score), halved when D's natural probability is in (0.3, 0.7)
(`imt_plus`, ATLD+, as in the authors' evaluation code), then classifies. Validation and the final report
attack that whole pipeline (the report also gives the bare classifier).

Adaptive attacks (`attack_surrogates`). The evaluation also crafts PGD on two surrogates and scores the
examples on the IMT model, keeping each point's worst case: "bare_classifier", the classifier alone (a
transfer attack that steps around IMT), and "joint", the paper's attack on classifier and discriminator
together (Sec. V-F, Table V: both losses give the attacking gradient). The attacker ascends the classifier's
cross-entropy plus D's binary loss on the input's true side, which is "perturbed": CE(f(x), y) +
BCE(d(x), perturbed), i.e. it misleads the classifier and makes D call the input natural, where IMT has
little left to undo. `JointAttackModel` writes this as K + 1 logits whose cross-entropy is exactly that sum
(see its docstring for why K logits cannot).

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
D_ADAM_BETAS = (0.5, 0.999)  # the usual GAN discriminator setting (a short first-moment memory)


class LatentDiscriminator(nn.Module):
    """MLP on the classifier's logits: output[:, 0] natural-vs-perturbed logit (natural = 1), output[:, 1:]
    class logits. (The authors use a WRN-28-5 body on the K logits viewed as a K x 1 x 1 image; an MLP is the
    same function class for a 1x1 input without the BatchNorm.) With `standardize`, each logit vector is first
    shifted and scaled to zero mean and unit standard deviation over its K entries."""

    def __init__(self, num_classes: int, hidden: int = 128, standardize: bool = False):
        super().__init__()
        self.standardize = standardize
        self.body = nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.head = nn.Linear(hidden, 1 + num_classes)

    def forward(self, logits: Tensor) -> Tensor:
        if self.standardize:
            centred = logits - logits.mean(dim=1, keepdim=True)
            logits = centred / centred.std(dim=1, keepdim=True, correction=0).clamp_min(1e-6)
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


class JointAttackModel(nn.Module):
    """The paper's adaptive attack on classifier and discriminator together ("(Cla+D)", its Table V), as
    logits for a cross-entropy attacker: x -> [f(x), logsumexp(f(x)) + d(x)], K + 1 columns, with d = D's
    natural-vs-perturbed logit. For every label y < K,

        CE(joint(x), y) = CE(f(x), y) + BCE(d(x), perturbed) = CE(f(x), y) + softplus(d(x)),

    the classifier's loss plus D's loss on the input's true manifold label (it is an attacked input): an
    attacker ascending it fools the classifier while making D call the input natural, the side IMT moves
    inputs towards. The extra column's softmax is sigmoid(d), D's probability of "natural", and the K classes
    share the rest in f's proportions. No K-column logits can carry this sum: for any K logits z,
    sum_y exp(-CE(z, y)) = 1, while sum_y exp(-CE(f, y) - softplus(d)) = 1 - sigmoid(d) < 1; the missing mass
    is the extra column. Differentiable end to end; no IMT step inside (the evaluation applies it when it
    scores the examples on the deployed model)."""

    def __init__(self, model: nn.Module, discriminator: nn.Module):
        super().__init__()
        self.model, self.discriminator = model, discriminator

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        natural_logit = self.discriminator(logits)[:, :1]
        return torch.cat([logits, torch.logsumexp(logits, dim=1, keepdim=True) + natural_logit], dim=1)


@register_defense("atld")
@dataclass
class ATLD(Defense):
    """ATLD training (label-free latent-manifold examples against a logit discriminator D, auxiliary with its
    own optimizer, not counted in the cost) and IMT at inference."""

    summary = "ATLD: label-free latent-manifold examples vs a logit discriminator, IMT at test time (Qian et al.)"
    progress_metrics = ("disc_acc_natural", "disc_acc_perturbed")  # did D leave chance within the run?
    train_defaults = {"grad_clip": 1.0}  # the MSE term's SGD steps blow up without it (see the module docstring)
    step_ratio: float = 1.0  # LMAE step in units of eps (code: step = eps, one step)
    random_start: bool = True  # LMAE from x + U(-eps, eps) as in the authors' code; False: from x
    label_smoothing: float = 0.5  # code's ls_factor (paper: "label smoothing rate 0.5")
    discriminator_optimizer: Literal["adam", "sgd"] = "adam"  # "sgd": the authors' (momentum 0.9, wd 2e-4)
    discriminator_lr: float = 1e-3  # D's learning rate (authors: 1e-3 with SGD)
    discriminator_steps: int = 2  # D updates per batch (authors: 2)
    discriminator_hidden: int = 128  # width of D's MLP
    discriminator_input: Literal["standardized", "logits"] = "standardized"  # "logits": the authors' raw logits
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
        if self.discriminator_optimizer not in ("adam", "sgd"):
            raise ValueError(f"discriminator_optimizer must be 'adam' or 'sgd', got {self.discriminator_optimizer!r}")
        if self.discriminator_lr <= 0:
            raise ValueError(f"discriminator_lr must be > 0, got {self.discriminator_lr}")
        if self.discriminator_input not in ("standardized", "logits"):
            raise ValueError(f"discriminator_input must be 'standardized' or 'logits', "
                             f"got {self.discriminator_input!r}")
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
            self.discriminator = LatentDiscriminator(ctx.num_classes, self.discriminator_hidden,
                                                     standardize=self.discriminator_input == "standardized")
            self.discriminator.to(ctx.device)
        # `d_optimizer`: the optimizer object (`discriminator_optimizer` is the field that names its kind).
        if self.discriminator_optimizer == "sgd":
            self.d_optimizer = torch.optim.SGD(self.discriminator.parameters(), lr=self.discriminator_lr,
                                               momentum=D_MOMENTUM, weight_decay=D_WEIGHT_DECAY)
        else:
            self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.discriminator_lr,
                                                betas=D_ADAM_BETAS)
        self._disc_counts = self._empty_counts()

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
                           targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """D's loss (BCE natural=1 / perturbed=0 + soft CE of the class head on both) and its per-example hits
        (B,) bool: natural logits scored natural, perturbed logits scored perturbed."""
        out_nat, out_adv = self.discriminator(natural_logits), self.discriminator(perturbed_logits)
        loss = (F.binary_cross_entropy_with_logits(out_nat[:, 0], torch.ones_like(out_nat[:, 0]))
                + F.binary_cross_entropy_with_logits(out_adv[:, 0], torch.zeros_like(out_adv[:, 0]))
                + soft_cross_entropy(out_nat[:, 1:], targets) + soft_cross_entropy(out_adv[:, 1:], targets))
        return loss, (out_nat[:, 0] > 0).detach(), (out_adv[:, 0] < 0).detach()

    def train_discriminator(self, natural_logits: Tensor, perturbed_logits: Tensor,
                            targets: Tensor) -> tuple[float, float, float]:
        """`discriminator_steps` optimizer steps of D on detached logits. Returns the last step's loss and D's
        accuracy on the natural and on the perturbed logits as scored before its first step on this batch
        (logits D has not trained on yet), which also go into the epoch's counts."""
        natural_logits, perturbed_logits = natural_logits.detach(), perturbed_logits.detach()
        for step in range(self.discriminator_steps):
            loss, hits_natural, hits_perturbed = self.discriminator_loss(natural_logits, perturbed_logits, targets)
            if step == 0:
                first_natural, first_perturbed = hits_natural.double(), hits_perturbed.double()
            self.d_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.ctx.average_gradients(self.discriminator.parameters())
            self.d_optimizer.step()
        counts = torch.stack([first_natural.sum(), first_natural.new_tensor(len(first_natural)),
                              first_perturbed.sum(), first_perturbed.new_tensor(len(first_perturbed))])
        self._disc_counts += counts.to(self._disc_counts)  # (natural hits, seen, perturbed hits, seen)
        return loss.item(), first_natural.mean().item(), first_perturbed.mean().item()

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
        d_loss, _, _ = self.train_discriminator(natural_logits, logits, targets)
        loss, weight, mse = self.classifier_loss(x_adv, logits, natural_logits, targets)
        update(loss)
        return StepResult(loss.detach(), logits.detach(), {
            "atld_d_loss": d_loss, "atld_consistency_weight": weight.item(), "atld_mse": mse.item(),
        })

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """D's epoch accuracy on natural and on perturbed logits, each scored before D trained on its batch.
        D has learned when both are above 0.5 (always answering "natural" scores 1.0 on one and 0.0 on the
        other)."""
        hits_natural, seen_natural, hits_perturbed, seen_perturbed = \
            self.ctx.all_reduce_sum(self._disc_counts.clone()).tolist()  # every worker's share
        self._disc_counts = self._empty_counts()
        if not seen_natural:
            return {}
        return {"disc_acc_natural": hits_natural / seen_natural, "disc_acc_perturbed": hits_perturbed / seen_perturbed}

    def _empty_counts(self) -> Tensor:
        return torch.zeros(4, dtype=torch.float64, device=self.ctx.device)

    def inference_model(self, model: nn.Module) -> nn.Module:
        if not self.imt:
            return model
        return ManifoldTransformedModel(model, self.discriminator, epsilon=self.ctx.epsilon,
                                        step=self.imt_step_ratio * self.ctx.epsilon, halve_uncertain=self.imt_plus)

    def attack_surrogates(self, model: nn.Module) -> dict[str, nn.Module]:
        """With IMT: the bare classifier (a transfer attack around the IMT step) and the paper's joint
        classifier + discriminator model (`JointAttackModel`); the evaluation scores both on the IMT model.
        Without IMT the deployed model is the bare classifier, which the evaluation already attacks."""
        if not self.imt:
            return {}
        return {"bare_classifier": model, "joint": JointAttackModel(model, self.discriminator)}

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(),
                "discriminator_optimizer": self.d_optimizer.state_dict(), "disc_counts": self._disc_counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        if "disc_counts" in state:  # checkpoints written before the D accuracy was counted lack it
            self._disc_counts.copy_(state["disc_counts"])
