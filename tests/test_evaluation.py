"""Behaviour tests for robustune.evaluation (clean / PGD / AutoAttack report), on tiny hand-set models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustune import evaluation
from robustune.config import EvalConfig
from robustune.stats import wilson_interval
from robustune.evaluation import FAST_ATTACKS, STANDARD_ATTACKS, build_autoattack, evaluate, format_report

EPS = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are overhead-bound; several threads on a shared 2-core box only slow them down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prototype_problem(n: int = 64, k: int = 4, noise: float = 0.35, seed: int = 0):
    """Noisy copies of k random 1x8x8 prototypes and the nearest-prototype classifier, written as a linear layer
    (argmin ||x - p||^2 = argmax 2 p.x - ||p||^2)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(k, 64, generator=g) * 0.5 + 0.25
    y = torch.arange(n) % k
    x = (prototypes[y] + noise * torch.randn(n, 64, generator=g)).clamp(0, 1).view(n, 1, 8, 8)
    linear = nn.Linear(64, k)
    with torch.no_grad():
        linear.weight.copy_(2 * prototypes)
        linear.bias.copy_(-(prototypes ** 2).sum(1))
    return nn.Sequential(nn.Flatten(), linear), x, y


class Constant(nn.Module):
    """Ignores its input (but stays in the autograd graph, so attacks see zero gradients)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.tensor([2.0, 0.5, -1.0, 0.0]))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.sum(dim=(1, 2, 3))[:, None]


def config(**overrides) -> EvalConfig:
    settings = dict(protocol="custom", pgd_steps=10, autoattack="fast", points=24, batch_size=16, checks=False)
    settings.update(overrides)
    return EvalConfig(**settings)


def without_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


@pytest.fixture(scope="module")
def problem():
    return prototype_problem()


@pytest.fixture(scope="module")
def basic_report(problem):
    model, x, y = problem
    return evaluate(model, x, y, epsilon=EPS, config=config(), log=lambda _: None)


# ---------------------------------------------------------------------------------------- accuracies
def test_accuracies_match_direct_computation_and_are_ordered(problem, basic_report):
    model, x, y = problem
    report = basic_report
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert report["clean_acc"] == pytest.approx(correct.float().mean().item())
    assert report["aa_clean_acc"] == pytest.approx(correct[:24].float().mean().item())
    assert (report["n_clean"], report["n_pgd"], report["n_aa"]) == (64, 24, 24)
    assert 0.5 < report["clean_acc"] < 1.0  # the problem is neither trivial nor hopeless
    assert report["pgd_acc"] < report["clean_acc"]  # the attack does something at eps 0.05
    assert report["aa_acc"] <= report["aa_clean_acc"] <= 1.0
    assert report["autoattack"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert report["autoattack"]["version"] == "fast"
    assert report["autoattack"]["package"].startswith("pyautoattack ")
    assert report["pgd"] == {"steps": 10, "restarts": 1, "alpha": pytest.approx(0.25 * EPS), "alpha_ratio": 0.25,
                             "loss": "ce", "random_start": True}
    assert report["protocol"] == "custom" and report["norm"] == "Linf" and report["epsilon"] == EPS
    assert report["robust_acc"] <= min(report["pgd_acc"], report["aa_acc"])
    json.dumps(report)  # JSON-serializable as is


def test_zero_epsilon_gives_clean_accuracy_everywhere(problem):
    model, x, y = problem
    report = evaluate(model, x, y, epsilon=0.0, config=config(), log=lambda _: None)
    assert report["pgd_acc"] == report["aa_clean_acc"]  # clean accuracy on the attacked points
    assert report["aa_acc"] == report["aa_clean_acc"]
    assert report["autoattack"]["attacks"] == list(FAST_ATTACKS)


def test_constant_model_is_perfectly_robust_and_flagged():
    _, x, y = prototype_problem()
    report = evaluate(Constant(), x, y, epsilon=0.3, config=config(), log=lambda _: None)
    assert report["clean_acc"] == pytest.approx(0.25)  # always predicts class 0, a quarter of the labels
    assert report["pgd_acc"] == report["clean_acc"]
    assert report["aa_acc"] == report["aa_clean_acc"] == pytest.approx(0.25)
    # pyautoattack's gradient check (APGD-T, DLR loss) ends up in the report
    assert any("zero gradient" in w for w in report["warnings"]), report["warnings"]


def test_separable_data_large_epsilon_breaks_the_model():
    # Class 0: pixels near 0.2, class 1: near 0.8; the model thresholds the mean at 0.5. eps 0.5 crosses it.
    g = torch.Generator().manual_seed(1)
    y = torch.arange(40) % 2
    x = (0.2 + 0.6 * y.float()[:, None, None, None] + 0.05 * torch.randn(40, 1, 8, 8, generator=g)).clamp(0, 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-torch.ones(64), torch.ones(64)]) / 64 * 10)
        model[1].bias.copy_(torch.tensor([5.0, -5.0]))
    logs: list[str] = []
    report = evaluate(model, x, y, epsilon=0.5, config=config(points=8), log=logs.append)
    assert report["clean_acc"] == 1.0
    assert report["pgd_acc"] < 0.1
    assert report["aa_acc"] < 0.1
    # Two classes: the targeted DLR loss of APGD-T cannot work; it is skipped and the report says so.
    assert report["autoattack"]["attacks"] == ["apgd-ce"]
    assert any("apgd-t skipped" in w for w in report["warnings"])
    assert any(line.startswith("eval: PGD-10 (1 restart) acc") for line in logs)


# ------------------------------------------------------------------------------ determinism, options
def test_deterministic_and_leaves_global_rng_alone(problem):
    model, x, y = problem
    torch.manual_seed(7)
    first = evaluate(model, x, y, epsilon=EPS, config=config(), seed=3, log=lambda _: None)
    after = torch.rand(3)
    torch.manual_seed(7)
    expected = torch.rand(3)
    second = evaluate(model, x, y, epsilon=EPS, config=config(), seed=3, log=lambda _: None)
    assert without_seconds(first) == without_seconds(second)
    assert first["seed"] == 3
    assert torch.equal(after, expected)  # pyautoattack reseeds the global RNG; evaluate puts it back


def test_pgd_random_start_follows_the_seed(problem):
    # One tiny step at a large radius: the accuracy is decided by the random start, hence by the seed.
    model, x, y = problem
    cfg = config(pgd_steps=1, pgd_alpha_ratio=0.01, autoattack="none")

    def pgd_accs():
        return [evaluate(model, x, y, epsilon=0.15, config=cfg, seed=s, log=lambda _: None)["pgd_acc"]
                for s in range(4)]

    first = pgd_accs()
    torch.rand(5)  # the global RNG moving on must not matter
    assert pgd_accs() == first
    assert len(set(first)) > 1  # ... while the seed does


def test_autoattack_none_runs_no_autoattack(problem, monkeypatch):
    model, x, y = problem

    def forbidden(*args, **kwargs):
        raise AssertionError("AutoAttack must not run")

    monkeypatch.setattr(evaluation, "build_autoattack", forbidden)
    report = evaluate(model, x, y, epsilon=EPS, config=config(autoattack="none"), log=lambda _: None)
    assert report["aa_acc"] is None and report["aa_clean_acc"] is None and report["n_aa"] == 0
    assert report["autoattack"]["attacks"] == [] and report["autoattack"]["version"] == "none"
    assert "autoattack" not in report["seconds"]
    assert "AutoAttack" in format_report(report) and "not run" in format_report(report)


def test_standard_runs_four_attacks_without_touching_parameters(problem):
    model, x, y = problem
    report = evaluate(model, x, y, epsilon=EPS, config=config(autoattack="standard", points=6),
                      log=lambda _: None)
    assert report["autoattack"]["attacks"] == list(STANDARD_ATTACKS)
    assert report["aa_acc"] <= report["aa_clean_acc"]
    # FAB calls .backward(); parameters are frozen during evaluation, so nothing accumulates, and they come back.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_fast_settings_mirror_the_standard_version(problem):
    from pyautoattack import AutoAttack

    model, _, _ = problem
    ours = build_autoattack(model, epsilon=EPS, attacks=FAST_ATTACKS, n_classes=10, device="cpu", seed=0)
    standard = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0)
    custom = AutoAttack(model, norm="Linf", eps=EPS, version="custom", attacks=list(FAST_ATTACKS), seed=0)
    names = ["n_restarts", "n_iter", "n_target_classes", "rho", "eot_iter", "eps", "norm", "seed", "use_largereps"]

    def settings(aa):
        return {(part, n): getattr(getattr(aa, part), n, None) for part in ("apgd", "apgd_targeted") for n in names}

    assert settings(ours) == settings(standard)
    assert settings(custom) != settings(standard)  # plain "custom" keeps 5 APGD-CE restarts
    assert (ours.fab.n_restarts, ours.fab.n_target_classes, ours.square.n_queries) == \
        (standard.fab.n_restarts, standard.fab.n_target_classes, standard.square.n_queries)


def test_chunked_autoattack_matches_pyautoattack_run_per_chunk(problem, tmp_path):
    model, x, y = problem
    evaluate(model, x, y, epsilon=EPS, config=config(batch_size=8), state_dir=tmp_path, log=lambda _: None)
    files = sorted((tmp_path / "autoattack").glob("chunk-*.json"))
    assert len(files) == 3  # 24 points in chunks of 8
    ours = [flag for f in files for flag in json.loads(f.read_text())["robust"]]
    expected = []
    for start in (0, 8, 16):
        aa = build_autoattack(model, epsilon=EPS, attacks=FAST_ATTACKS, n_classes=4, device="cpu", seed=0)
        _, y_adv = aa.run_standard_evaluation(x[start:start + 8], y[start:start + 8], batch_size=8)
        expected += (y_adv == y[start:start + 8]).int().tolist()
    assert ours == expected


def test_adversarial_examples_outside_the_ball_raise(problem, monkeypatch):
    model, x, y = problem

    class Cheating:
        def run_standard_evaluation(self, xb, yb, batch_size):
            return (xb + 2 * EPS).clamp(0, 1), yb.clone()

    monkeypatch.setattr(evaluation, "build_autoattack", lambda *a, **k: Cheating())
    with pytest.raises(RuntimeError, match="more than epsilon"):
        evaluate(model, x, y, epsilon=EPS, config=config(), log=lambda _: None)


# ------------------------------------------------------------------------------------------- resume
def count_builds(monkeypatch) -> list[int]:
    calls = []
    real = evaluation.build_autoattack

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "build_autoattack", counting)
    return calls


def test_second_call_with_state_dir_reuses_the_finished_autoattack(problem, basic_report, tmp_path, monkeypatch):
    model, x, y = problem
    first = evaluate(model, x, y, epsilon=EPS, config=config(), state_dir=tmp_path, log=lambda _: None)
    assert first["aa_acc"] == basic_report["aa_acc"] and first["autoattack"]["resumed_chunks"] == 0
    calls = count_builds(monkeypatch)
    second = evaluate(model, x, y, epsilon=EPS, config=config(), state_dir=tmp_path, log=lambda _: None)
    assert second["aa_acc"] == first["aa_acc"]
    assert second["autoattack"]["resumed_chunks"] == 2 and calls == []  # nothing left to attack


def test_interrupted_autoattack_resumes_to_the_same_flags(problem, tmp_path, monkeypatch):
    model, x, y = problem
    cfg = config(batch_size=8)  # 24 AutoAttack points: 3 chunks x 2 attacks
    calls = count_builds(monkeypatch)
    fresh = evaluate(model, x, y, epsilon=EPS, config=cfg, state_dir=tmp_path / "fresh", log=lambda _: None)
    total = len(calls)
    assert total >= 4

    class Interrupted(Exception):
        pass

    real_save = evaluation._save_json
    saves = []

    def save_then_die(*args):
        saves.append(1)
        if len(saves) == 4:  # chunk 1 done (2 saves), chunk 2's first attack saved; its second is lost
            raise Interrupted
        real_save(*args)

    monkeypatch.setattr(evaluation, "_save_json", save_then_die)
    with pytest.raises(Interrupted):
        evaluate(model, x, y, epsilon=EPS, config=cfg, state_dir=tmp_path / "run", log=lambda _: None)
    monkeypatch.setattr(evaluation, "_save_json", real_save)

    calls.clear()
    logs: list[str] = []
    resumed = evaluate(model, x, y, epsilon=EPS, config=cfg, state_dir=tmp_path / "run", log=logs.append)
    assert resumed["autoattack"]["resumed_chunks"] == 2
    assert len(calls) == total - 3  # the three saved (chunk, attack) steps are not attacked again
    assert without_seconds(resumed) == {**without_seconds(fresh), "autoattack": resumed["autoattack"]}

    def flags(folder):
        return [json.loads(f.read_text())["robust"] for f in sorted((folder / "autoattack").glob("chunk-*.json"))]

    assert flags(tmp_path / "run") == flags(tmp_path / "fresh")
    assert any("(resumed)" in line for line in logs)


def test_state_from_another_setting_is_ignored(problem, tmp_path):
    model, x, y = problem
    evaluate(model, x, y, epsilon=EPS, config=config(), state_dir=tmp_path, log=lambda _: None)
    logs: list[str] = []
    other = evaluate(model, x, y, epsilon=0.1, config=config(), state_dir=tmp_path, log=logs.append)
    plain = evaluate(model, x, y, epsilon=0.1, config=config(), log=lambda _: None)
    assert other["autoattack"]["resumed_chunks"] == 0
    assert other["aa_acc"] == plain["aa_acc"]
    assert any("ignoring" in line for line in logs)


# ---------------------------------------------------------------------------------- report, model mode
def test_format_report_names_attacks_steps_and_points(basic_report):
    text = format_report(basic_report)
    assert "PGD-10x1" in text and "apgd-ce" in text and "apgd-t" in text and "fast" in text
    assert "(64 pts)" in text and "(24 pts" in text and "0.0500" in text
    assert f"{basic_report['aa_acc']:.4f}" in text and f"{basic_report['pgd_acc']:.4f}" in text
    assert len(text.splitlines()) >= 3


def test_model_is_in_eval_mode_during_evaluation_and_restored_after(problem):
    _, x, y = problem
    seen: list[bool] = []

    class Recorder(nn.Module):
        def forward(self, z):
            seen.append(self.training)
            return z

    base, _, _ = prototype_problem()
    model = nn.Sequential(Recorder(), nn.Dropout(0.5), base)
    model.train()
    model[2].eval()  # mixed modes must come back exactly as they were
    evaluate(model, x, y, epsilon=EPS, config=config(points=4), log=lambda _: None)
    assert seen and not any(seen)
    assert model.training and model[0].training and model[1].training and not model[2].training


# ------------------------------------------------------------------------------ protocols, masking checks
class ZeroGradient(nn.Module):
    """A test-only 'defense' that masks gradients: inputs are quantized (round has zero gradient everywhere),
    so white-box attacks see no signal, while the classifier behind it is as fragile as ever."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


