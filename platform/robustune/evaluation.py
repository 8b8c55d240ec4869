"""Final robustness evaluation: clean accuracy, PGD and AutoAttack on a fixed test set, as one JSON report.

`evaluate` runs, in order, clean accuracy on all N examples, PGD (our `robustune.attacks.pgd`, seeded) on all N,
and AutoAttack (pyautoattack) on the first `config.autoattack_points` examples. Everything is deterministic
given `seed`; the report's numbers are reproducible, only `seconds` varies.

AutoAttack and pyautoattack 0.2.0: its own resume (`state_path=`) cannot work: the state file stores the attack
set as `str(set)`, so reloading always fails with "different set of attacks"; a restored state also leaves
`y_adv` unassigned (UnboundLocalError) and a state written before the clean pass ends cannot be loaded.
So we run AutoAttack the way `run_standard_evaluation` does internally -- each attack in turn, on the points
still robust, in batches of `batch_size` in index order, every call seeded with `seed` -- but one pyautoattack
call per (attack, batch), and checkpoint the robust flags after every batch in our own state file. An
uninterrupted run gives exactly the flags a single pyautoattack call would; a resumed run gives the same
flags as an uninterrupted one (the batches left to do are the same batches).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from robustune.attacks import accuracy_counts, pgd
from robustune.config import EvalConfig

__all__ = ["PROTOCOL", "FAST_ATTACKS", "STANDARD_ATTACKS", "evaluate", "format_report", "build_autoattack"]

PROTOCOL = "robustune-final/1"
STATE_FORMAT = "robustune-autoattack-state/1"
STATE_FILE = "autoattack_state.json"
FAST_ATTACKS = ("apgd-ce", "apgd-t")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
BALL_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------ helpers
def _package_version() -> str:
    import pyautoattack

    return f"pyautoattack {getattr(pyautoattack, '__version__', 'unknown')}"


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _check_adversarial(x_adv: Tensor, x: Tensor, epsilon: float, what: str) -> None:
    """Raise if an attack left the epsilon-ball or the image box (a bug, never a property of the model)."""
    x_adv, x = x_adv.detach().cpu(), x.detach().cpu()
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{what}: adversarial examples have the wrong shape or non-finite values")
    distance = (x_adv - x).abs().amax().item() if x.numel() else 0.0
    if distance > epsilon + BALL_TOLERANCE:
        raise RuntimeError(f"{what}: adversarial examples are {distance:.6g} from the inputs in Linf, "
                           f"more than epsilon {epsilon:.6g}")
    if x_adv.numel() and (x_adv.min().item() < 0.0 or x_adv.max().item() > 1.0):
        raise RuntimeError(f"{what}: adversarial examples leave [0, 1] "
                           f"(min {x_adv.min().item():.6g}, max {x_adv.max().item():.6g})")


def _autoattack_list(version: str, n_classes: int) -> tuple[list[str], list[str]]:
    """Attacks to run for 'fast'/'standard'/'none', and warnings about attacks that cannot run."""
    if version == "none":
        return [], []
    attacks = list(FAST_ATTACKS if version == "fast" else STANDARD_ATTACKS)
    notes = []
    if n_classes < 4 and "apgd-t" in attacks:
        # The targeted DLR loss reads the 4th-largest logit; pyautoattack would crash with an IndexError.
        attacks.remove("apgd-t")
        notes.append(f"AutoAttack: apgd-t skipped, its targeted DLR loss needs >= 4 classes (model has {n_classes})")
    if n_classes < 2 and "fab-t" in attacks:
        attacks.remove("fab-t")
        notes.append(f"AutoAttack: fab-t skipped, it needs >= 2 classes (model has {n_classes})")
    return attacks, notes


def build_autoattack(model: nn.Module, *, epsilon: float, attacks: Sequence[str], n_classes: int,
                     device: torch.device | str, seed: int):
    """A pyautoattack AutoAttack (version 'custom') with the per-attack settings of version 'standard'.

    Mirrors `AutoAttack._set_version('standard')` for Linf; version 'custom' alone would keep the constructor
    defaults (5 restarts for APGD-CE and FAB). Target counts are capped at n_classes - 1, the most there are
    (standard uses 9, i.e. all of them on 10 classes; more would index past the logits).
    """
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=epsilon, version="custom", attacks=list(attacks),
                    device=device, seed=seed)
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = min(9, n_classes - 1)
    aa.fab.n_restarts = 1
    aa.fab.n_target_classes = min(9, n_classes - 1)
    aa.square.n_queries = 5000
    aa.verbose = False  # its debug chatter (per-batch counts) is not wanted; we log one line per attack
    return aa


def _fingerprint(model: nn.Module, x: Tensor, y: Tensor, epsilon: float, attacks: list[str], seed: int,
                 batch_size: int) -> dict:
    """What an AutoAttack state belongs to: a state from another model, data or setting must not be reused."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for name, t in tensors:
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    return {"model": digest(model.state_dict().items()), "data": digest([("x", x), ("y", y)]),
            "epsilon": float(epsilon), "attacks": list(attacks), "seed": int(seed),
            "batch_size": int(batch_size), "n": int(x.shape[0]), "package": _package_version()}


