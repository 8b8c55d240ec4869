"""eFGSM + re-constructor (Chen & Lee, "Towards Fast and Robust Adversarial Training for Image Classification").

Per batch:
1. Start point (Eq. 11, 14): kappa ~ N(sign(Gamma[idx]) * eps, (sigma_ratio * eps)^2) per pixel,
   x0 = clip01(x + clip_eps(kappa)). Gamma is a per-example buffer shaped like the input, so in the first
   epoch (Gamma = 0) the start is plain Gaussian noise around x.
2. Linear (DeepFool-style) refinement at x0 (Eq. 12): for the label t and the closest class i != t,
   Delta = |Z_t - Z_i| / ||grad Z_t - grad Z_i||_1 and x_adv = x0 + Delta * sign(grad (Z_i - Z_t)), projected
   to the eps-ball around x and to [0, 1]. On an affine classifier this lands exactly on the t/i boundary.
3. Loss: L_C = CE_ls(C(x_adv), y) and L_R = MSE(R(softmax(C(x_adv))), x); the classifier C trains on
   L_C + L_R / lambda_cls by default (`loss_scale="classification"`), or on the paper's Eq. 16,
   L_R + lambda_cls * L_C (`loss_scale="paper"`); both have the same ratio of the two terms (see below).
   The re-constructor R (dense layers + transposed convolutions, sized from the input shape) is trained on
   L_R with its own Adam optimizer; it is an auxiliary net and never used at inference.
4. Once per epoch (Eq. 13), for the examples seen: Gamma <- gamma_decay * Gamma + sign(x_adv - x).

The robustness estimate of Sec. 3.2 comes for free from step 2: an example counts as robust when C classifies
x0 correctly and its linearized boundary distance Delta exceeds eps. Its batch mean is the per-batch metric
`efgsm_robust_est` (logged per epoch as `train/efgsm_robust_est`); set
`train.overfit_metric=train/efgsm_robust_est` to drive the overfitting alarm with it.

Choices where the paper is silent or ambiguous (see also the field comments):
- t is the true label (training), so already-misclassified starts are pushed further along the same rule.
- "closest class": the paper's Eq. 12 takes the minimum over all classes, which needs one backward pass per
  class (K for K classes: slower than PGD-7 on 10 classes, against the paper's reported timings). The
  default `runner_up` takes i = the largest wrong logit and needs one backward; `all` is the exact formula.
- sigma is not given in the paper; it is expressed in units of eps here (`sigma_ratio`, default 0.5).
- label smoothing is essential per the paper (CIFAR robust accuracy 46% with it, 31% without) but its
  factor is not given: default 0.1 (the usual factor, Mueller et al. [28]), torch convention
  (1 - ls) * onehot + ls / K.
- lambda: 0.1 for MNIST and 0.05 for CIFAR-10 in Table 2; one default, 0.1, fits the 28x28 datasets this
  platform ships; use 0.05 on CIFAR. L_R is the mean squared error (the paper does not name it).
- Loss scale (a change from the paper's written form, default `classification`): Eq. 16 weights the
  classification term by lambda and leaves L_R at weight 1. The paper does not name its optimizer and tunes
  only the ratio of the two terms. Under this platform's SGD, Eq. 16 with lambda = 0.1 hands the classifier a
  CE gradient 10x weaker than every other defense gets, so at the shared learning rates eFGSM trains as if
  its lr were 10x lower (one Fashion-MNIST epoch at lr 0.05 barely learns). Dividing Eq. 16 by lambda,
  L_C + L_R / lambda, keeps the ratio the paper tunes and gives L_C its plain-CE scale, so eFGSM shares the
  other defenses' lr range. The classifier's gradient is exactly 1 / lambda times Eq. 16's, so SGD (with
  momentum) at lr and weight decay wd is Eq. 16 at lr / lambda and wd * lambda: train.weight_decay and
  train.grad_clip now act on the scale they have for the other defenses' CE (a clip threshold c here is
  lambda * c under Eq. 16).
  R's parameters only get L_R's gradient, and in this form that gradient comes out of the shared backward
  multiplied by 1 / lambda: it is multiplied back by lambda before R's Adam step, so R's optimisation
  (Adam's epsilon included) is the same in both forms. `paper` is the exact Eq. 16.
- R is trained jointly in the paper; here it has its own Adam (lr `reconstructor_lr`) because the loop's
  optimizer only holds the target model. Its gradients are averaged across workers before its step.
- Gamma is indexed by dataset position. With data augmentation (random crops/flips, CIFAR's default) its pixels
  drift against the augmented image; the paper does not say how it handled this.

Cost (target model): 2F2B with `runner_up` (forward + input gradient at x0, forward + backward at x_adv);
2F(K+1)B with `all`. R's forward/backward on the softmax outputs is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustune.attacks import clamp_to_ball
from robustune.losses import smoothed_cross_entropy
from robustune.defense import Cost, Defense, DefenseContext, StepResult, register_defense

_MERGE_CHUNK = 4096  # examples per chunk when folding the epoch's directions into Gamma (bounds memory)
RECONSTRUCTOR = "re-constructor R: 2 dense layers + 3 transposed convolutions, forward + backward every batch"


class Reconstructor(nn.Module):
    """Maps class probabilities back to an image: two dense layers, then three transposed convolutions.

    The dense part produces a (channels, ceil(H/4), ceil(W/4)) map, two stride-2 transposed convolutions
    upsample it 4x, a stride-1 3x3 one maps to the image channels; the output is cropped to (H, W) and squashed
    to [0, 1] by a sigmoid. Works for 1x28x28 (7x7 seed) and 3x32x32 (8x8 seed) alike.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], channels: int = 16, hidden: int = 128):
        super().__init__()
        c, h, w = input_shape
        self.shape = (c, h, w)
        self.seed_shape = (channels, math.ceil(h / 4), math.ceil(w / 4))
        half = max(1, channels // 2)
        self.dense = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.ReLU(),
            nn.Linear(hidden, channels * self.seed_shape[1] * self.seed_shape[2]), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(channels, half, 4, stride=2, padding=1), nn.ReLU(),
            # the third, stride-1 "transposed" 3x3 convolution is an ordinary 3x3 convolution (same function
            # class, flipped kernel); nn.Conv2d runs ~3x faster than ConvTranspose2d for it on CPU
            nn.Conv2d(half, c, 3, stride=1, padding=1))

    def forward(self, probs: Tensor) -> Tensor:
        seed = self.dense(probs).view(-1, *self.seed_shape)
        _, h, w = self.shape
        return torch.sigmoid(self.deconv(seed)[:, :, :h, :w])