def test_healthy_model_passes_every_masking_check(problem):
    model, x, y = problem
    report = evaluate(model, x, y, epsilon=EPS, config=config(checks=True), log=lambda _: None)
    checks = report["checks"]
    assert checks["points"] == 24
    assert all(checks[name]["passed"] for name in ("more_steps", "larger_epsilon", "unbounded", "black_box")), checks
    assert checks["unbounded"]["acc"] <= 0.05
    assert not any("gradient masking" in w for w in report["warnings"]), report["warnings"]


def test_zero_gradient_wrapper_is_flagged_as_gradient_masking(problem):
    model, x, y = problem
    masked = ZeroGradient(model)
    logs: list[str] = []
    report = evaluate(masked, x, y, epsilon=0.15, config=config(checks=True), log=logs.append)
    checks = report["checks"]
    assert not checks["unbounded"]["passed"]  # no gradient: the unbounded attack cannot move from the image
    assert not checks["black_box"]["passed"]  # Square, needing no gradient, fools what PGD/APGD could not
    masking = [w for w in report["warnings"] if w.startswith("gradient masking?")]
    assert len(masking) >= 2, report["warnings"]
    assert "FAILED" in format_report(report) and any("gradient masking?" in line for line in logs)


def test_quick_protocol_fixes_attacks_and_custom_fields_are_refused():
    from robustune.config import ConfigError
    from robustune.evaluation import resolve_protocol

    quick = resolve_protocol(EvalConfig(points=300))
    assert (quick.name, quick.pgd_steps, quick.pgd_restarts, quick.autoattack, quick.points) == \
        ("quick/1", 20, 1, "fast", 300)
    full = resolve_protocol(EvalConfig(protocol="full"))
    assert (full.name, full.pgd_steps, full.pgd_restarts, full.cw_steps, full.autoattack, full.points) == \
        ("full/1", 50, 10, 50, "standard", None)
    with pytest.raises(ConfigError, match="eval.pgd_steps only applies to eval.protocol=custom"):
        EvalConfig(protocol="quick", pgd_steps=7)


