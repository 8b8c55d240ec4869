"""Calibration of EAE's threshold gamma: the paper's "MLD of seed examples" rule, on the validation split.

Qian et al. (eae-latent-space-at.txt, Sec. 4.1 and 6.2): take a pretrained model, keep the examples it
classifies correctly (candidate seed examples), run FGSM at the target epsilon, and split them into *seed*
examples (fooled) and non-seed examples (not fooled). The logit difference LD = z_y - max_{j != y} z_j of the
clean input is small for seed examples and large for the others; gamma = the mean LD (MLD) of the seed
examples. This module measures both distributions on the held-out VALIDATION split (never the test split)
and prints them with the suggested gamma.

    robustune calibrate-eae --checkpoint runs/<standard run>/final.pt [--epsilon 8/255] [--examples 2000]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustune.attacks import fgsm

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


# ------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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


def load_trained_model(checkpoint: str | Path, overrides: list[str] | None = None,
                       device: str | torch.device = "cpu"):
    """(model with the checkpoint's weights, resolved config) from a final.pt, checkpoint folder or run folder."""
    import yaml

    from robustune.checkpoints import CheckpointError, load_checkpoint, model_weights_from
    from robustune.config import ConfigError, apply_override, parse_override, resolve_config
    from robustune.data import dataset_info
    from robustune.models import create_model
    from robustune.training import CONFIG_FILE, FINAL_MODEL_FILE

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    config_dict: dict[str, Any] | None = None
    if path.is_dir() and (path / CONFIG_FILE).is_file():  # a run folder: its final weights, else its latest
        config_dict = yaml.safe_load((path / CONFIG_FILE).read_text())
        if (path / FINAL_MODEL_FILE).is_file():
            state = load_checkpoint(path / FINAL_MODEL_FILE)
            weights = state.get("model")
        else:
            weights = model_weights_from(path)
    else:
        state = load_checkpoint(path)
        weights = state.get("model")
        config_dict = state.get("config")
    if weights is None:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"checkpoint {path} holds no run config; pass a final.pt, a checkpoint folder "
                              f"or a run folder written by `robustune train`")
    for text in overrides or []:
        config_dict = apply_override(config_dict, *parse_override(text))
    config = resolve_config(config_dict)
    info = dataset_info(config.data.name)
    model = create_model(config.model_name, num_classes=info.num_classes, input_shape=info.input_shape,
                         mean=info.mean, std=info.std, **config.model_kwargs)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {path} does not fit model {config.model_name!r}: "
                          f"{str(error).splitlines()[0]}") from error
    return model.to(device), config


def command(args: argparse.Namespace) -> int:
    """`robustune calibrate-eae`: print both LD distributions and the suggested gamma; 0 on success, 2 on a
    user error (bad path, config, data)."""
    from robustune.checkpoints import CheckpointError
    from robustune.config import ConfigError, parse_number
    from robustune.data import DataError, load_dataset
    from robustune.models import ModelError

    try:
        if args.examples < 1:
            raise ConfigError(f"--examples must be >= 1, got {args.examples}")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, config = load_trained_model(args.checkpoint, args.overrides, device)
        epsilon = config.epsilon if args.epsilon is None else parse_number(args.epsilon, "--epsilon")
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"--epsilon must be in [0, 1], got {epsilon}")
        data = config.data
        splits = load_dataset(data.name, data_dir=data.data_dir, val_size=data.val_size,
                              train_subset=data.train_subset, test_subset=data.test_subset, seed=config.seed,
                              download=data.download)
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