def linear_boundary_step(model: nn.Module, x0: Tensor, y: Tensor,
                         closest_class: Literal["runner_up", "all"] = "runner_up") -> tuple[Tensor, Tensor, Tensor]:
    """Linearized distance to the closest decision boundary of the label at x0 (Eq. 12).

    Returns (direction, delta, correct): direction = grad_x (Z_i - Z_t) for the closest class i (per example,
    shaped like x0), delta = |Z_t - Z_i| / ||grad Z_t - grad Z_i||_1 (B,), and whether x0 is classified as t
    (B,). Moving x0 by delta * sign(direction) reaches the t/i boundary of the linearized model.
    """
    probe = x0.detach().requires_grad_(True)
    logits = model(probe)
    rows = torch.arange(len(y), device=y.device)
    z_t = logits[rows, y]
    with torch.no_grad():
        wrong = logits.detach().clone()
        wrong[rows, y] = float("-inf")
        correct = z_t.detach() > wrong.amax(dim=1)
    if closest_class == "runner_up":
        i = wrong.argmax(dim=1)
        (direction,) = torch.autograd.grad((logits[rows, i] - z_t).sum(), probe)
        gap = (z_t - logits[rows, i]).detach().abs()
        delta = gap / direction.flatten(1).abs().sum(dim=1).clamp_min(1e-12)
        return direction, delta, correct
    if closest_class != "all":
        raise ValueError(f"closest_class must be 'runner_up' or 'all', got {closest_class!r}")
    num_classes = logits.shape[1]
    grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), probe, retain_graph=k < num_classes - 1)[0]
                         for k in range(num_classes)], dim=1)  # (B, K, *x.shape[1:])
    diffs = grads - grads[rows, y].unsqueeze(1)  # grad (Z_k - Z_t)
    gaps = (z_t.detach().unsqueeze(1) - logits.detach()).abs()
    distances = gaps / diffs.flatten(2).abs().sum(dim=2).clamp_min(1e-12)
    distances[rows, y] = float("inf")
    delta, i = distances.min(dim=1)
    return diffs[rows, i], delta, correct


