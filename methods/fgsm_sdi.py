"""FGSM-SDI: FGSM from a sample-dependent learnable initialization (Jia et al., TIP 2022).

A light generator G reads the image and the sign of its clean input gradient (2x the image channels) and
outputs an initialization eta = eps * tanh(G(x, sign(grad_x CE(f(x), y)))). The adversarial example is one
FGSM step from there:

    delta = clip_eps(eta + alpha * sign(grad_x CE(f(x + eta), y))),   alpha = alpha_ratio * eps (default eps),

and x + delta is also clipped to [0, 1] (the authors' code forgot; here x + eta is clipped as well, so
the FGSM gradient is taken at a valid image). The target minimizes the label-smoothed CE on x + delta every
batch; G maximizes the same loss on every k-th batch (k = `generator_update_every`; batches k, 2k, ...
counted from the start of training; the authors' code updates on batch indices 0, k, 2k of each epoch)
with its own Adam (lr 1e-3, weight decay 5e-4 as in the code). The clean gradient is computed once per
batch and shared by the generator update and the target step, as in Algorithm 3.

Gradient path to G (the authors' approach): sign() has zero gradient, so the FGSM step is a constant,
computed at the detached x + eta; G's gradient flows through x + eta + alpha * sign(g).detach() and the
clipping (identity inside the ball and the box) into the target's loss.

Generator (authors' `One_Layer_Attacker`): conv 3x3 (2C -> 64, no bias) + BN + ReLU, one pre-activation
residual block (BN without affine, PReLU, conv 3x3, twice; identity shortcut), BN without affine, conv 3x3
back to C channels, tanh, x eps. As in the code G runs in train mode for its update and in eval mode
(running BN statistics) when it initializes the target's examples. The code's generator multistep lr
schedule is not reproduced (constant lr).

Label smoothing: target 1 - s on the true class, s / (C - 1) elsewhere (code: factor 0.9, i.e. s = 0.1),
for the target's loss and G's objective; the clean gradient and the FGSM step use plain CE (as the code).

Cost per batch, target passes (the generator is an auxiliary net, not counted):
  clean input gradient for G's input 1F1B + FGSM step at x + eta 1F1B + training pass 1F1B = 3F3B;
  every k batches G's update adds an FGSM step 1F1B and a forward/backward at x + delta into G 1F1B:
  (3 + 2/k)F (3 + 2/k)B, 3.1F3.1B at k = 20.

Logged per epoch (train/<name>): `sdi/init_abs` the mean |eta| / eps of the initializations the target
trained from, `sdi/generator_loss` the target loss G reached at its updates, `sdi/generator_updates`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustune.attacks import clamp_to_ball, input_gradient
from robustune.losses import smoothed_cross_entropy
from robustune.defense import Cost, Defense, DefenseContext, StepResult, register_defense


class _PreActBlock(nn.Module):
    """The code's GenBlock(64, 64): BN (no affine) -> PReLU -> conv, twice, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, affine=False)
        self.act1 = nn.PReLU()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels, affine=False)
        self.act2 = nn.PReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight, gain=math.sqrt(2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act1(self.bn1(x)))
        return x + self.conv2(self.act2(self.bn2(h)))


class InitGenerator(nn.Module):
    """(image, sign of its clean input gradient) -> initialization direction in [-1, 1] (times eps outside)."""

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, eps=1e-3), nn.ReLU(),
            _PreActBlock(width),
            nn.BatchNorm2d(width, affine=False),
            nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor, grad_sign: Tensor) -> Tensor:
        return torch.tanh(self.net(torch.cat([x, grad_sign], dim=1)))