def _load_state(path: Path, fingerprint: dict, log: Callable[[str], None]) -> dict | None:
    """The saved AutoAttack progress if it belongs to this evaluation, else None (the stale file is ignored)."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
            log(f"eval: ignoring {path} (saved for another model, data or AutoAttack setting); starting afresh")
            return None
        n = fingerprint["n"]
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        attacked = {a: torch.tensor(state["attacked"][a], dtype=torch.bool) for a in fingerprint["attacks"]}
        if robust.shape != (n,) or any(v.shape != (n,) for v in attacked.values()):
            raise ValueError("flag lists have the wrong length")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log(f"eval: ignoring unreadable AutoAttack state {path} ({error}); starting afresh")
        return None
    return {"robust": robust, "attacked": attacked}


def _save_state(path: Path, fingerprint: dict, robust: Tensor, attacked: dict[str, Tensor]) -> None:
    """Write atomically, so an interruption mid-write leaves the previous checkpoint intact."""
    data = {"format": STATE_FORMAT, "fingerprint": fingerprint, "robust": robust.int().tolist(),
            "attacked": {a: flags.int().tolist() for a, flags in attacked.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class _CollectWarnings(logging.Handler):
    """Collects pyautoattack's check messages (it logs them to 'auto-attack' at WARNING)."""

    def __init__(self, sink: list[str]):
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def _summarize_warnings(messages: list[str]) -> list[str]:
    """Unique messages in first-seen order; repeats (one per batch or target class) become a count."""
    counts: dict[str, int] = {}
    for message in messages:
        counts[message] = counts.get(message, 0) + 1
    return [m if c == 1 else f"{m} (x{c})" for m, c in counts.items()]


# ----------------------------------------------------------------------------------------- phases
@torch.no_grad()
def _clean_predictions(model: nn.Module, images: Tensor, batch_size: int,
                       device: torch.device) -> tuple[Tensor, int]:
    """Predicted labels (N,) on the CPU, and the number of classes (logit width)."""
    preds = []
    n_classes = None
    for start, end in _batches(images.shape[0], batch_size):
        logits = model(images[start:end].to(device))
        n_classes = logits.shape[1]
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds), n_classes


def _pgd_correct(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float, alpha: float, config: EvalConfig,
                 device: torch.device, seed: int) -> int:
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for start, end in _batches(images.shape[0], config.batch_size):
        x, y = images[start:end].to(device), labels[start:end].to(device)
        x_adv = pgd(model, x, y, epsilon, alpha=alpha, steps=config.pgd_steps, restarts=config.pgd_restarts,
                    random_start=True, loss="ce", generator=generator)
        _check_adversarial(x_adv, x, epsilon, "PGD")
        correct += accuracy_counts(model, x_adv, y)
    return correct