@register_defense("efgsm")
@dataclass
class EFGSM(Defense):
    """eFGSM adversarial examples (accumulated-sign Gaussian start + linear boundary step) with a re-constructor
    net R (auxiliary, own Adam optimizer, not counted in the cost) and a free robustness estimate."""

    summary = "eFGSM: accumulated-sign Gaussian start + DeepFool-style step, trained with a re-constructor (Chen & Lee)"
    sigma_ratio: float = 0.5  # std of the start noise kappa, in units of eps (paper: a free hyperparameter)
    gamma_decay: float = 0.95  # Gamma <- decay * Gamma + sign(x_adv - x), once per epoch (Eq. 13)
    lambda_cls: float = 0.1  # classification : reconstruction weight (Eq. 16): 0.1 MNIST, 0.05 CIFAR-10 (Table 2)
    label_smoothing: float = 0.1  # 1 - s on the label, s over the others (robustune.losses); paper gives no factor
    closest_class: Literal["runner_up", "all"] = "runner_up"  # i for Eq. 12: largest wrong logit, or exact min
    reconstructor_lr: float = 1e-3  # Adam learning rate of R
    # classifier's loss: L_C + L_R / lambda ("classification": CE at its plain scale) or L_R + lambda * L_C
    # ("paper", Eq. 16 as written); same ratio, 1 / lambda apart in scale (see the module docstring)
    loss_scale: Literal["classification", "paper"] = "classification"
    reconstructor_channels: int = 16  # width of R's transposed convolutions

    def __post_init__(self) -> None:
        if self.sigma_ratio < 0:
            raise ValueError(f"sigma_ratio must be >= 0, got {self.sigma_ratio}")
        if not 0.0 <= self.gamma_decay <= 1.0:
            raise ValueError(f"gamma_decay must be in [0, 1], got {self.gamma_decay}")
        if self.lambda_cls <= 0:
            raise ValueError(f"lambda_cls must be > 0, got {self.lambda_cls}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.closest_class not in ("runner_up", "all"):
            raise ValueError(f"closest_class must be 'runner_up' or 'all', got {self.closest_class!r}")
        if self.loss_scale not in ("classification", "paper"):
            raise ValueError(f"loss_scale must be 'classification' or 'paper', got {self.loss_scale!r}")
        if self.reconstructor_lr <= 0:
            raise ValueError(f"reconstructor_lr must be > 0, got {self.reconstructor_lr}")
        if self.reconstructor_channels < 1:
            raise ValueError(f"reconstructor_channels must be >= 1, got {self.reconstructor_channels}")

    def cost(self) -> Cost:
        if self.closest_class == "all":  # one input gradient per class (10 before setup tells the real count)
            ctx = getattr(self, "ctx", None)
            return Cost(forward=2, backward=1 + (ctx.num_classes if ctx is not None else 10),
                        auxiliary=RECONSTRUCTOR)
        return Cost(forward=2, backward=2, auxiliary=RECONSTRUCTOR)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, ctx: DefenseContext) -> None:
        super().setup(model, ctx)
        if ctx.num_classes < 2:
            raise ValueError(f"efgsm needs at least 2 classes, got {ctx.num_classes}")
        with torch.random.fork_rng(devices=[]):  # same R on every worker, independent of the global stream
            torch.manual_seed(ctx.seed + 0xEF65)
            self.reconstructor = Reconstructor(ctx.num_classes, ctx.input_shape,
                                               channels=self.reconstructor_channels).to(ctx.device)
        self.reconstructor_optimizer = torch.optim.Adam(self.reconstructor.parameters(), lr=self.reconstructor_lr)
        shape = (ctx.num_train_examples, *ctx.input_shape)
        # Gamma is bounded by 1 / (1 - decay) (20 at 0.95) and only its sign is used: float16 halves the
        # memory and the checkpoint. The epoch's directions are signs summed over workers: int8.
        self.gamma = torch.zeros(shape, dtype=torch.float16, device=ctx.device)
        self._directions = torch.zeros(shape, dtype=torch.int8, device=ctx.device)
        self._touched = torch.zeros(ctx.num_train_examples, dtype=torch.float32, device=ctx.device)

    # ---------------------------------------------------------------------------------- perturbation
    def start_point(self, x: Tensor, idx: Tensor) -> Tensor:
        """x0 = clip01(x + clip_eps(kappa)), kappa ~ N(sign(Gamma[idx]) * eps, (sigma_ratio * eps)^2)."""
        eps = self.ctx.epsilon
        kappa = self.gamma[idx].to(x.dtype).sign() * eps + torch.randn_like(x) * (self.sigma_ratio * eps)
        return clamp_to_ball(x + kappa, x, eps)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The eFGSM example and, per example, whether it counts as robust (correct at x0 and Delta > eps)."""
        eps = self.ctx.epsilon
        x0 = self.start_point(x, idx)
        direction, delta, correct = linear_boundary_step(model, x0, y, self.closest_class)
        # Moving more than 2 eps from x0 cannot stay in the ball; capping also avoids inf * 0 where a
        # gradient entry is zero.
        step = delta.clamp(max=2 * eps).view(-1, *([1] * (x.dim() - 1)))
        x_adv = clamp_to_ball(x0 + step * direction.sign(), x, eps).detach()
        return x_adv, correct & (delta > eps)

    # ---------------------------------------------------------------------------------------- training
    def train_step(self, model, x, y, idx, step, update) -> StepResult:
        x_adv, robust = self.perturb(model, x, y, idx)
        self._record_directions(idx, x_adv, x)
        logits = model(x_adv)
        cls_loss = smoothed_cross_entropy(logits, y, self.label_smoothing)
        rec_loss = F.mse_loss(self.reconstructor(F.softmax(logits, dim=1)), x)
        if self.loss_scale == "paper":
            loss = rec_loss + self.lambda_cls * cls_loss
        else:
            loss = cls_loss + rec_loss / self.lambda_cls
        # `update` zeroes and steps only the target model; R's gradients come from the same backward, where
        # only L_R reaches R: undo L_R's 1 / lambda weight so that R steps on grad L_R in either form.
        self.reconstructor_optimizer.zero_grad(set_to_none=True)
        update(loss)
        if self.loss_scale == "classification":
            for parameter in self.reconstructor.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(self.lambda_cls)
        self.ctx.average_gradients(self.reconstructor.parameters())
        self.reconstructor_optimizer.step()
        return StepResult(loss.detach(), logits.detach(), {
            "efgsm_robust_est": robust.float().mean().item(),
            "efgsm_rec_loss": rec_loss.item(),
            "efgsm_cls_loss": cls_loss.item(),
        })

    def _record_directions(self, idx: Tensor, x_adv: Tensor, x: Tensor) -> None:
        self._directions.index_add_(0, idx, (x_adv - x).sign().to(torch.int8))
        self._touched.index_add_(0, idx, torch.ones(len(idx), device=self._touched.device))

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Fold this epoch's directions into Gamma for every example any worker saw (Eq. 13)."""
        self.ctx.all_reduce_sum(self._directions)
        self.ctx.all_reduce_sum(self._touched)
        seen = torch.nonzero(self._touched > 0).squeeze(1)
        for start in range(0, len(seen), _MERGE_CHUNK):
            rows = seen[start:start + _MERGE_CHUNK]
            counts = self._touched[rows].view(-1, *([1] * (self.gamma.dim() - 1)))
            mean_direction = self._directions[rows].float() / counts  # an example seen twice: its mean sign
            self.gamma[rows] = (self.gamma_decay * self.gamma[rows].float() + mean_direction).to(self.gamma.dtype)
        fraction = len(seen) / max(1, self._touched.numel())
        self._directions.zero_()
        self._touched.zero_()
        return {"efgsm_gamma_updated": fraction}

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "reconstructor": self.reconstructor.state_dict(),
                "reconstructor_optimizer": self.reconstructor_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gamma = state["gamma"]
        if tuple(gamma.shape) != tuple(self.gamma.shape):
            raise ValueError(f"efgsm: the checkpoint's Gamma has shape {tuple(gamma.shape)}, this run needs "
                             f"{tuple(self.gamma.shape)} (a different dataset or train_subset?)")
        self.gamma.copy_(gamma)
        self.reconstructor.load_state_dict(state["reconstructor"])
        self.reconstructor_optimizer.load_state_dict(state["reconstructor_optimizer"])
