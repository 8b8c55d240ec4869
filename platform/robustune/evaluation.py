"""Final robustness evaluation by a fixed, versioned protocol, with gradient-masking checks, as one JSON report.

Protocols (like AutoAttack's versions, each fixes every setting so numbers compare across runs and studies):

    quick/1   clean on the whole test set; PGD-20 (1 restart, step eps/4) and AutoAttack "fast" (APGD-CE +
              APGD-T with the standard version's settings) on `eval.points` test examples from `eval.first_point`
              (default 0; a study gives each seed its own slice)
    full/1    clean, PGD-50 with 10 restarts (step eps/10), CW-50 (PGD on the margin loss) and AutoAttack
              "standard" (APGD-CE, APGD-T, FAB-T, Square) on the whole test set
    custom    the attack fields of EvalConfig (reports say "custom"; leaderboards mark it)

Every evaluation also runs gradient-masking checks on the first `check_points` attacked examples (unless
`eval.checks` is off; a study can keep them to each defense's first seed): more PGD steps must not raise
accuracy, a larger epsilon must not raise accuracy, an unbounded attack must fool ~every point (it stops once it
has), and black-box Square must not fool points that every white-box attack left robust. pyautoattack's own
checks are collected too. Each failure is a line in `warnings` (and the `eval/warning` MLflow tag).

AutoAttack runs in fixed chunks of `batch_size` points: each chunk goes through the attacks in turn, every
attack seeing the chunk's points still robust (what `run_standard_evaluation` does per batch). A chunk's flags
depend only on the model, its points and the seed, so the result is the same whether chunks run in this process
or sharded across Ray tasks (`eval.workers`), and whether or not the evaluation was interrupted: each chunk's
progress is saved after every attack under `state_dir/autoattack/` and a rerun resumes from it.

pyautoattack 0.2.0's own `state_path` resume cannot work (it stores the attack set as `str(set)`, so a reload
always fails with "different set of attacks"), hence our own per-chunk state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from robustune.attacks import pgd
from robustune.config import ConfigError, EvalConfig
from robustune.stats import wilson_interval
from robustune.storage import Location, location, read_parquet, write_atomic, write_parquet

__all__ = ["Protocol", "resolve_protocol", "FAST_ATTACKS", "STANDARD_ATTACKS", "evaluate", "format_report",
           "build_autoattack"]

STATE_FORMAT = "robustune-autoattack-chunk/1"
STATE_FOLDER = "autoattack"
FAST_ATTACKS = ("apgd-ce", "apgd-t")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
BALL_TOLERANCE = 1e-6
UNBOUNDED_MAX_ACC = 0.05  # an attack allowed the whole image box should fool at least 95% of the points


@dataclass(frozen=True)
class Protocol:
    name: str  # versioned: a change of any setting gets a new version
    pgd_steps: int
    pgd_restarts: int
    pgd_alpha_ratio: float  # PGD step in units of epsilon
    cw_steps: int  # 0: no CW attack
    cw_alpha_ratio: float
    autoattack: str  # fast | standard | none
    points: int | None  # attacked test examples (the first N); None: all
    check_points: int  # gradient-masking checks run on the first N attacked examples
    square_queries: int  # the black-box check's query budget


def resolve_protocol(config: EvalConfig) -> Protocol:
    if config.protocol == "quick":
        return Protocol("quick/1", 20, 1, 0.25, 0, 0.25, "fast", config.points, 200, 1000)
    if config.protocol == "full":
        return Protocol("full/1", 50, 10, 0.1, 50, 0.1, "standard", None, 1000, 5000)
    return Protocol("custom", config.pgd_steps, config.pgd_restarts, config.pgd_alpha_ratio, config.cw_steps,
                    config.pgd_alpha_ratio, config.autoattack, config.points, min(config.points, 200), 1000)


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



def _digest(named_tensors) -> str:
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_json(path: Location, data: dict) -> None:
    """Write atomically, so an interruption mid-write leaves the previous state intact."""
    write_atomic(path, json.dumps(data).encode())


@contextlib.contextmanager
def _frozen(*models: nn.Module):
    """Every module in eval mode and every parameter without requires_grad (FAB calls .backward(), which would
    otherwise accumulate into .grad), both restored afterwards."""
    modes = {module: module.training for model in models for module in model.modules()}
    grad_flags = {param: param.requires_grad for model in models for param in model.parameters()}
    for model in models:
        model.eval()
    for param in grad_flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG an evaluation forks (none on the CPU)."""
    return [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []


# ----------------------------------------------------------------------------------------- phases
def _pgd_robust(model: nn.Module, x: Tensor, y: Tensor, *, epsilon: float, alpha: float, steps: int, restarts: int,
                loss: str, device: torch.device, seed: int, batch_size: int, random_start: bool = True,
                stop_when_all_fooled: bool = False) -> Tensor:
    """Per-example robust flags (N,) on the CPU under PGD (seeded, deterministic)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    flags = []
    for start, end in _batches(x.shape[0], batch_size):
        xb, yb = x[start:end].to(device), y[start:end].to(device)
        x_adv = pgd(model, xb, yb, epsilon, alpha=alpha, steps=steps, restarts=restarts, random_start=random_start,
                    loss=loss, generator=generator, stop_when_all_fooled=stop_when_all_fooled)
        _check_adversarial(x_adv, xb, epsilon, f"PGD ({loss})")
        with torch.no_grad():
            flags.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(flags)


def attack_chunks(model: nn.Module, x: Tensor, y: Tensor, clean_correct: Tensor, chunks: list[tuple[int, int]], *,
                  epsilon: float, attacks: list[str], n_classes: int, device: torch.device | str, seed: int,
                  state_dir: str | None, model_digest: str, log: Callable[[str], None]) -> dict:
    """AutoAttack on the given chunks of (x, y): {"flags": {start: robust flags}, "messages": [...], "resumed": n}.

    Runs in the evaluating process or in a Ray task (one per shard); each chunk's progress is saved after every
    attack in state_dir/autoattack/chunk-<start>-<end>.json and reused when its fingerprint matches."""
    import pyautoattack.checks

    device = torch.device(device)
    model = model.to(device).eval()
    # pyautoattack's dynamic-defense check counts calls in a module-global dict it never resets: without this,
    # a model evaluated after a test-time defense in the same process is flagged as dynamic too.
    for name in pyautoattack.checks.funcs:
        pyautoattack.checks.funcs[name] = 0
    messages: list[str] = []
    aa_logger = logging.getLogger("auto-attack")
    handler = _CollectWarnings(messages)
    saved_logger = (aa_logger.level, aa_logger.propagate)
    aa_logger.addHandler(handler)
    aa_logger.setLevel(logging.WARNING)
    aa_logger.propagate = False  # its warnings go to the report, not to stderr
    # In the storage (state_dir arrives as text: a path or a URI), so a shard on any node resumes it.
    folder = location(state_dir) / STATE_FOLDER if state_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    results, resumed = {}, 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for start, end in chunks:
                xc, yc = x[start:end], y[start:end]
                fingerprint = {"model": model_digest, "data": _digest([("x", xc), ("y", yc)]),
                               "epsilon": float(epsilon), "attacks": list(attacks), "seed": int(seed),
                               "chunk": [start, end], "package": _package_version()}
                path = folder / f"chunk-{start:07d}-{end:07d}.json" if folder is not None else None
                robust, done = clean_correct[start:end].clone(), []
                saved = _load_chunk(path, fingerprint, log) if path is not None else None
                if saved is not None:
                    robust, done = saved
                    resumed += 1
                t0 = time.perf_counter()
                for attack in attacks:
                    if attack in done:
                        continue
                    idx = torch.nonzero(robust).flatten()
                    if len(idx):
                        aa = build_autoattack(model, epsilon=epsilon, attacks=[attack], n_classes=n_classes,
                                              device=device, seed=seed)
                        xb, yb = xc[idx], yc[idx]
                        x_adv, y_adv = aa.run_standard_evaluation(xb, yb, batch_size=len(idx))
                        # y_adv: the model's prediction on x_adv as the attack left it; check the examples
                        # and that the predictions reproduce.
                        _check_adversarial(x_adv, xb, epsilon, f"AutoAttack {attack}")
                        y_adv = y_adv.cpu()
                        with torch.no_grad():
                            again = model(x_adv.to(device)).argmax(1).cpu()
                        if (again != y_adv).any():
                            messages.append(f"AutoAttack {attack}: {int((again != y_adv).sum())} predictions on "
                                            "the adversarial examples changed when re-evaluated (randomized model?)")
                        robust[idx] = y_adv == yb
                    done.append(attack)
                    if path is not None:
                        _save_json(path, {"format": STATE_FORMAT, "fingerprint": fingerprint,
                                          "robust": robust.int().tolist(), "done": done})
                results[start] = robust
                log(f"eval: AutoAttack points {start}-{end}: robust {robust.float().mean().item():.4f}"
                    + (" (resumed)" if saved is not None else f" in {time.perf_counter() - t0:.1f}s"))
        messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.setLevel(saved_logger[0])
        aa_logger.propagate = saved_logger[1]
    return {"flags": results, "messages": messages, "resumed": resumed}


def _load_chunk(path: Location, fingerprint: dict, log: Callable[[str], None]) -> tuple[Tensor, list[str]] | None:
    """A chunk's saved flags and finished attacks if they belong to this evaluation, else None."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
            log(f"eval: ignoring {path} (saved for another model, data or AutoAttack setting)")
            return None
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        start, end = fingerprint["chunk"]
        if robust.shape != (end - start,) or not set(state["done"]) <= set(fingerprint["attacks"]):
            raise ValueError("flags or attack list do not match the chunk")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log(f"eval: ignoring unreadable AutoAttack state {path} ({error})")
        return None
    return robust, list(state["done"])


def _shard_task(model, x, y, clean_correct, chunks, kwargs, threads):
    torch.set_num_threads(threads)
    return attack_chunks(model, x, y, clean_correct, chunks, log=_write_line, **kwargs)


def _write_line(text: str) -> None:
    sys.stdout.write(text + "\n")  # Ray forwards task output to the driver
    sys.stdout.flush()


def _run_autoattack(model: nn.Module, x: Tensor, y: Tensor, clean_correct: Tensor, *, epsilon: float,
                    attacks: list[str], n_classes: int, batch_size: int, device: torch.device, seed: int,
                    state_dir: Location | None, workers: int, log: Callable[[str], None]) -> tuple[Tensor, list[str], int]:
    """Robust flags after every attack, pyautoattack's messages, and how many chunks were resumed."""
    chunks = list(_batches(x.shape[0], batch_size))
    kwargs = dict(epsilon=epsilon, attacks=attacks, n_classes=n_classes, seed=seed,
                  state_dir=str(state_dir) if state_dir is not None else None,
                  # only a saved state needs to know which model it belongs to
                  model_digest=_digest(model.state_dict().items()) if state_dir is not None else "")
    workers = min(workers, len(chunks))
    if workers <= 1:
        outcomes = [attack_chunks(model, x, y, clean_correct, chunks, device=device, log=log, **kwargs)]
    else:
        import ray

        from robustune.cluster import ensure_ray

        ensure_ray()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        on_gpu = device.type == "cuda"
        task = ray.remote(_shard_task).options(num_cpus=cpus, num_gpus=1 if on_gpu else 0)
        model_ref = ray.put(model.cpu() if not on_gpu else model)
        log(f"eval: AutoAttack sharded over {workers} Ray tasks ({len(chunks)} chunks of {batch_size} points)")
        futures = [task.remote(model_ref, x, y, clean_correct, chunks[k::workers],
                               {**kwargs, "device": "cuda" if on_gpu else "cpu"}, cpus) for k in range(workers)]
        outcomes = ray.get(futures)
        model.to(device)
    robust = torch.cat([o["flags"][start] for start, _ in chunks for o in outcomes if start in o["flags"]])
    messages = [m for o in outcomes for m in o["messages"]]
    return robust, messages, sum(o["resumed"] for o in outcomes)


def _square_robust(model: nn.Module, x: Tensor, y: Tensor, robust_before: Tensor, *, epsilon: float, queries: int,
                   n_classes: int, device: torch.device, seed: int) -> Tensor:
    """Black-box Square (pyautoattack) on the points in `robust_before`; flags after it."""
    robust = robust_before.clone()
    idx = torch.nonzero(robust).flatten()
    if len(idx) == 0:
        return robust
    aa = build_autoattack(model, epsilon=epsilon, attacks=["square"], n_classes=n_classes, device=device, seed=seed)
    aa.square.n_queries = queries
    x_adv, y_adv = aa.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
    _check_adversarial(x_adv, x[idx], epsilon, "Square")
    robust[idx] = y_adv.cpu() == y[idx]
    return robust


def _masking_checks(model: nn.Module, x: Tensor, y: Tensor, clean_correct: Tensor, whitebox: Tensor,
                    pgd_flags: Tensor, *, epsilon: float, protocol: Protocol, n_classes: int, device: torch.device,
                    seed: int, batch_size: int) -> tuple[dict, list[str]]:
    """The four gradient-masking checks on the first `protocol.check_points` attacked points."""
    m = min(x.shape[0], protocol.check_points)
    x, y, clean_correct, whitebox = x[:m], y[:m], clean_correct[:m], whitebox[:m]
    # Paired comparisons on the same points; the slack absorbs the random starts' noise.
    slack = 0.02 + 1.0 / m
    steps, ratio = protocol.pgd_steps, protocol.pgd_alpha_ratio
    common = dict(device=device, seed=seed, batch_size=batch_size)
    # The baseline is the protocol's own PGD when it ran with one restart (the checks compare single runs).
    base = (pgd_flags[:m] if protocol.pgd_restarts == 1 else
            _pgd_robust(model, x, y, epsilon=epsilon, alpha=ratio * epsilon, steps=steps, restarts=1, loss="ce",
                        **common)).float().mean().item()
    more = _pgd_robust(model, x, y, epsilon=epsilon, alpha=ratio * epsilon, steps=4 * steps, restarts=1, loss="ce",
                       **common).float().mean().item()
    wide_eps = min(1.0, 2 * epsilon)
    wide = _pgd_robust(model, x, y, epsilon=wide_eps, alpha=ratio * wide_eps, steps=steps, restarts=1, loss="ce",
                       **common).float().mean().item()
    # Unbounded: the whole image box, from the clean image (a random start could fool a model by itself). It asks
    # whether the attack can fool ~every point, so a batch it has wholly fooled takes no further steps.
    unbounded = _pgd_robust(model, x, y, epsilon=1.0, alpha=0.02, steps=100, restarts=1, loss="cw",
                            random_start=False, stop_when_all_fooled=True, **common).float().mean().item()
    square = _square_robust(model, x, y, clean_correct & whitebox, epsilon=epsilon, queries=protocol.square_queries,
                            n_classes=n_classes, device=device, seed=seed)
    black_box_only = int((whitebox & ~square).sum())
    checks = {
        "points": m, "slack": slack,
        "more_steps": {"steps": [steps, 4 * steps], "acc": [base, more], "passed": more <= base + slack},
        "larger_epsilon": {"epsilon": [epsilon, wide_eps], "acc": [base, wide], "passed": wide <= base + slack},
        "unbounded": {"epsilon": 1.0, "steps": 100, "loss": "cw", "acc": unbounded,
                      "passed": unbounded <= UNBOUNDED_MAX_ACC},
        "black_box": {"attack": "square", "queries": protocol.square_queries,
                      "fooled_only_by_black_box": black_box_only, "passed": black_box_only / m <= slack},
    }
    problems = []
    if not checks["more_steps"]["passed"]:
        problems.append(f"gradient masking? PGD-{4 * steps} accuracy {more:.3f} exceeds PGD-{steps}'s {base:.3f} "
                        f"on {m} points (more steps must not help the model)")
    if not checks["larger_epsilon"]["passed"]:
        problems.append(f"gradient masking? accuracy at eps {wide_eps:.4g} ({wide:.3f}) exceeds accuracy at eps "
                        f"{epsilon:.4g} ({base:.3f}) on {m} points (a larger ball must not help the model)")
    if not checks["unbounded"]["passed"]:
        problems.append(f"gradient masking? an unbounded attack (eps 1, PGD-100 on the margin loss) leaves "
                        f"{unbounded:.1%} of {m} points correctly classified; it should fool ~all of them")
    if not checks["black_box"]["passed"]:
        problems.append(f"gradient masking? black-box Square ({protocol.square_queries} queries) fools "
                        f"{black_box_only} of {m} points that every white-box attack left robust")
    return checks, problems


# --------------------------------------------------------------------------------------------- API
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float, config: EvalConfig,
             device: torch.device | str = "cpu", seed: int = 0, state_dir: Location | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Accuracy of `model` on (images, labels) under the protocol `config.protocol`, with masking checks
    (`evaluate_points` without the per-point outcomes)."""
    return evaluate_points(model, images, labels, epsilon=epsilon, config=config, device=device, seed=seed,
                           state_dir=state_dir, log=log)[0]


def evaluate_points(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float, config: EvalConfig,
                    device: torch.device | str = "cpu", seed: int = 0, state_dir: Location | None = None,
                    log: Callable[[str], None] = print) -> tuple[dict, dict[str, Tensor]]:
    """Accuracy of `model` on (images, labels) under the protocol `config.protocol`, with masking checks, and
    the per-point outcomes: {"clean", "pgd", "cw", "aa", "robust"} -> bool (n_attack,) for the attacked points
    (`protocol.points` of them from `config.first_point`), an attack that did not run left out.

    images: float (N, C, H, W) in [0, 1] on the CPU (moved to `device` batch by batch); labels: int64 (N,).
    The model maps [0, 1] inputs to logits. It is put in eval mode for the whole evaluation (each module's
    mode is restored afterwards) and its parameters stop requiring gradients meanwhile (FAB calls
    .backward(), which would otherwise accumulate into .grad). The global torch RNG is left as it was
    (pyautoattack reseeds it). With `state_dir`, AutoAttack progress is saved there and a later call with the
    same model and data resumes from it. Returns a JSON-serializable report.
    """
    device = torch.device(device)
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"evaluate needs images (N, C, H, W) and labels (N,) with N > 0, "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    protocol = resolve_protocol(config)
    images, labels = images.detach().cpu().float(), labels.detach().cpu().long()
    n = images.shape[0]
    first = attacked_slice(config, n).start
    n_attack = n - first if protocol.points is None else min(n - first, protocol.points)
    x, y = images[first:first + n_attack], labels[first:first + n_attack]
    batch = config.batch_size
    seconds: dict[str, float] = {}

    with _frozen(model):
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            t0 = time.perf_counter()
            preds, n_classes = _clean_predictions(model, images, batch, device)
            clean_correct = preds == labels
            clean_acc = clean_correct.float().mean().item()
            clean_hits = int(clean_correct.sum())
            seconds["clean"] = time.perf_counter() - t0
            log(f"eval [{protocol.name}]: clean acc {clean_acc:.4f} on {n} points in {seconds['clean']:.1f}s")
            clean_correct = clean_correct[first:first + n_attack]

            t0 = time.perf_counter()
            alpha = protocol.pgd_alpha_ratio * epsilon
            pgd_flags = _pgd_robust(model, x, y, epsilon=epsilon, alpha=alpha, steps=protocol.pgd_steps,
                                    restarts=protocol.pgd_restarts, loss="ce", device=device, seed=seed,
                                    batch_size=batch)
            seconds["pgd"] = time.perf_counter() - t0
            pgd_acc = pgd_flags.float().mean().item()
            restarts = "restart" if protocol.pgd_restarts == 1 else "restarts"
            log(f"eval: PGD-{protocol.pgd_steps} ({protocol.pgd_restarts} {restarts}) acc {pgd_acc:.4f} "
                f"on {n_attack} points in {seconds['pgd']:.1f}s")
            whitebox = pgd_flags.clone()

            cw_acc = None
            if protocol.cw_steps:
                t0 = time.perf_counter()
                cw_flags = _pgd_robust(model, x, y, epsilon=epsilon, alpha=protocol.cw_alpha_ratio * epsilon,
                                       steps=protocol.cw_steps, restarts=1, loss="cw", device=device, seed=seed,
                                       batch_size=batch)
                seconds["cw"] = time.perf_counter() - t0
                cw_acc = cw_flags.float().mean().item()
                whitebox &= cw_flags
                log(f"eval: CW-{protocol.cw_steps} acc {cw_acc:.4f} on {n_attack} points in {seconds['cw']:.1f}s")

            attacks, messages = _autoattack_list(protocol.autoattack, n_classes)
            aa_acc, resumed_chunks = None, 0
            if protocol.autoattack != "none":
                t0 = time.perf_counter()
                aa_flags, aa_messages, resumed_chunks = _run_autoattack(
                    model, x, y, clean_correct, epsilon=epsilon, attacks=attacks, n_classes=n_classes,
                    batch_size=batch, device=device, seed=seed, state_dir=state_dir, workers=config.workers, log=log)
                messages += aa_messages
                seconds["autoattack"] = time.perf_counter() - t0
                aa_acc = aa_flags.float().mean().item()
                whitebox &= aa_flags
                log(f"eval: AutoAttack {protocol.autoattack} [{', '.join(attacks)}] acc {aa_acc:.4f} "
                    f"on {n_attack} points in {seconds['autoattack']:.1f}s")

            checks = None
            if config.checks and epsilon > 0:
                t0 = time.perf_counter()
                checks, problems = _masking_checks(model, x, y, clean_correct, whitebox, pgd_flags, epsilon=epsilon,
                                                   protocol=protocol, n_classes=n_classes, device=device, seed=seed,
                                                   batch_size=batch)
                messages += problems
                seconds["checks"] = time.perf_counter() - t0
                log(f"eval: gradient-masking checks on {checks['points']} points: "
                    f"{'all passed' if not problems else f'{len(problems)} failed'} in {seconds['checks']:.1f}s")
            report_warnings = _summarize_warnings(messages)
            for message in report_warnings:
                log(f"eval: warning: {message}")

    flags = {"clean": clean_correct, "pgd": pgd_flags, "robust": whitebox}
    if cw_acc is not None:
        flags["cw"] = cw_flags
    if aa_acc is not None:
        flags["aa"] = aa_flags
    autoattack = {"version": protocol.autoattack, "attacks": attacks, "package": _package_version()}
    if protocol.autoattack != "none":
        autoattack.update({"resumed_chunks": resumed_chunks, "shards": config.workers, "chunk_points": batch})
    return {
        "protocol": protocol.name, "settings": asdict(protocol),
        "epsilon": float(epsilon), "norm": "Linf",
        "clean_acc": clean_acc, "n_clean": n,
        "pgd_acc": pgd_acc, "n_pgd": n_attack, "first_point": first,
        "pgd": {"steps": protocol.pgd_steps, "restarts": protocol.pgd_restarts, "alpha": float(alpha),
                "alpha_ratio": float(protocol.pgd_alpha_ratio), "loss": "ce", "random_start": True},
        "cw_acc": cw_acc, "cw": {"steps": protocol.cw_steps, "alpha_ratio": protocol.cw_alpha_ratio}
        if protocol.cw_steps else None,
        "aa_acc": aa_acc, "n_aa": n_attack if aa_acc is not None else 0, "autoattack": autoattack,
        "aa_clean_acc": clean_correct.float().mean().item() if aa_acc is not None else None,
        # Per point, robust against every attack that ran: the number to compare defenses by.
        "robust_acc": whitebox.float().mean().item(),
        "checks": checks,
        "warnings": report_warnings,
        "seconds": seconds,
        "seed": int(seed),
        "intervals": accuracy_intervals(n, clean_hits, n_attack, {"pgd_acc": pgd_flags, "cw_acc": flags.get("cw"),
                                                                  "aa_acc": flags.get("aa"), "robust_acc": whitebox}),
    }, flags


def attacked_slice(config: EvalConfig, n: int) -> slice:
    """The test points the attacks run on: `points` of them from `first_point` (full: all of them)."""
    protocol = resolve_protocol(config)
    first = config.first_point if protocol.points is not None else 0
    if first >= n:
        raise ConfigError(f"eval.first_point={first} is past the end of the test split ({n} points): lower it, or "
                          "give each seed a smaller slice (evaluation.points)")
    return slice(first, n if protocol.points is None else min(n, first + protocol.points))


def accuracy_intervals(n_clean: int, clean_hits: int, n_attack: int,
                       attack_flags: dict[str, Tensor | None]) -> dict[str, list[float]]:
    """Each accuracy's 95% Wilson interval over the points it was measured on: {"clean_acc": [low, high], ...}."""
    intervals = {"clean_acc": list(wilson_interval(clean_hits, n_clean))}
    for name, flags in attack_flags.items():
        if flags is not None:
            intervals[name] = list(wilson_interval(int(flags.sum()), n_attack))
    return intervals


def format_report(report: dict) -> str:
    """A few lines naming the protocol, each attack, its steps/restarts, epsilon and the number of points."""
    pgd_cfg, aa = report["pgd"], report["autoattack"]
    intervals = report.get("intervals") or {}

    def accuracy(name: str) -> str:  # "0.8123 [0.7950, 0.8286]": the value and its 95% interval
        bounds = intervals.get(name)
        return f"{report[name]:.4f}" + (f" [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else "")

    rows = [("clean", f"{accuracy('clean_acc')} ({report['n_clean']} pts)"),
            (f"PGD-{pgd_cfg['steps']}x{pgd_cfg['restarts']} (alpha {pgd_cfg['alpha']:.4f}, {pgd_cfg['loss'].upper()})",
             f"{accuracy('pgd_acc')} ({report['n_pgd']} pts)")]
    if report.get("cw_acc") is not None:
        rows.append((f"CW-{report['cw']['steps']}", f"{accuracy('cw_acc')} ({report['n_pgd']} pts)"))
    if report["aa_acc"] is None:
        rows.append(("AutoAttack", "not run"))
    else:
        rows.append((f"AutoAttack {aa['version']} [{', '.join(aa['attacks'])}]",
                     f"{accuracy('aa_acc')} ({report['n_aa']} pts; clean {report['aa_clean_acc']:.4f} on these)"))
    adaptive = report.get("adaptive")
    if adaptive:
        for name, value in adaptive["pgd_acc_on_surrogate"].items():
            rows.append((f"PGD crafted on {name}, scored deployed", f"{value:.4f} ({adaptive['n']} pts)"))
    rows.append(("robust to all of the above", accuracy("robust_acc")))
    if intervals:
        rows.append(("", "[brackets: 95% Wilson interval over the evaluated points]"))
    checks = report.get("checks")
    if checks:
        failed = [name for name in ("more_steps", "larger_epsilon", "unbounded", "black_box")
                  if not checks[name]["passed"]]
        rows.append(("gradient-masking checks", f"{'passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
                                                f"({checks['points']} pts)"))
    width = max(len(name) for name, _ in rows)
    lines = [f"protocol {report['protocol']}: eps {report['epsilon']:.4f} ({report['norm']}), seed {report['seed']}"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    if report["warnings"]:
        lines.append(f"  warnings ({len(report['warnings'])}): " + "; ".join(report["warnings"]))
    return "\n".join(lines)


def evaluate_deployed(model, defense, test, *, epsilon: float, eval_config, device, seed: int, state_dir: Location,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate what the defense deploys (its test-time step included); for a test-time defense, then attacks
    crafted on its `attack_surrogates` and scored on the deployed model (the deployed number, `robust_acc`, is
    the per-point worst case over every attack), and the bare classifier on its own."""
    test_images = test.images.float().div(255)
    deployed = defense.inference_model(model)
    report, flags = evaluate_points(deployed, test_images, test.labels, epsilon=epsilon, config=eval_config,
                                    device=device, seed=seed, state_dir=state_dir, log=log)
    if deployed is not model:
        # A test-time defense: the numbers above attacked the whole pipeline; the bare classifier's follow.
        report["attacked_through"] = (f"{type(deployed).__name__}: the defense's test-time step is part of the "
                                      "model every attack saw")
        surrogates = defense.attack_surrogates(model)
        if surrogates:
            attacked = attacked_slice(eval_config, test_images.shape[0])
            report["adaptive"], surrogate_flags = adaptive_attacks(
                deployed, surrogates, test_images[attacked], test.labels[attacked], flags["robust"], epsilon=epsilon,
                config=eval_config, device=device, seed=seed, log=log)
            flags.update({f"adaptive_{name}": survived for name, survived in surrogate_flags.items()})
            for survived in surrogate_flags.values():
                flags["robust"] = flags["robust"] & survived
            report["robust_acc"] = report["adaptive"]["worst_case_acc"]
            report["intervals"]["robust_acc"] = report["adaptive"]["worst_case_interval"]
        log("evaluating the bare classifier (without the test-time step)")
        report["bare_classifier"] = evaluate(model, test_images, test.labels, epsilon=epsilon, config=eval_config,
                                             device=device, seed=seed, state_dir=location(state_dir) / "bare",
                                             log=log)
    if state_dir is not None:
        path = location(state_dir) / OUTCOMES_FILE
        write_outcomes(flags, test.labels, path, first_point=report["first_point"])
        report["outcomes_path"] = str(path)
    return report


OUTCOMES_FILE = "outcomes.parquet"  # per attacked test point: correct clean and under each attack


def write_outcomes(flags: dict[str, Tensor], labels: Tensor, path: Location, first_point: int = 0) -> None:
    """One row per attacked test point (its index in the evaluated test split, its label) and one boolean column
    per outcome (clean, pgd, cw, aa, adaptive_<surrogate>, robust = under every attack), so any comparison
    between runs evaluated on the same points can be recomputed and paired."""
    import pyarrow as pa

    n = flags["clean"].shape[0]
    columns = {"test_index": pa.array(range(first_point, first_point + n), type=pa.int32()),
               "label": pa.array(labels[first_point:first_point + n].tolist(), type=pa.int16())}
    columns.update({name: pa.array(values.bool().tolist(), type=pa.bool_()) for name, values in flags.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.table(columns), path)


def read_outcomes(path: str | Location) -> dict[str, Any]:
    """An outcomes file as {column: list}."""
    return read_parquet(location(path)).to_pydict()


def adaptive_attacks(deployed: nn.Module, surrogates: dict[str, nn.Module], images: Tensor, labels: Tensor,
                     robust_so_far: Tensor, *, epsilon: float, config: EvalConfig, device: torch.device | str,
                     seed: int, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PGD (the protocol's steps, restarts and step size) crafted on each surrogate and scored on the deployed
    model, on the protocol's attacked points. A point stays robust only if it survived the attacks through the
    deployed model (`robust_so_far`) and every surrogate's examples, so the worst case can only be lower.
    Returns the summary and, per surrogate, the per-point flags."""
    device = torch.device(device)
    protocol = resolve_protocol(config)
    n_attack = robust_so_far.shape[0]
    x, y = images[:n_attack].detach().cpu().float(), labels[:n_attack].detach().cpu().long()
    worst = robust_so_far.clone()
    accuracies: dict[str, float] = {}
    survived_by_name: dict[str, Tensor] = {}
    started = time.perf_counter()
    with _frozen(deployed, *surrogates.values()), torch.random.fork_rng(devices=_cuda_devices(device)):
        for name, surrogate in surrogates.items():
            survived = _transfer_robust(surrogate, deployed, x, y, epsilon=epsilon,
                                        alpha=protocol.pgd_alpha_ratio * epsilon, steps=protocol.pgd_steps,
                                        restarts=protocol.pgd_restarts, device=device, seed=seed,
                                        batch_size=config.batch_size)
            accuracies[name] = survived.float().mean().item()
            survived_by_name[name] = survived
            worst &= survived
            log(f"eval: PGD-{protocol.pgd_steps} crafted on {name}, scored on the deployed model: acc "
                f"{accuracies[name]:.4f} on {n_attack} points")
    worst_acc = worst.float().mean().item()
    log(f"eval: deployed worst case over every attack {worst_acc:.4f} (through the deployed model alone "
        f"{robust_so_far.float().mean().item():.4f}) in {time.perf_counter() - started:.1f}s")
    summary = {"pgd_acc_on_surrogate": accuracies, "through_deployed_acc": robust_so_far.float().mean().item(),
               "worst_case_acc": worst_acc, "worst_case_interval": list(wilson_interval(int(worst.sum()), n_attack)),
               "attack": f"PGD-{protocol.pgd_steps}x{protocol.pgd_restarts} (CE) on each surrogate", "n": n_attack}
    return summary, survived_by_name


def _transfer_robust(surrogate: nn.Module, target: nn.Module, x: Tensor, y: Tensor, *, epsilon: float, alpha: float,
                     steps: int, restarts: int, device: torch.device, seed: int, batch_size: int) -> Tensor:
    """Per-example flags (N,): `target` still classifies correctly the PGD examples crafted on `surrogate`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    flags = []
    for start, end in _batches(x.shape[0], batch_size):
        xb, yb = x[start:end].to(device), y[start:end].to(device)
        x_adv = pgd(surrogate, xb, yb, epsilon, alpha=alpha, steps=steps, restarts=restarts, random_start=True,
                    loss="ce", generator=generator)
        _check_adversarial(x_adv, xb, epsilon, "PGD (transfer)")
        with torch.no_grad():
            flags.append((target(x_adv).argmax(1) == yb).cpu())
    return torch.cat(flags)