@register_defense("fgsm_sdi")
@dataclass
class FGSMSDI(Defense):
    summary = "FGSM from a learned sample-dependent initialization: a generator over (x, sign grad) maximizes the loss"
    alpha_ratio: float = 1.0  # FGSM step in units of eps (paper/code: alpha = eps = 8/255)
    generator_update_every: int = 20  # k: G is updated on batches k, 2k, ... (code --att_num 20)
    generator_lr: float = 1e-3  # G's Adam (code --lr_att)
    generator_weight_decay: float = 5e-4  # G's Adam weight decay (code)
    generator_width: int = 64  # G's hidden channels (code)
    label_smoothing: float = 0.1  # code's factor 0.9 = true-class target 1 - 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha_ratio) and self.alpha_ratio > 0):
            raise ValueError(f"alpha_ratio must be > 0, got {self.alpha_ratio}")
        if self.generator_update_every < 1:
            raise ValueError(f"generator_update_every must be >= 1, got {self.generator_update_every}")
        if not self.generator_lr > 0:
            raise ValueError(f"generator_lr must be > 0, got {self.generator_lr}")
        if self.generator_weight_decay < 0:
            raise ValueError(f"generator_weight_decay must be >= 0, got {self.generator_weight_decay}")
        if self.generator_width < 1:
            raise ValueError(f"generator_width must be >= 1, got {self.generator_width}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def cost(self) -> Cost:
        passes = 3 + 2 / self.generator_update_every
        return Cost(forward=passes, backward=passes,
                    auxiliary="generator G: 3 convolutions at full resolution, generator_width channels, every batch")

    def setup(self, model: nn.Module, ctx: DefenseContext) -> None:
        super().setup(model, ctx)
        with torch.random.fork_rng(devices=[]):  # same initial generator on every worker
            torch.manual_seed(ctx.seed + 7_777)
            self.generator = InitGenerator(ctx.input_shape[0], self.generator_width).to(ctx.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr,
                                                    weight_decay=self.generator_weight_decay)
        self.batches_seen = 0
        self.generator_updates = 0
        self._stats = self._empty_stats()

    def _empty_stats(self) -> Tensor:
        # [sum of mean |eta|/eps per batch x batch size, examples, generator loss sum, generator updates]
        return torch.zeros(4, dtype=torch.float64, device=self.ctx.device)

    # ------------------------------------------------------------------------------------ perturbation
    def initialization(self, x: Tensor, grad_sign: Tensor) -> Tensor:
        """eta = eps * tanh(G(x, sign grad)); in the graph of G unless called under no_grad."""
        return self.ctx.epsilon * self.generator(x, grad_sign)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, eta: Tensor) -> Tensor:
        """x + clip_eps(eta + alpha sign(grad_x CE(f(x + eta)))), in [0, 1]; differentiable w.r.t. eta (the
        FGSM direction is a constant)."""
        eps = self.ctx.epsilon
        x_init = clamp_to_ball(x + eta, x, eps)
        with torch.enable_grad():  # also under no_grad
            grad, _ = input_gradient(model, x_init, y)  # at the detached start
        return clamp_to_ball(x_init + self.alpha_ratio * eps * grad.sign(), x, eps)

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor,
                             grad_sign: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The target step's examples (G in eval mode) and the initialization they started from."""
        if grad_sign is None:
            grad_sign = input_gradient(model, x, y)[0].sign()
        self.generator.eval()
        with torch.no_grad():
            eta = self.initialization(x, grad_sign)
        return self.perturb(model, x, y, eta).detach(), eta

    def update_generator(self, model: nn.Module, x: Tensor, y: Tensor, grad_sign: Tensor) -> Tensor:
        """One Adam step of G ascending the target's loss on x + delta; returns that loss (before the step)."""
        self.generator.train()
        x_adv = self.perturb(model, x, y, self.initialization(x, grad_sign))
        loss = smoothed_cross_entropy(model(x_adv), y, self.label_smoothing)
        params = list(self.generator.parameters())
        grads = torch.autograd.grad(loss, params)  # the target's parameters get no gradient here
        for p, g in zip(params, grads):
            p.grad = -g  # ascend
        self.ctx.average_gradients(params)
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)
        self.generator_updates += 1
        self._stats[2] += loss.detach().to(torch.float64)
        self._stats[3] += 1
        return loss.detach()

    # ----------------------------------------------------------------------------------------- hooks
    def train_step(self, model, x, y, idx, step, update) -> StepResult:
        self.batches_seen += 1
        grad_sign = input_gradient(model, x, y)[0].sign()  # clean gradient, shared (Algorithm 3, line 3)
        if self.batches_seen % self.generator_update_every == 0:
            self.update_generator(model, x, y, grad_sign)
        x_adv, eta = self.adversarial_examples(model, x, y, grad_sign)
        logits = model(x_adv)
        loss = smoothed_cross_entropy(logits, y, self.label_smoothing)
        update(loss)
        if self.ctx.epsilon > 0:
            self._stats[0] += (eta.abs().mean() / self.ctx.epsilon).to(torch.float64) * len(y)
        self._stats[1] += len(y)
        return StepResult(loss.detach(), logits.detach())

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        init_sum, examples, loss_sum, updates = self.ctx.all_reduce_sum(self._stats.clone()).tolist()
        self._stats = self._empty_stats()
        if self.ctx.world_size > 1:  # BN statistics of G: workers saw different batches
            for buffer in self.generator.buffers():
                if buffer.is_floating_point():
                    self.ctx.all_reduce_sum(buffer)
                    buffer /= self.ctx.world_size
        metrics = {"sdi/generator_updates": updates / self.ctx.world_size}
        if examples:
            metrics["sdi/init_abs"] = init_sum / examples
        if updates:  # an epoch shorter than k batches has no generator update
            metrics["sdi/generator_loss"] = loss_sum / updates
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "optimizer": self.generator_optimizer.state_dict(),
                "batches_seen": self.batches_seen, "generator_updates": self.generator_updates,
                "stats": self._stats.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["optimizer"])
        self.batches_seen = int(state["batches_seen"])
        self.generator_updates = int(state["generator_updates"])
        self._stats.copy_(state["stats"])
