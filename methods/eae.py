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
--checkpoint runs/<run>/final.pt` measures it on the validation split (`calibrate_eae` below). Reported MLDs:
3.63 (eps=0.01) to 5.98 (eps=0.05) on CIFAR-10/ResNet-18, 1.86 to 5.17 on ImageNet-100/AlexNet; thumb rule
gamma in [2, 4]; a larger gamma costs clean accuracy (~6 points over the range) for < 1.6 points robustness.
Default gamma = 3.63, the value of the paper's main CIFAR-10 experiment (Sec. 6.4). With
`calibrate_gamma: true` the run applies the rule itself before its first step, on the warm-start model and
the run's validation split (never test), and logs the gamma it trained with as `train/gamma`; the studies do
that, so EAE runs there as its paper runs it: a pretrained model fine-tuned with a calibrated gamma.

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

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustune.attacks import fgsm
from robustune.defense import Cost, Defense, DefenseCommand, StepResult, register_defense

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
    # commands: `robustune calibrate-eae`, set at the end of this module (its functions are defined below)
    gamma: float = 3.63  # LD threshold; paper's CIFAR-10 run (MLD of FGSM seed examples at eps 0.01); thumb rule 2-4
    top_class: Literal["label", "predicted"] = "label"  # see the module docstring: misclassified examples
    # Set gamma by the paper's rule before training: the mean LD of the validation examples that FGSM fools on
    # the warm-start model (needs train.init_from and a validation split); `gamma` above is then not used.
    calibrate_gamma: bool = False

    def __post_init__(self) -> None:
        if not self.gamma >= 0:  # also rejects NaN
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.top_class not in TOP_CLASS_CHOICES:
            raise ValueError(f"top_class must be one of {TOP_CLASS_CHOICES}, got {self.top_class!r}")
        if not isinstance(self.calibrate_gamma, bool):
            raise ValueError(f"calibrate_gamma must be true or false, got {self.calibrate_gamma!r}")

    def cost(self) -> Cost:
        return Cost(forward=1, backward=1)

    def setup(self, model, ctx) -> None:
        super().setup(model, ctx)
        if not self.calibrate_gamma or ctx.restoring:  # restoring: the checkpoint's state holds the calibrated gamma
            return
        if not ctx.warm_started:
            raise ValueError("eae: calibrate_gamma measures gamma on a pretrained model; set train.init_from to a "
                             "trained run's final.pt (in a study: init_from: <entry>), or set method.gamma instead")
        if ctx.validation is None:
            raise ValueError("eae: calibrate_gamma needs validation data (data.val_size > 0), or set method.gamma")
        images, labels = ctx.validation
        result = calibrate_eae(model, images, labels, epsilon=ctx.epsilon)
        if result["suggested_gamma"] is None:
            raise ValueError(f"eae: calibrate_gamma: FGSM at epsilon {ctx.epsilon} fooled none of the "
                             f"{result['correct']} correctly classified validation examples, so the paper's rule "
                             "gives no gamma; set method.gamma instead")
        # Calibrated once, before any training step; a resumed run gets this value back from its checkpoint.
        self.gamma = result["suggested_gamma"]

    def on_epoch_end(self, model, epoch) -> dict[str, float]:
        return {"gamma": float(self.gamma)}  # the threshold this run trained with (calibrated or set)

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": float(self.gamma)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # checkpoints from before gamma was kept hold nothing: the gamma set at setup stands
            self.gamma = float(state["gamma"])

    def loss(self, model, x, y, idx, step) -> StepResult:
        logits = model(x)
        moved_logits, moved, ld = endogenous_logits(logits, y, self.gamma, self.top_class)
        metrics = {"eae_fraction": moved.float().mean().item()}  # share of the batch moved to the boundary
        return StepResult(F.cross_entropy(moved_logits, y), logits, metrics)


# ------------------------------------------------------------- calibrating gamma (the paper's MLD rule)
# On a trained model: LD of the correctly classified validation examples, split by whether FGSM at epsilon
# fools them (seed examples) or not; gamma = mean LD of the seed examples (Sec. 4.1 and 6.2).
QUANTILES = (10, 25, 50, 75, 90)
HISTOGRAM_BINS = 12


def logit_difference(logits: Tensor, labels: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j per example (positive: correctly classified, with that margin)."""
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    return true_logit - logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)


def summarize(values: Tensor) -> dict[str, Any]:
    """count, mean, std and the 10/25/50/75/90 % quantiles of a 1-D tensor (None where it is empty)."""
    values = values.detach().double().cpu()
    count = int(values.numel())
    summary: dict[str, Any] = {"count": count}
    if count == 0:
        summary.update({"mean": None, "std": None, **{f"q{q}": None for q in QUANTILES}})
        return summary
    summary["mean"] = float(values.mean())
    summary["std"] = float(values.std(unbiased=False))
    quantiles = torch.quantile(values, torch.tensor([q / 100 for q in QUANTILES], dtype=torch.float64))
    summary.update({f"q{q}": float(v) for q, v in zip(QUANTILES, quantiles)})
    return summary


def _histogram(fooled: Tensor, not_fooled: Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    both = torch.cat([fooled, not_fooled]).double().cpu()
    if both.numel() == 0:
        return {"edges": [], "fooled": [], "not_fooled": []}
    low, high = float(both.min()), float(both.max())
    if high <= low:
        high = low + 1.0
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)

    def counts(values: Tensor) -> list[int]:
        if values.numel() == 0:
            return [0] * bins
        return torch.histc(values.double().cpu(), bins=bins, min=low, max=high).round().long().tolist()

    return {"edges": edges.tolist(), "fooled": counts(fooled), "not_fooled": counts(not_fooled)}


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def calibrate_eae(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float,
                  batch_size: int = 500) -> dict[str, Any]:
    """FGSM (zero start, one step of epsilon) on the correctly classified examples; LD distributions of the
    fooled (seed) and not fooled (non-seed) ones, and `suggested_gamma` = mean LD of the fooled ones (None when
    FGSM fooled none). `images` in [0, 1] (uint8 is divided by 255) on any device; runs on the model's device
    in eval mode (the mode is restored afterwards)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    fooled_ld, kept_ld = [], []
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device)
            x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
            y = labels[start:start + batch_size].to(device).long()
            logits = _predict(model, x)
            correct = logits.argmax(1) == y
            if not correct.any():
                continue
            x, y, ld = x[correct], y[correct], logit_difference(logits[correct], y[correct])
            x_adv = fgsm(model, x, y, epsilon)
            fooled = _predict(model, x_adv).argmax(1) != y
            fooled_ld.append(ld[fooled].cpu())
            kept_ld.append(ld[~fooled].cpu())
    finally:
        model.train(was_training)
    fooled_all = torch.cat(fooled_ld) if fooled_ld else torch.empty(0)
    kept_all = torch.cat(kept_ld) if kept_ld else torch.empty(0)
    fooled_summary = summarize(fooled_all)
    return {
        "epsilon": float(epsilon),
        "examples": int(len(labels)),
        "correct": int(fooled_all.numel() + kept_all.numel()),
        "fooled": fooled_summary,
        "not_fooled": summarize(kept_all),
        "histogram": _histogram(fooled_all, kept_all),
        "suggested_gamma": fooled_summary["mean"],
    }


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_calibration(result: dict[str, Any]) -> str:
    """Readable text: both LD distributions (summary table and a side-by-side text histogram) and the gamma."""
    eps = result["epsilon"]
    lines = [f"EAE calibration: FGSM at epsilon {eps:.4g} (= {eps * 255:.3g}/255) on {result['examples']} "
             f"validation examples, {result['correct']} classified correctly",
             "logit difference LD = z_label - max_other z on the clean input, by FGSM outcome:", ""]
    header = f"  {'':<22}{'count':>7}{'mean':>9}{'std':>9}" + "".join(f"{'q' + str(q):>9}" for q in QUANTILES)
    lines.append(header)
    for key, name in (("fooled", "fooled (seed)"), ("not_fooled", "not fooled (non-seed)")):
        s = result[key]
        lines.append(f"  {name:<22}{s['count']:>7}{_number(s['mean']):>9}{_number(s['std']):>9}"
                     + "".join(f"{_number(s[f'q{q}']):>9}" for q in QUANTILES))
    hist = result.get("histogram") or {}
    if hist.get("edges"):
        width = 30
        peak = max(max(hist["fooled"]), max(hist["not_fooled"]), 1)
        lines += ["", f"  {'LD bin':<18}{'fooled':<{width + 8}}not fooled"]
        edges = hist["edges"]
        for i, (a, b) in enumerate(zip(hist["fooled"], hist["not_fooled"])):
            bar_a = "#" * round(width * a / peak)
            bar_b = "=" * round(width * b / peak)
            lines.append(f"  [{edges[i]:7.2f},{edges[i + 1]:7.2f}) {a:>5} {bar_a:<{width}}  {b:>5} {bar_b}")
    lines.append("")
    gamma = result.get("suggested_gamma")
    if gamma is None:
        lines.append("suggested gamma: none (FGSM fooled no correctly classified example at this epsilon; "
                     "try a larger --epsilon)")
    else:
        lines.append(f"suggested gamma: {gamma:.3f}  (mean LD of the fooled examples, the paper's MLD rule; "
                     "paper's thumb rule: 2-4)")
    return "\n".join(lines)


# ------------------------------------------------------------------------ the calibrate-eae command
def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `calibrate-eae` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "calibrate-eae",
        help="suggest EAE's gamma for a trained model (mean logit gap of FGSM-fooled validation examples)",
        description="Run FGSM at epsilon on the validation examples a trained model classifies correctly and "
                    "compare the logit difference (top minus runner-up) of those it fools with those it does "
                    "not; the suggested gamma for `robustune train eae` is the mean over the fooled ones (Qian "
                    "et al.'s 'MLD of seed examples'). Uses the validation split of the run's dataset, never "
                    "the test split.",
        epilog="example: robustune calibrate-eae --checkpoint runs/standard-fashion-mnist-.../final.pt "
               "--epsilon 0.1",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a robustune final.pt, a checkpoint folder (epoch_NNN) or a run folder")
    parser.add_argument("--epsilon", default=None, metavar="EPS",
                        help="FGSM radius in [0, 1], fractions such as 8/255 accepted (default: the run's)")
    parser.add_argument("--examples", type=int, default=2000, metavar="N",
                        help="validation examples to use (default 2000)")
    parser.add_argument("--batch-size", type=int, default=500, metavar="B", help="batch size (default 500)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a setting of the run's config, e.g. --set data.data_dir=DIR (repeatable)")
    return parser


def calibrate_command(args: argparse.Namespace) -> int:
    """`robustune calibrate-eae`: print both LD distributions and the suggested gamma; 0 on success, 2 on a
    user error (bad path, config, data)."""
    # Imported here: the registry imports this module early, and robustune.run imports robustune.defense.
    from robustune.checkpoints import CheckpointError
    from robustune.config import ConfigError, apply_override, parse_number, parse_override
    from robustune.data import DataError
    from robustune.models import ModelError
    from robustune.run import load_trained

    def overrides(config_data: dict[str, Any]) -> dict[str, Any]:
        for text in args.overrides:
            config_data = apply_override(config_data, *parse_override(text))
        return config_data

    try:
        if args.examples < 1:
            raise ConfigError(f"--examples must be >= 1, got {args.examples}")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        trained = load_trained(args.checkpoint, overrides=overrides, device=device)
        model, config, splits = trained.model, trained.config, trained.splits
        epsilon = config.epsilon if args.epsilon is None else parse_number(args.epsilon, "--epsilon")
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"--epsilon must be in [0, 1], got {epsilon}")
        if splits.val is None:
            raise ConfigError("the run has no validation split (data.val_size=0); calibration never uses the "
                              "test split: pass --set data.val_size=N")
        count = min(args.examples, len(splits.val))
        result = calibrate_eae(model, splits.val.images[:count], splits.val.labels[:count], epsilon=epsilon,
                               batch_size=args.batch_size)
    except (ConfigError, CheckpointError, DataError, ModelError, ValueError) as error:
        print(f"robustune calibrate-eae: error: {error}", file=sys.stderr)
        return 2
    print(f"model {config.model_name} on {config.data.name} from {args.checkpoint}")
    print(format_calibration(result))
    gamma = result["suggested_gamma"]
    if gamma is not None and math.isfinite(gamma):
        print(f"\ntrain with it: robustune train eae --set method.gamma={gamma:.3f} "
              f"--set train.init_from={args.checkpoint}")
    return 0


EAE.commands = (DefenseCommand("calibrate-eae", add_parser=add_calibrate_parser, run=calibrate_command),)
