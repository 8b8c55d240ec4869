"""FGSM-PGI: FGSM with a prior-guided initialization (Jia et al., ECCV 2022, "Prior-Guided Adversarial
Initialization for Fast Adversarial Training"; slides in papers/las-at-sdi-pgi-slides.txt).

Instead of a random start, FGSM starts from a prior perturbation eta:

- ``prior="batch"`` (FGSM-BP): the previous batch's adversarial perturbation (a buffer shaped like one batch;
  a batch larger than the buffer draws U(-eps, eps) for the missing rows, a smaller one uses the first rows).
- ``prior="epoch"`` (FGSM-EP): this example's adversarial perturbation from the previous epoch (a per-example
  buffer of ``ctx.num_train_examples`` x input shape, indexed by the loop's sample indices).
- ``prior="momentum"`` (FGSM-MEP, the paper's best and the default): EP plus a per-example momentum that
  steers the next prior (slides, Alg. 3)::

      g         = grad_x L(f(x + eta), y)
      g_c       = sign(g)
      m         <- mu * m + u                         (m = 0 in the first epoch and after every reset)
      delta_adv = clip_eps(eta + alpha * g_c)
      eta_next  = clip_eps(eta + alpha * sign(m))     (stored as this example's next prior)

  ``momentum_form`` chooses what the momentum accumulates:

  * ``"normalized_gradient"`` (default, the authors' released code): u = g / mean(|g|), the example's raw
    gradient divided by its mean absolute value over the example's elements (an example whose gradient is
    all zero adds 0).
  * ``"sign"`` (the paper as written, Alg. 3 line 13): u = g_c = sign(g).

  The default follows the code because the literal form cannot do anything with the paper's mu = 0.3:
  each entry of sign(g) is in {-1, 0, 1}, so starting from m = 0, |m| <= 1 + mu + mu^2 + ... < 1 / (1 - mu)
  and |mu * m| < mu / (1 - mu) <= 1 for every mu <= 1/2. Wherever g != 0, sign(mu * m + sign(g)) = sign(g),
  so eta_next = clip_eps(eta + alpha * g_c) = delta_adv: MEP stores exactly EP's prior (it can only differ
  where a gradient entry is exactly 0, or for mu > 1/2). The normalized gradient has magnitudes that vary
  across pixels and epochs, so an earlier epoch's large gradient can outvote this epoch's small one.
  The authors divide by the L1 norm of the whole batch's gradient (one scalar per batch); here each example
  is normalized by its own mean |g|, so the momentum does not depend on the batch size, on which examples
  share a batch, or on how a batch is split over workers (one and two workers give the same buffers). The
  per-example constant (mean instead of sum) scales m uniformly and does not change sign(m).

Every start and every stored prior is also kept inside [0, 1] (x + eta is projected with clamp_to_ball).
In the first epoch and after every reset (every ``reset_every`` epochs, authors' ``--epochs_reset 40``;
10 on CIFAR-100) the priors are drawn eta ~ U(-eps, eps) and the momentum is zeroed.

Loss (slides Eq. and Alg. 3 line 9/16)::

    L(f(x + delta_adv), y) + lambda_ * || f(x + delta_adv) - f(x + eta) ||_2^2

f is the network output, i.e. the logits: the authors' code computes the term as
``torch.nn.MSELoss()(output, ori_output)`` on the two logit tensors (mean over batch and classes, so the
per-example squared L2 distance divided by the number of classes, averaged over the batch; lambda_=10 is
calibrated to that reduction). As in that code the gradient flows into BOTH logits (f(x + eta) is not
detached), and L is the label-smoothed cross-entropy in both the attack gradient and the training loss.

Label smoothing s (``label_smoothing``) is the authors' ``_label_smoothing(label, factor)`` with
factor = 1 - s: the target puts 1 - s on the true class and s / (C - 1) on each other class (their code's
factor 0.6, so s = 0.4; 0 = plain cross-entropy; the same convention as las_at and fgsm_sdi). This is not
torch's ``label_smoothing`` argument, which spreads s over all C classes.

Per-example buffers are updated only for the examples a worker sees; ``on_epoch_end`` merges them over
workers with ``ctx.all_reduce_sum`` (sum of buffer * touched and of touched; an example touched by several
workers, which only happens through the sampler's wrap-around padding, gets the mean), so every worker and
the checkpoint hold the whole buffer. The batch prior of FGSM-BP is per worker and not merged (a resumed
multi-worker run restarts every worker from rank 0's batch buffer).

Cost: forward on x + eta (1F), its input gradient (1B), forward on x + delta_adv (1F), and the final
backward through both forward graphs, since the regularizer differentiates f(x + eta) too (2B): 2F3B.

Differences from the authors' code, all deliberate: the first-epoch prior is U(-eps, eps) as the paper
says (their code draws random signs scaled to min(alpha, eps)); the normalized-gradient momentum divides each
example's gradient by its own mean |g| rather than by the batch's L1 norm (see above). As in their code, the
attack runs in the model's current (training) mode.
Reference recipe (CIFAR-10, ResNet-18): 110 epochs, lr 0.1 multistep at 100/105, SGD momentum 0.9, wd 5e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from robustune.attacks import clamp_to_ball
from robustune.losses import smoothed_cross_entropy
from robustune.defense import Cost, Defense, StepResult, register_defense


def prior_guided_loss(logits_adv: Tensor, logits_prior: Tensor, y: Tensor, lambda_: float,
                      label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """(total, smoothed CE on the adversarial logits, regularizer ||f(x+delta_adv) - f(x+eta)||^2 as MSE)."""
    ce = smoothed_cross_entropy(logits_adv, y, label_smoothing)
    reg = F.mse_loss(logits_adv, logits_prior)
    return ce + lambda_ * reg, ce, reg


@register_defense("fgsm_pgi")
@dataclass
class FGSMPGI(Defense):
    summary = "FGSM from a prior-guided start (previous batch/epoch/momentum) plus a prior-consistency regularizer"
    prior: Literal["batch", "epoch", "momentum"] = "momentum"  # BP / EP / MEP; MEP is the paper's best
    alpha_ratio: float = 1.0  # FGSM step in units of epsilon (paper: alpha = eps; Prop. 1 needs alpha <= eps)
    lambda_: float = 10.0  # weight of ||f(x+delta_adv) - f(x+eta)||^2 (authors' --lamda 10, MSE reduction)
    momentum_decay: float = 0.3  # mu of the MEP momentum (authors' --momentum_decay 0.3)
    # what the MEP momentum accumulates: the per-example L1-normalized gradient (authors' code) or sign(g)
    # (the paper's formula, which with mu <= 1/2 makes MEP store exactly EP's priors; module docstring)
    momentum_form: Literal["normalized_gradient", "sign"] = "normalized_gradient"
    reset_every: int = 40  # epochs between re-initializations of the priors (authors: 40; 10 on CIFAR-100)
    label_smoothing: float = 0.4  # s: true-class target 1 - s (authors' --factor 0.6 = 1 - 0.4); 0 = off

    def __post_init__(self) -> None:
        if self.prior not in ("batch", "epoch", "momentum"):
            raise ValueError(f"prior must be 'batch', 'epoch' or 'momentum', got {self.prior!r}")
        if self.alpha_ratio <= 0:
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")
        if self.lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {self.lambda_}")
        if not 0 <= self.momentum_decay <= 1:
            raise ValueError(f"momentum_decay must be in [0, 1], got {self.momentum_decay}")
        if self.momentum_form not in ("normalized_gradient", "sign"):
            raise ValueError(f"momentum_form must be 'normalized_gradient' (authors' code) or 'sign' (the paper's "
                             f"formula), got {self.momentum_form!r}")
        if self.reset_every < 1:
            raise ValueError(f"reset_every must be >= 1 (epochs), got {self.reset_every}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def cost(self) -> Cost:
        return Cost(forward=2, backward=3)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, model, ctx) -> None:
        super().setup(model, ctx)
        if self.label_smoothing > 0 and ctx.num_classes < 2:
            raise ValueError("label_smoothing > 0 needs at least 2 classes")
        self.resets = 0  # how many times the priors were (re)drawn after the first draw
        self.batch_prior: Tensor | None = None
        self.prior_buffer: Tensor | None = None
        self.momentum_buffer: Tensor | None = None
        self.touched: Tensor | None = None
        if self.prior != "batch":
            shape = (ctx.num_train_examples, *ctx.input_shape)
            self.prior_buffer = torch.empty(shape, device=ctx.device)
            self.touched = torch.zeros(ctx.num_train_examples, dtype=torch.bool, device=ctx.device)
            if self.prior == "momentum":
                self.momentum_buffer = torch.zeros(shape, device=ctx.device)
        self._draw_priors()

    def _draw_priors(self) -> None:
        """eta ~ U(-eps, eps) for every example, momentum zero. The draw depends only on (seed, resets), so
        every worker draws the same buffer (and one- and two-worker runs agree)."""
        self.batch_prior = None  # BP: the next batch starts from U(-eps, eps)
        if self.prior_buffer is None:
            return
        g = torch.Generator(device="cpu").manual_seed(self.ctx.seed * 1_000_003 + 7907 * (self.resets + 1))
        noise = torch.rand(self.prior_buffer.shape, generator=g)
        self.prior_buffer.copy_((noise * 2 - 1) * self.ctx.epsilon)
        if self.momentum_buffer is not None:
            self.momentum_buffer.zero_()
        self.touched.zero_()

    # --------------------------------------------------------------------------------------- the step
    def _start(self, x: Tensor, idx: Tensor) -> Tensor:
        """x + eta (the prior start), projected into the eps-ball and [0, 1]."""
        eps = self.ctx.epsilon
        if self.prior == "batch":
            b = x.shape[0]
            stored = self.batch_prior
            have = 0 if stored is None else min(b, stored.shape[0])
            eta = torch.empty_like(x).uniform_(-eps, eps) if have < b else torch.empty_like(x)
            if have:
                eta[:have] = stored[:have]
        else:
            eta = self.prior_buffer[idx]
        return clamp_to_ball(x + eta, x, eps)

    def loss(self, model, x, y, idx, step) -> StepResult:
        eps = self.ctx.epsilon
        alpha = self.alpha_ratio * eps
        x_start = self._start(x, idx).detach().requires_grad_(True)
        logits_prior = model(x_start)
        attack_loss = smoothed_cross_entropy(logits_prior, y, self.label_smoothing)
        # retain_graph: the regularizer differentiates f(x + eta) again in the training backward.
        (grad,) = torch.autograd.grad(attack_loss, x_start, retain_graph=True)
        g_c = grad.sign()
        x_start = x_start.detach()
        x_adv = clamp_to_ball(x_start + alpha * g_c, x, eps).detach()
        logits_adv = model(x_adv)
        total, ce, reg = prior_guided_loss(logits_adv, logits_prior, y, self.lambda_, self.label_smoothing)
        self._store(x, idx, x_start, x_adv, grad)
        return StepResult(total, logits_adv, {"pgi_ce": ce.item(), "pgi_reg": reg.item()})

    @torch.no_grad()
    def _store(self, x: Tensor, idx: Tensor, x_start: Tensor, x_adv: Tensor, grad: Tensor) -> None:
        """Record the next prior (and momentum) for these examples; `grad` is the raw input gradient."""
        if self.prior == "batch":
            self.batch_prior = (x_adv - x).detach().clone()
            return
        if self.prior == "epoch":
            next_prior = x_adv - x  # delta_adv
        else:
            m = self.momentum_decay * self.momentum_buffer[idx] + self._momentum_increment(grad)
            self.momentum_buffer[idx] = m
            next_prior = clamp_to_ball(x_start + self.alpha_ratio * self.ctx.epsilon * m.sign(), x,
                                       self.ctx.epsilon) - x
        self.prior_buffer[idx] = next_prior
        self.touched[idx] = True

    def _momentum_increment(self, grad: Tensor) -> Tensor:
        """What one step adds to the MEP momentum: sign(g), or g / mean(|g|) per example."""
        if self.momentum_form == "sign":
            return grad.sign()
        scale = grad.abs().flatten(1).mean(1).view(-1, *([1] * (grad.dim() - 1)))
        return grad / torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero gradient adds 0

    # ------------------------------------------------------------------------------------- epoch end
    @torch.no_grad()
    def _merge(self) -> None:
        """Every worker updated only its shard: combine so all hold the whole buffer."""
        # In place (the buffers are the size of the training set): sum(buffer * touched) / sum(touched) over
        # workers; exact when one worker touched an example (x * 1 + 0 ... ) / 1 = x.
        shape = (-1, *([1] * (self.prior_buffer.dim() - 1)))
        touched = self.touched.to(self.prior_buffer.dtype)
        count = self.ctx.all_reduce_sum(touched.clone())
        unseen = count == 0  # examples no worker visited this epoch keep their prior
        for buffer in (self.prior_buffer, self.momentum_buffer):
            if buffer is None:
                continue
            keep = buffer[unseen].clone()
            self.ctx.all_reduce_sum(buffer.mul_(touched.view(shape)))
            buffer.div_(count.clamp(min=1).view(shape))
            buffer[unseen] = keep
        self.touched.zero_()

    def on_epoch_end(self, model, epoch: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.prior_buffer is not None:
            self._merge()
            metrics["pgi_prior_abs_mean"] = float(self.prior_buffer.abs().mean()) / max(self.ctx.epsilon, 1e-12)
        if (epoch + 1) % self.reset_every == 0:  # the authors reset at the start of epochs 0, 40, 80, ...
            self.resets += 1
            self._draw_priors()
        return metrics

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"resets": self.resets}
        for name in ("batch_prior", "prior_buffer", "momentum_buffer"):
            value = getattr(self, name)
            if value is not None:
                state[name] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"resets"} | ({"prior_buffer"} if self.prior != "batch" else set()) | (
            {"momentum_buffer"} if self.prior == "momentum" else set())
        allowed = expected | {"batch_prior"}
        if not expected <= set(state) <= allowed:
            raise ValueError(f"fgsm_pgi (prior={self.prior!r}) state needs keys {sorted(expected)} "
                             f"(and optionally batch_prior), got {sorted(state)}")
        self.resets = int(state["resets"])
        self.batch_prior = state["batch_prior"].to(self.ctx.device) if "batch_prior" in state else None
        for name in ("prior_buffer", "momentum_buffer"):
            if name in state:
                buffer = getattr(self, name)
                if buffer.shape != state[name].shape:
                    raise ValueError(f"fgsm_pgi {name} has shape {tuple(state[name].shape)} in the checkpoint "
                                     f"but {tuple(buffer.shape)} here (another dataset or subset?)")
                buffer.copy_(state[name])
        if self.touched is not None:
            self.touched.zero_()