def _run_autoattack(model: nn.Module, x: Tensor, y: Tensor, clean_correct: Tensor, *, epsilon: float,
                    attacks: list[str], n_classes: int, batch_size: int, device: torch.device, seed: int,
                    state_path: Path | None, log: Callable[[str], None], messages: list[str]) -> tuple[Tensor, bool]:
    """Robust flags (n,) after every attack in `attacks`; and whether saved progress was resumed."""
    import pyautoattack.checks

    # pyautoattack's dynamic-defense check counts calls in a module-global dict it never resets: without
    # this, a model evaluated after a test-time defense in the same process is flagged as dynamic too.
    for name in pyautoattack.checks.funcs:
        pyautoattack.checks.funcs[name] = 0
    robust = clean_correct.clone()
    attacked = {a: torch.zeros_like(robust) for a in attacks}
    fingerprint = None
    resumed = False
    if state_path is not None:
        fingerprint = _fingerprint(model, x, y, epsilon, attacks, seed, batch_size)
        state = _load_state(state_path, fingerprint, log)
        if state is not None:
            robust, attacked, resumed = state["robust"], state["attacked"], True
            done = sum(int(v.sum()) for v in attacked.values())
            log(f"eval: AutoAttack resumes from {state_path} ({done} point-attacks already done)")
        else:
            _save_state(state_path, fingerprint, robust, attacked)

    for attack in attacks:
        start_time = time.perf_counter()
        # Like run_standard_evaluation: this attack sees only the points still robust, in index order.
        todo = torch.nonzero(robust & ~attacked[attack]).flatten()
        for start, end in _batches(len(todo), batch_size):
            idx = todo[start:end]
            xb, yb = x[idx], y[idx]
            aa = build_autoattack(model, epsilon=epsilon, attacks=[attack], n_classes=n_classes,
                                  device=device, seed=seed)
            x_adv, y_adv = aa.run_standard_evaluation(xb, yb, batch_size=len(idx))
            # y_adv is the model's prediction on x_adv as the attack left it (the clean prediction where the
            # attack failed); robust = y_adv == y. Check the examples and that the predictions reproduce.
            _check_adversarial(x_adv, xb, epsilon, f"AutoAttack {attack}")
            y_adv = y_adv.cpu()
            with torch.no_grad():
                again = model(x_adv.to(device)).argmax(1).cpu()
            if (again != y_adv).any():
                messages.append(f"AutoAttack {attack}: {int((again != y_adv).sum())} predictions on the "
                                "adversarial examples changed when re-evaluated (non-deterministic model?)")
            robust[idx] = y_adv == yb
            attacked[attack][idx] = True
            if state_path is not None:
                _save_state(state_path, fingerprint, robust, attacked)
        log(f"eval: AutoAttack {attack}: robust {robust.float().mean().item():.4f} on {len(robust)} points "
            f"({len(todo)} attacked) in {time.perf_counter() - start_time:.1f}s")
    return robust, resumed