def test_full_protocol_runs_cw_and_every_attack_on_all_points(problem):
    model, x, y = problem
    report = evaluate(model, x[:16], y[:16], epsilon=EPS,
                      config=EvalConfig(protocol="full", batch_size=16, checks=False), log=lambda _: None)
    assert report["protocol"] == "full/1" and report["n_pgd"] == report["n_aa"] == 16
    assert report["pgd"]["restarts"] == 10 and report["cw"]["steps"] == 50 and report["cw_acc"] is not None
    assert report["autoattack"]["attacks"] == list(STANDARD_ATTACKS)
    assert report["robust_acc"] <= min(report["pgd_acc"], report["cw_acc"], report["aa_acc"])


# ---------------------------------------------------------------------------------------- intervals
def test_report_carries_an_interval_for_each_accuracy(basic_report):
    intervals = basic_report["intervals"]
    assert set(intervals) == {"clean_acc", "pgd_acc", "aa_acc", "robust_acc"}
    for name, (low, high) in intervals.items():
        assert low <= basic_report[name] <= high
        points = basic_report["n_clean"] if name == "clean_acc" else basic_report["n_pgd"]
        assert (low, high) == pytest.approx(wilson_interval(round(basic_report[name] * points), points))
    assert "[" in format_report(basic_report) and "Wilson" in format_report(basic_report)


