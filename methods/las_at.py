"""LAS-AT: adversarial training with a learnable attack strategy (Jia et al., CVPR 2022).

A strategy network reads each clean image and draws, per image, an attack strategy from one categorical
head per attack parameter: the radius epsilon, the number of PGD iterations and the step size. The
target model trains on PGD examples made with each image's own strategy (label-smoothed CE); every k
batches the strategy net is updated by REINFORCE (with a baseline) to maximize J = L1 + alpha*L2 + beta*L3.

Grids. Radii and step sizes are ratios of the evaluation epsilon (`ctx.epsilon`), so one grid transfers
across datasets: the paper's CIFAR-10 ranges at eval eps 8/255 are eps 3..15/255 (ratios 3/8..15/8), step
1..5/255 (1/8..5/8) and 3..14 iterations, which are the defaults. (The authors' script writes them as
Python `range(3, 15)`, `range(1, 5)`, `range(3, 14)`, i.e. without the upper ends; pass those lists to get
the code's grids.) The attack-type head of the code has a single choice (I-FGSM), carries no gradient and
is left out; so is the TRADES variant's beta head.

Attack. PGD with each image's own radius, step and iteration count: the loop runs to the batch maximum
and masks out the images that are done. The random start is the authors' fixed one: U(-r, r) with
r = `random_start_ratio` * eval eps whatever radius was drawn, then clipped to each image's own ball
(the code clips at the first step instead; here every point stays in its ball and in [0, 1]).

Reward (authors' code; the paper's L2, L3 are negative losses, the code uses accuracies):
  L1 = CE of the target on the strategy's examples (unsmoothed), clamped to [0, 10];
  L2 = 4 x robust accuracy, under PGD-`reward_pgd_steps` (`reward_pgd_restarts` restarts, eval eps,
       step `reward_pgd_alpha_ratio` x eps), of a copy of the target after one SGD step (lr `lookahead_lr`,
       weight decay 5e-4) on those examples;
  L3 = 2 x clean accuracy of that copy.
With `reward="batch"` (the code) each term is a batch mean, one scalar reward for the batch; with
`reward="per_sample"` (the paper's estimator, Eq. with L0(x^n); the default) each image gets its own L1, robust
and clean correctness. Policy loss = sum over heads of mean(-log pi(a) * A), A = reward - baseline
(`reward_baseline`, below); gradients averaged over workers, clipped to norm `policy_grad_clip` (and, sized to
the run, scaled up to it), SGD without momentum at `policy_lr` (or the run-sized lr).
The authors' policy and target learning-rate schedules are not reproduced: the policy lr is constant and
the look-ahead step uses the target's current learning rate from the loop's schedule, as the code does
(or a fixed `lookahead_lr` when set).

Policy gradient and schedule: changes from the paper so that the strategy learns within a short run. The
authors' form exactly: `policy_schedule: paper`, `reward: batch`, `reward_baseline: none` (the code); the
paper's equation: `reward: per_sample`, `reward_baseline: none`.
  Estimator (default `reward: per_sample`, `reward_baseline: mean`). The code multiplies every image's
  -log pi(a) by one batch reward, always positive (~3-5). Measured at the default study's size (Fashion-MNIST,
  small CNN, eps 0.1, the target after 2 epochs of PGD-AT, 32 draws of the initial policy on 16 batches): the
  batch reward moves by 0.065 (sd) between draws of strategies on one batch and by ~0.2 between batches, and
  it grows by ~2 over a run as the target trains; the gradient's per-update signal-to-noise ratio
  |E g| / sd(g) was too small to detect (~0). Its one effect is drift: a positive reward raises the
  probability of whatever was drawn, so a large enough lr collapses the policy to an arbitrary strategy: with
  the reward replaced by the constant 4 (lr 0.44, 72 updates) the entropy fell to 0.001, the collapse once
  seen with the real reward at that lr. Per-image rewards give 0.13 (their image-to-image spread, sd ~2.4,
  is mostly the copy's correctness on the image, which the image's own strategy hardly changes: R^2 < 0.01);
  with the baseline
  `mean` (each image's reward minus the mean of the batch's other images, leave-one-out: it does not depend on
  the image's own draw, so the expected gradient, the objective J, is unchanged) 0.27, and the drift is gone
  (a constant reward gives a zero gradient). With `reward: batch`, `mean` subtracts a running mean (step
  `BASELINE_RATE`) of the earlier updates' rewards (the first update's advantage is 0).
  Cadence and lr (`policy_schedule: sized_to_run`, the default). The paper updates every k = 20 batches at
  lr 1e-4, the gradient clipped to norm 1, over 110 CIFAR-10 epochs: ~2,150 updates; the default study's
  3 epochs of 3,000 images in batches of 128 (T = 72 batches) would get 3 updates of at most 1e-4 and a
  random per-image strategy. Sized to the run's length T = ctx.steps_per_epoch x ctx.epochs
  (`sized_policy_schedule`):
    interval k = min(update_every, max(1, T // policy_updates_per_run)):  at least `policy_updates_per_run`
        updates (when T allows), and never sparser than the paper's k (`update_every`), so a paper-length run
        keeps the paper's cadence;
    lr = max(policy_lr, policy_travel / (T // k)), and every update's gradient is scaled to norm
        `policy_grad_clip` (1; clipped when larger, scaled up when smaller): each update moves the strategy
        net by exactly lr, and the run's total step length lr x updates is `policy_travel` whatever the
        run's length (never below the paper's lr). Without the scaling up the distance would follow the
        spread of the per-image rewards, i.e. the target's accuracy (median gradient norm 0.57 on a seed
        whose target barely trained, 1.1 on one that trained); only the step's direction carries the signal.
    Signal and noise both grow with the lr; what separates them is the number of updates: over U updates
    the signal adds up as 0.27 U and the noise as sqrt(U) (in units of one update's noise), 2.3 : 1 at
    U = 72. A random walk lowers the entropy too, so whether the policy learned is judged against a
    control (the same run with the advantages shuffled), not by its entropy alone.
  At T = 72 (the default study's size before it moved to batches of 64, where T = 141: k = 2, 70 updates, lr
  8/70 = 0.114): k = 1, 72 updates, lr 8/72 = 0.111. Measured there (the real loop, seeds
  0, 1, 2, 3; epoch 1 -> epoch 3): the joint entropy (max 6.66) fell 6.65 -> 4.91, 6.65 -> 6.13,
  6.60 -> 5.89, 6.64 -> 5.06, and three of the four policies moved to larger radii (mean radius 1.40, 1.31,
  1.44 eps at epoch 3, uniform 1.125; seed 2: 1.17). The control, the same advantages shuffled across each
  batch's images (same step lengths, no link to the draws; seeds 0, 1, 2): 6.64 -> 6.53, 6.64 -> 6.53,
  6.60 -> 5.50, radius 1.15, 1.11, 1.05. So seeds 0, 1, 3 learned beyond the drift; seed 2, whose target
  barely trains (0.08 clean after epoch 1), drifted as much as its control. The code's estimator at the same
  schedule (the previous default): 6.59 -> 6.63, 6.63 -> 6.62, 6.61 -> 6.61, 6.65 -> 6.64; at
  policy_travel 32 (lr 0.44, seed 0) 4.45 after epoch 1 and back to 6.47, where the constant reward had
  collapsed it (0.001). The reward rose alike in both (seed 0: 3.04 -> 5.05 vs 3.03 -> 4.91; it follows
  the target's training). Validation PGD accuracy at epoch 3: 0.504, 0.464, 0.210, 0.454 (defaults) vs
  0.502, 0.472, 0.268, 0.452 (code's estimator); seed 2 moves by several points whatever the policy does
  (0.236 with a policy that stayed near uniform, 0.194 in the shuffled control). Not checked at CIFAR
  scale: there the rule gives k = 20 and lr 8/2150 = 3.7e-3, larger than the paper's 1e-4.

Order per batch (as in the code): on every k-th batch (k the interval above; batches k, 2k, ... counted
from the start of training) the policy is updated first (strategy net in train mode, its own draw of
strategies); then strategies for the target step are drawn with the strategy net in eval mode and the
target trains on them.

Auxiliary nets (not counted in cost()): the strategy net, a small CNN for inputs up to 28x28 and a
ResNet-18 (width `strategy_width`) above, plus the look-ahead copy of the target (its passes are counted).

Cost per batch (k: the run's interval once set up, `update_every` before), with E = mean of the
iteration grid, S = reward_pgd_steps, R = reward_pgd_restarts:
  target step:  (E + 1)F (E + 1)B  (attack + training pass);
  policy update, every k batches: attack E F/B, L1 forward 1F, look-ahead step 1F1B, PGD on the copy
  R(S + 1)F R*S B (the +1 is the restart selection forward), robust and clean forward 2F:
  forward  = E + 1 + (E + R(S + 1) + 4) / k,   backward = E + 1 + (E + R*S + 1) / k.
Defaults: 11.225F 10.975B. The per-image PGD (`strategy_pgd`) runs each iteration on the images still
moving only, so its work follows E, not the batch's largest drawn count.

Logged per epoch (train/<name>): `las/<head>/p_<i>` the fraction of training images that drew grid
entry i (heads `epsilon`, `steps`, `step_size`; entry i is `epsilon_ratios[i]`, `step_counts[i]`,
`step_size_ratios[i]`), `las/<head>/mean` (in units of eval eps for the radius and the step size),
`las/<head>/entropy`, and over the epoch's policy updates `las/reward`, `las/r1`, `las/r2`, `las/r3`,
`las/policy_updates`. Progress (`progress_metrics`, the leaderboard shows their first and last epoch):
`policy_updates` the updates since the start of training, `policy_entropy` the mean over the epoch's
training images of the drawn strategy's entropy (the three heads' entropies summed: the entropy of the
joint strategy, in nats; uniform at the default grids: ln 13 + ln 12 + ln 5 = 6.66) and `policy_reward`
the mean reward of the epoch's updates (absent in an epoch without one). The reward also rises as the
target trains (L2, L3 grow with its accuracy), so a rising reward alone is no sign the policy learned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical

from robustune.attacks import clamp_to_ball, input_gradient, per_example, pgd, uniform_start
from robustune.losses import smoothed_cross_entropy
from robustune.defense import Cost, Defense, DefenseContext, StepResult, register_defense

HEADS = ("epsilon", "steps", "step_size")
ROBUST_ACC_SCALE = 4.0  # authors' code: R2 = robust accuracy x 4 (--R2_param)
CLEAN_ACC_SCALE = 2.0  # authors' code: R3 = clean accuracy x 2 (--R3_param)
L1_CLAMP = 10.0  # authors' code: R1 = clamp(CE, 0, 10)
LOOKAHEAD_WEIGHT_DECAY = 5e-4  # authors' code: the copy's SGD (momentum 0.9 is moot for one step)
BASELINE_RATE = 0.2  # reward_baseline=mean with the batch reward: the running mean's step (about 5 updates)


def strategy_pgd(model: nn.Module, x: Tensor, y: Tensor, epsilon: Tensor, alpha: Tensor, steps: Tensor,
                 start_radius: float) -> Tensor:
    """PGD where image i has its own radius epsilon[i], step alpha[i] and iteration count steps[i].

    Start: x + U(-start_radius, start_radius), clipped to each image's own ball and [0, 1]. Iteration t
    attacks only the images with steps[i] > t, so the work follows the mean drawn count, not the batch's
    largest (max(steps) passes over the whole batch cost ~1.6x more at the default grid). A model in train
    mode then normalizes BatchNorm over those images only.
    """
    x = x.detach()
    x_adv = clamp_to_ball(uniform_start(x, start_radius), x, epsilon) if start_radius > 0 else x.clone()
    for t in range(int(steps.max()) if steps.numel() else 0):
        active = (steps > t).nonzero().squeeze(1)
        moving = x_adv[active]
        with torch.enable_grad():  # also under no_grad
            grad, _ = input_gradient(model, moving, y[active])
        step = per_example(alpha[active], moving) * grad.sign()
        x_adv[active] = clamp_to_ball(moving + step, x[active], epsilon[active])
    return x_adv.detach()


PAPER_POLICY_SCHEDULE = "paper"


def sized_policy_schedule(total_steps: int, updates_per_run: int, max_interval: int, travel: float,
                          min_lr: float) -> tuple[int, float]:
    """(interval, lr) of the strategy net's updates for a run of `total_steps` batches.

    interval = min(max_interval, max(1, total_steps // updates_per_run)): at least `updates_per_run` updates
    where the run is long enough, never sparser than `max_interval` (the paper's k). lr = max(min_lr,
    travel / updates): the run's total clipped step length lr x updates is `travel`, never below `min_lr`.
    """
    interval = min(max_interval, max(1, total_steps // updates_per_run))
    updates = max(1, total_steps // interval)
    return interval, max(min_lr, travel / updates)


# ------------------------------------------------------------------------------------- strategy nets
class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class StrategyNet(nn.Module):
    """Clean image -> one logit vector per attack parameter (dict head -> (B, grid size))."""

    def __init__(self, input_shape: tuple[int, int, int], grid_sizes: dict[str, int], width: int) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        if height * width_px <= 28 * 28:  # small CNN (Fashion-MNIST, MNIST)
            half = max(1, width // 2)
            self.body = nn.Sequential(
                nn.Conv2d(channels, half, 4, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(half, width, 4, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                nn.Linear(width * 16, 2 * width), nn.ReLU())
            features = 2 * width
        else:  # ResNet-18 as in the authors' StrategyNet.py, `width` channels in the first stage
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(width), nn.ReLU()]
            in_planes = width
            for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
                layers += [_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)]
                in_planes = planes
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            features = in_planes
        self.heads = nn.ModuleDict({name: nn.Linear(features, size) for name, size in grid_sizes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x * 2 - 1)  # inputs in [0, 1]; centre them
        return {name: head(h) for name, head in self.heads.items()}


@dataclass
class Strategy:
    """Per-image attack parameters drawn from the strategy net for one batch."""

    epsilon: Tensor  # (B,) radius in pixel units
    alpha: Tensor  # (B,) step size in pixel units
    steps: Tensor  # (B,) iteration counts (long)
    index: dict[str, Tensor]  # head -> (B,) grid positions drawn
    log_prob: dict[str, Tensor]  # head -> (B,) log pi(a) (in the graph when drawn with gradients)
    entropy: dict[str, Tensor]  # head -> (B,)


# ------------------------------------------------------------------------------------------ defense
@register_defense("las_at")
@dataclass
class LASAT(Defense):
    summary = "LAS-AT: a strategy net picks each image's PGD radius/steps/step size, trained by REINFORCE"
    progress_metrics = ("policy_updates", "policy_entropy", "policy_reward")
    # Grids, in units of the evaluation epsilon (radius, step) or counts (iterations). Paper's CIFAR ranges.
    epsilon_ratios: list[float] = field(default_factory=lambda: [i / 8 for i in range(3, 16)])  # 3..15/255 @ 8/255
    step_counts: list[int] = field(default_factory=lambda: list(range(3, 15)))  # 3..14 iterations
    step_size_ratios: list[float] = field(default_factory=lambda: [i / 8 for i in range(1, 6)])  # 1..5/255 @ 8/255
    random_start_ratio: float = 1.0  # start U(-r, r), r = this x eval eps (code: fixed 8/255), clipped to own ball
    label_smoothing: float = 0.3  # target loss; code's factor 0.7 = true-class target 1 - 0.3
    # Strategy-net updates (REINFORCE).
    # sized_to_run: interval and lr from the run's length (module docstring); paper: update_every, policy_lr.
    policy_schedule: Literal["sized_to_run", "paper"] = "sized_to_run"
    policy_updates_per_run: int = 64  # sized_to_run: target update count (default study: 141 batches -> k=2)
    policy_travel: float = 8.0  # sized_to_run: lr x updates (each update's gradient scaled to norm 1)
    update_every: int = 20  # paper's k (Table 1: k=20 for PGD-AT); sized_to_run: the sparsest interval
    alpha: float = 1.0  # weight of L2 (look-ahead robustness); code --b 1
    beta: float = 1.0  # weight of L3 (look-ahead clean accuracy); code --c 1
    reward: Literal["batch", "per_sample"] = "per_sample"  # per_sample: paper's estimator; batch: code (a scalar)
    # Subtracted from the reward in the policy gradient (module docstring). mean: per_sample -> the mean reward
    # of the batch's other images, batch -> a running mean of past updates' rewards; none: the code and paper.
    reward_baseline: Literal["none", "mean"] = "mean"
    policy_lr: float = 1e-4  # SGD without momentum (code); sized_to_run: the smallest lr
    policy_grad_clip: float = 1.0  # max grad norm of the strategy net (code)
    lookahead_lr: Optional[float] = None  # the copy's one SGD step; None: the target's current lr (the code)
    reward_pgd_steps: int = 10  # L2's attack on the copy (code: PGD-10, step 2/255 at 8/255, 2 restarts)
    reward_pgd_restarts: int = 2
    reward_pgd_alpha_ratio: float = 0.25
    strategy_width: int = 64  # channels of the strategy net's first stage (code: ResNet-18, 64)

    def __post_init__(self) -> None:
        for name in ("epsilon_ratios", "step_counts", "step_size_ratios"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must list at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has repeated values: {values}")
        if any(not (math.isfinite(v) and v > 0) for v in self.epsilon_ratios):
            raise ValueError(f"epsilon_ratios must be > 0, got {self.epsilon_ratios}")
        if any(not (math.isfinite(v) and v > 0) for v in self.step_size_ratios):
            raise ValueError(f"step_size_ratios must be > 0, got {self.step_size_ratios}")
        if any(v < 1 for v in self.step_counts):
            raise ValueError(f"step_counts must be >= 1, got {self.step_counts}")
        if self.random_start_ratio < 0:
            raise ValueError(f"random_start_ratio must be >= 0, got {self.random_start_ratio}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if self.policy_schedule not in ("sized_to_run", PAPER_POLICY_SCHEDULE):
            raise ValueError(f"policy_schedule must be 'sized_to_run' or 'paper', got {self.policy_schedule!r}")
        if self.reward_baseline not in ("none", "mean"):
            raise ValueError(f"reward_baseline must be 'none' or 'mean', got {self.reward_baseline!r}")
        if self.policy_updates_per_run < 1:
            raise ValueError(f"policy_updates_per_run must be >= 1, got {self.policy_updates_per_run}")
        if not (math.isfinite(self.policy_travel) and self.policy_travel > 0):
            raise ValueError(f"policy_travel must be > 0, got {self.policy_travel}")
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lookahead_lr is not None and not self.lookahead_lr > 0:
            raise ValueError(f"lookahead_lr must be > 0 (or null: the target's current lr), got {self.lookahead_lr}")
        for name in ("policy_lr", "policy_grad_clip", "reward_pgd_alpha_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("reward_pgd_steps", "reward_pgd_restarts", "strategy_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    # ----------------------------------------------------------------------------------------- cost
    def cost(self) -> Cost:
        mean_steps = sum(self.step_counts) / len(self.step_counts)
        # The run's interval is known once set up; before that, the paper's k (= a long run's interval).
        k = self.update_interval if hasattr(self, "update_interval") else self.update_every
        steps, restarts = self.reward_pgd_steps, self.reward_pgd_restarts
        extra_forward = mean_steps + 1 + 1 + restarts * (steps + 1) + 2
        extra_backward = mean_steps + 1 + restarts * steps
        return Cost(forward=mean_steps + 1 + extra_forward / k, backward=mean_steps + 1 + extra_backward / k,
                    auxiliary="strategy net (a small CNN up to 28x28, a ResNet-18 above): a forward every batch")

    # ---------------------------------------------------------------------------------------- setup
    def grids(self) -> dict[str, list[float]]:
        return {"epsilon": list(self.epsilon_ratios), "steps": list(self.step_counts),
                "step_size": list(self.step_size_ratios)}

    def setup(self, model: nn.Module, ctx: DefenseContext) -> None:
        super().setup(model, ctx)
        self._step = 0
        grids = self.grids()
        with torch.random.fork_rng(devices=[]):  # same initial strategy net on every worker
            torch.manual_seed(ctx.seed + 104_729)
            self.strategy = StrategyNet(ctx.input_shape, {h: len(g) for h, g in grids.items()},
                                        self.strategy_width).to(ctx.device)
        self.update_interval, policy_lr = self.policy_schedule_for(ctx.steps_per_epoch * ctx.epochs)
        self.policy_optimizer = torch.optim.SGD(self.strategy.parameters(), lr=policy_lr, momentum=0.0)
        self._grid_tensors = {h: torch.tensor(g, dtype=torch.float32, device=ctx.device) for h, g in grids.items()}
        self._lookahead: nn.Module | None = None
        self.batches_seen = 0
        self.policy_updates = 0
        self.reward_mean: Optional[float] = None  # running mean of past rewards (batch reward's baseline)
        self._stats = self._empty_stats()

    def policy_schedule_for(self, total_steps: int) -> tuple[int, float]:
        """(update interval, policy lr) for a run of `total_steps` batches. Every worker has the same number
        of batches, so all compute the same schedule and update the policy on the same batches."""
        if self.policy_schedule == PAPER_POLICY_SCHEDULE:
            return self.update_every, self.policy_lr
        return sized_policy_schedule(total_steps, self.policy_updates_per_run, self.update_every,
                                     self.policy_travel, self.policy_lr)

    def _empty_stats(self) -> dict[str, Tensor]:
        device = self.ctx.device
        stats = {f"{h}/count": torch.zeros(len(g), dtype=torch.float64, device=device)
                 for h, g in self.grids().items()}
        stats.update({f"{h}/entropy": torch.zeros(1, dtype=torch.float64, device=device) for h in HEADS})
        for name in ("samples", "updates", "reward", "r1", "r2", "r3"):
            stats[name] = torch.zeros(1, dtype=torch.float64, device=device)
        return stats

    # ------------------------------------------------------------------------------------- strategy
    def sample_strategy(self, x: Tensor) -> Strategy:
        """Draw one strategy per image (with gradients to the strategy net unless under no_grad)."""
        logits = self.strategy(x)
        index, log_prob, entropy = {}, {}, {}
        for head in HEADS:
            dist = Categorical(logits=logits[head])
            index[head] = dist.sample()
            log_prob[head] = dist.log_prob(index[head])
            entropy[head] = dist.entropy()
        eps = self.ctx.epsilon
        return Strategy(epsilon=self._grid_tensors["epsilon"][index["epsilon"]] * eps,
                        alpha=self._grid_tensors["step_size"][index["step_size"]] * eps,
                        steps=self._grid_tensors["steps"][index["steps"]].round().long(),
                        index=index, log_prob=log_prob, entropy=entropy)

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, strategy: Strategy) -> Tensor:
        return strategy_pgd(model, x, y, strategy.epsilon, strategy.alpha, strategy.steps,
                            self.random_start_ratio * self.ctx.epsilon)

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Strategy]:
        """The target step's examples: strategies drawn with the strategy net in eval mode."""
        self.strategy.eval()
        with torch.no_grad():
            strategy = self.sample_strategy(x)
        return self.attack(model, x, y, strategy), strategy

    # ---------------------------------------------------------------------------------------- reward
    def _lookahead_copy(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> nn.Module:
        """A copy of the target after one SGD step on (x_adv, y); the target itself is untouched."""
        if self._lookahead is None:
            self._lookahead = copy.deepcopy(model)
        else:
            self._lookahead.load_state_dict(model.state_dict())
        shadow = self._lookahead
        shadow.train(model.training)
        params = [p for p in shadow.parameters() if p.requires_grad]
        lookahead_lr = (self.lookahead_lr if self.lookahead_lr is not None
                        else self.ctx.current_learning_rate(self._step))
        loss = smoothed_cross_entropy(shadow(x_adv), y, self.label_smoothing)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g + LOOKAHEAD_WEIGHT_DECAY * p, alpha=-lookahead_lr)
        return shadow

    def compute_reward(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """Reward L1 + alpha L2 + beta L3 for examples x_adv (a scalar, or (B,) with reward='per_sample')."""
        per_sample = self.reward == "per_sample"
        with torch.no_grad():
            ce = F.cross_entropy(model(x_adv), y, reduction="none")
        r1 = (ce if per_sample else ce.mean()).clamp(0.0, L1_CLAMP)
        shadow = self._lookahead_copy(model, x_adv, y)
        eps = self.ctx.epsilon
        x_pgd = pgd(shadow, x, y, eps, alpha=self.reward_pgd_alpha_ratio * eps, steps=self.reward_pgd_steps,
                    restarts=self.reward_pgd_restarts)
        with torch.no_grad():
            robust = (shadow(x_pgd).argmax(1) == y).float()
            clean = (shadow(x).argmax(1) == y).float()
        if not per_sample:
            robust, clean = robust.mean(), clean.mean()
        r2, r3 = ROBUST_ACC_SCALE * robust, CLEAN_ACC_SCALE * clean
        reward = r1 + self.alpha * r2 + self.beta * r3
        return reward.detach(), {"r1": r1.detach(), "r2": r2, "r3": r3}

    def policy_step(self, log_prob: dict[str, Tensor], reward: Tensor) -> Tensor:
        """One REINFORCE step: loss = sum over heads of mean(-log pi(a) * reward); returns the loss. `reward` is
        what multiplies -log pi(a): the advantage (`advantage`) in `update_policy`."""
        reward = reward.detach()
        loss = sum((-lp * reward).mean() for lp in log_prob.values())
        self.policy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.strategy.parameters())
        self.ctx.average_gradients(params)
        norm = nn.utils.clip_grad_norm_(params, self.policy_grad_clip)
        if self.policy_schedule != PAPER_POLICY_SCHEDULE and 0 < norm < self.policy_grad_clip:
            for p in params:  # sized_to_run: every update's gradient has norm policy_grad_clip (not only at most)
                if p.grad is not None:
                    p.grad.mul_(self.policy_grad_clip / norm)
        self.policy_optimizer.step()
        return loss.detach()

    def advantage(self, reward: Tensor) -> Tensor:
        """The reward minus its baseline (`reward_baseline`): what multiplies -log pi(a) in the policy loss."""
        if self.reward_baseline == "none":
            return reward
        if reward.dim():  # per_sample: each image against the mean of the batch's others (leave-one-out)
            n = reward.numel()
            return reward - (reward.sum() - reward) / (n - 1) if n > 1 else torch.zeros_like(reward)
        value = float(reward)  # batch: against the running mean of the earlier updates' rewards
        previous = self.reward_mean
        self.reward_mean = value if previous is None else previous + BASELINE_RATE * (value - previous)
        return reward - previous if previous is not None else torch.zeros_like(reward)

    def update_policy(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.strategy.train()
        strategy = self.sample_strategy(x)
        x_adv = self.attack(model, x, y, strategy)
        reward, parts = self.compute_reward(model, x, y, x_adv)
        self.policy_step(strategy.log_prob, self.advantage(reward))
        self.policy_updates += 1
        stats = self._stats
        stats["updates"] += 1
        stats["reward"] += reward.mean()
        for name, value in parts.items():
            stats[name] += value.mean()
        return reward

    # ----------------------------------------------------------------------------------------- hooks
    def train_step(self, model, x, y, idx, step, update) -> StepResult:
        self._step = step  # the look-ahead copy steps with the loop's learning rate at this step
        self.batches_seen += 1
        if self.batches_seen % self.update_interval == 0:
            self.update_policy(model, x, y)
        x_adv, strategy = self.adversarial_examples(model, x, y)
        logits = model(x_adv)
        loss = smoothed_cross_entropy(logits, y, self.label_smoothing)
        update(loss)
        self._record(strategy)
        return StepResult(loss.detach(), logits.detach())

    def _record(self, strategy: Strategy) -> None:
        stats = self._stats
        for head in HEADS:
            count = stats[f"{head}/count"]
            count += torch.bincount(strategy.index[head], minlength=count.numel()).to(count.dtype)
            stats[f"{head}/entropy"] += strategy.entropy[head].sum().to(torch.float64)
        stats["samples"] += strategy.steps.numel()

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        names = sorted(self._stats)
        flat = torch.cat([self._stats[n] for n in names])
        self.ctx.all_reduce_sum(flat)  # every worker's share of the epoch
        merged, offset = {}, 0
        for n in names:
            size = self._stats[n].numel()
            merged[n] = flat[offset:offset + size]
            offset += size
        metrics: dict[str, float] = {}
        samples = max(float(merged["samples"]), 1.0)
        for head, grid in self.grids().items():
            fractions = (merged[f"{head}/count"] / samples).tolist()
            for i, fraction in enumerate(fractions):
                metrics[f"las/{head}/p_{i}"] = fraction
            metrics[f"las/{head}/mean"] = float(sum(f * g for f, g in zip(fractions, grid)))
            metrics[f"las/{head}/entropy"] = float(merged[f"{head}/entropy"]) / samples
        updates = float(merged["updates"])  # summed over workers, as are the reward sums
        metrics["las/policy_updates"] = updates / self.ctx.world_size
        if updates:  # an epoch shorter than k batches has no policy update
            for name in ("reward", "r1", "r2", "r3"):
                metrics[f"las/{name}"] = float(merged[name]) / updates
            metrics["policy_reward"] = metrics["las/reward"]
        metrics["policy_updates"] = float(self.policy_updates)  # since the start (the same on every worker)
        metrics["policy_entropy"] = sum(metrics[f"las/{head}/entropy"] for head in HEADS)
        self._average_buffers()
        self._stats = self._empty_stats()
        return metrics

    def _average_buffers(self) -> None:
        # BatchNorm statistics of the strategy net: workers saw different batches.
        if self.ctx.world_size <= 1:
            return
        for buffer in self.strategy.buffers():
            if buffer.is_floating_point():
                self.ctx.all_reduce_sum(buffer)
                buffer /= self.ctx.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict(), "optimizer": self.policy_optimizer.state_dict(),
                "batches_seen": self.batches_seen, "policy_updates": self.policy_updates,
                "update_interval": self.update_interval, "reward_mean": self.reward_mean,
                "stats": {k: v.clone() for k, v in self._stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.policy_optimizer.load_state_dict(state["optimizer"])
        self.batches_seen = int(state["batches_seen"])
        self.policy_updates = int(state["policy_updates"])
        # A resumed run keeps the cadence it started with (its lr comes back with the optimizer's state).
        self.update_interval = int(state.get("update_interval", self.update_interval))
        self.reward_mean = state.get("reward_mean")
        for name, value in state["stats"].items():
            if name not in self._stats or self._stats[name].shape != value.shape:
                raise ValueError(f"las_at checkpoint statistics {name!r} do not fit this defense's grids")
            self._stats[name].copy_(value)