# --------------------------------------------------------------------------------------------- API
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float, config: EvalConfig,
             device: torch.device | str = "cpu", seed: int = 0, state_dir: Path | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Clean, PGD and AutoAttack accuracy of `model` on (images, labels) under an Linf radius `epsilon`.

    images: float (N, C, H, W) in [0, 1] on the CPU (moved to `device` batch by batch); labels: int64 (N,).
    The model maps [0, 1] inputs to logits. It is put in eval mode for the whole evaluation (each module's
    mode is restored afterwards) and its parameters stop requiring gradients meanwhile (FAB calls
    .backward(), which would otherwise accumulate into .grad). The global torch RNG is left as it was
    (pyautoattack reseeds it). With `state_dir`, AutoAttack progress is checkpointed to
    state_dir/autoattack_state.json and a later call with the same model and data resumes from it.
    Returns the JSON-serializable report described in the module docs (`PROTOCOL`).
    """
    device = torch.device(device)
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"evaluate needs images (N, C, H, W) and labels (N,) with N > 0, "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    images, labels = images.detach().cpu().float(), labels.detach().cpu().long()
    n = images.shape[0]
    alpha = config.pgd_alpha_ratio * epsilon

    modes = {module: module.training for module in model.modules()}
    grad_flags = {param: param.requires_grad for param in model.parameters()}
    model.eval()
    for param in grad_flags:
        param.requires_grad_(False)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            # 1. clean
            t0 = time.perf_counter()
            preds, n_classes = _clean_predictions(model, images, config.batch_size, device)
            clean_correct = preds == labels
            clean_acc = clean_correct.float().mean().item()
            seconds_clean = time.perf_counter() - t0
            log(f"eval: clean acc {clean_acc:.4f} on {n} points in {seconds_clean:.1f}s")

            # 2. PGD
            t0 = time.perf_counter()
            pgd_acc = _pgd_correct(model, images, labels, epsilon=epsilon, alpha=alpha, config=config,
                                   device=device, seed=seed) / n
            seconds_pgd = time.perf_counter() - t0
            restarts = "restart" if config.pgd_restarts == 1 else "restarts"
            log(f"eval: PGD-{config.pgd_steps} ({config.pgd_restarts} {restarts}) acc {pgd_acc:.4f} "
                f"on {n} points in {seconds_pgd:.1f}s")

            # 3. AutoAttack on the first autoattack_points examples
            attacks, messages = _autoattack_list(config.autoattack, n_classes)
            aa_acc = aa_clean_acc = None
            n_aa, seconds_aa, resumed = 0, 0.0, False
            if config.autoattack != "none":
                n_aa = min(n, config.autoattack_points)
                t0 = time.perf_counter()
                aa_logger = logging.getLogger("auto-attack")
                handler = _CollectWarnings(messages)
                saved = (aa_logger.level, aa_logger.propagate)
                aa_logger.addHandler(handler)
                aa_logger.setLevel(logging.WARNING)
                aa_logger.propagate = False  # its warnings go to the report and `log`, not to stderr
                state_path = None
                if state_dir is not None:
                    Path(state_dir).mkdir(parents=True, exist_ok=True)
                    state_path = Path(state_dir) / STATE_FILE
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        robust, resumed = _run_autoattack(
                            model, images[:n_aa], labels[:n_aa], clean_correct[:n_aa], epsilon=epsilon,
                            attacks=attacks, n_classes=n_classes, batch_size=config.batch_size, device=device,
                            seed=seed, state_path=state_path, log=log, messages=messages)
                    messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
                finally:
                    aa_logger.removeHandler(handler)
                    aa_logger.setLevel(saved[0])
                    aa_logger.propagate = saved[1]
                aa_acc = robust.float().mean().item()
                aa_clean_acc = clean_correct[:n_aa].float().mean().item()
                seconds_aa = time.perf_counter() - t0
                log(f"eval: AutoAttack {config.autoattack} [{', '.join(attacks)}] acc {aa_acc:.4f} "
                    f"on {n_aa} points in {seconds_aa:.1f}s")
            report_warnings = _summarize_warnings(messages)
            for message in report_warnings:
                log(f"eval: warning: {message}")
    finally:
        for module, training in modes.items():
            module.training = training
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)

    autoattack = {"version": config.autoattack, "attacks": attacks, "package": _package_version()}
    if config.autoattack != "none":
        autoattack["resumed"] = resumed
    return {
        "protocol": PROTOCOL,
        "epsilon": float(epsilon), "norm": "Linf",
        "clean_acc": clean_acc, "n_clean": n,
        "pgd_acc": pgd_acc, "n_pgd": n,
        "pgd": {"steps": config.pgd_steps, "restarts": config.pgd_restarts, "alpha": float(alpha),
                "alpha_ratio": float(config.pgd_alpha_ratio), "loss": "ce", "random_start": True},
        "aa_acc": aa_acc, "n_aa": n_aa, "autoattack": autoattack,
        "aa_clean_acc": aa_clean_acc,
        "warnings": report_warnings,
        "seconds": {"clean": seconds_clean, "pgd": seconds_pgd, "autoattack": seconds_aa},
        "seed": int(seed),
    }


def format_report(report: dict) -> str:
    """A few lines naming each attack, its steps/restarts, epsilon and the number of points."""
    pgd_cfg, aa = report["pgd"], report["autoattack"]
    rows = [("clean", f"{report['clean_acc']:.4f} ({report['n_clean']} pts)"),
            (f"PGD-{pgd_cfg['steps']}x{pgd_cfg['restarts']} (alpha {pgd_cfg['alpha']:.4f}, {pgd_cfg['loss'].upper()})",
             f"{report['pgd_acc']:.4f} ({report['n_pgd']} pts)")]
    if report["aa_acc"] is None:
        rows.append(("AutoAttack", "not run"))
    else:
        rows.append((f"AutoAttack {aa['version']} [{', '.join(aa['attacks'])}]",
                     f"{report['aa_acc']:.4f} ({report['n_aa']} pts; clean {report['aa_clean_acc']:.4f} on these)"))
    width = max(len(name) for name, _ in rows)
    lines = [f"eps {report['epsilon']:.4f} ({report['norm']}), seed {report['seed']}"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    if report["warnings"]:
        lines.append(f"  warnings ({len(report['warnings'])}): " + "; ".join(report["warnings"]))
    return "\n".join(lines)