# ------------------------------------------------------------------------- test-time defenses, adaptively
class RoundedInput(nn.Module):
    """A test-time step that masks gradients: the input is rounded (zero gradient) before the classifier."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(torch.round(x * 8) / 8)


class RoundingDefense:
    """Just the two hooks evaluate_deployed uses; `surrogates` picks what attack_surrogates returns."""

    def __init__(self, surrogates):
        self.surrogates = surrogates

    def inference_model(self, model):
        return RoundedInput(model)

    def attack_surrogates(self, model):
        return self.surrogates(model)


def test_adaptive_attacks_can_only_lower_the_deployed_number(problem, tmp_path):
    from robustune.data import ArrayDataset

    model, x, y = problem
    test = ArrayDataset(images=(x * 255).round().to(torch.uint8), labels=y)
    settings = config(autoattack="none", points=64)
    run = lambda surrogates, folder: evaluation.evaluate_deployed(  # noqa: E731
        model, RoundingDefense(surrogates), test, epsilon=0.15, eval_config=settings, device="cpu", seed=0,
        state_dir=tmp_path / folder, log=lambda _: None)

    masked = run(lambda m: {}, "masked")  # attacks through the rounding see zero gradients
    transfer = run(lambda m: {"bare_classifier": m, "constant": Constant()}, "transfer")
    adaptive = transfer["adaptive"]
    assert "adaptive" not in masked and masked["robust_acc"] == adaptive["through_deployed_acc"]
    # The bare classifier's examples transfer through the rounding: far lower than the masked number.
    assert adaptive["pgd_acc_on_surrogate"]["bare_classifier"] < masked["robust_acc"] - 0.2
    assert transfer["robust_acc"] == adaptive["worst_case_acc"]
    assert transfer["robust_acc"] <= min(adaptive["through_deployed_acc"], *adaptive["pgd_acc_on_surrogate"].values())
    # Per point: robust only if robust through the deployed model AND under each surrogate's examples.
    images = test.images.float().div(255)
    _, flags = evaluation.evaluate_points(RoundedInput(model), images, y, epsilon=0.15, config=settings,
                                          log=lambda _: None)
    survived = [evaluation._transfer_robust(s, RoundedInput(model), images, y, epsilon=0.15, alpha=0.15 / 4,
                                            steps=10, restarts=1, device=torch.device("cpu"), seed=0,
                                            batch_size=16) for s in (model, Constant())]
    assert transfer["robust_acc"] == pytest.approx((flags["robust"] & survived[0] & survived[1]).float().mean().item())
    # A surrogate whose examples fool nothing (the constant model has no gradient) cannot raise the number.
    only_constant = run(lambda m: {"constant": Constant()}, "constant")
    assert only_constant["robust_acc"] == masked["robust_acc"]
    assert transfer["intervals"]["robust_acc"][0] <= transfer["robust_acc"] <= transfer["intervals"]["robust_acc"][1]
    # The per-point outcomes round-trip through Parquet: one row per attacked point, one column per attack.
    saved = evaluation.read_outcomes(transfer["outcomes_path"])
    assert saved["test_index"] == list(range(64)) and saved["label"] == y.tolist()
    assert saved["adaptive_bare_classifier"] == survived[0].tolist() and saved["adaptive_constant"] == survived[1].tolist()
    assert saved["robust"] == (flags["robust"] & survived[0] & survived[1]).tolist()
    assert saved["clean"] == flags["clean"].tolist() and saved["pgd"] == flags["pgd"].tolist()
    assert sum(saved["robust"]) / 64 == pytest.approx(transfer["robust_acc"])
