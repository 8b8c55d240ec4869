"""eFGSM + re-constructor: Gamma buffer, start/refinement geometry, joint training of R, robust estimate."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.models import create_model
from robustune.loop import TrainingLoop
from helpers import sgd_update

EPS = 0.1
N = 100


def make(params=None, model=None, input_shape=(1, 28, 28), num_classes=10, epsilon=EPS):
    torch.manual_seed(0)
    model = model if model is not None else create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28),
                                                         mean=(0.5,), std=(0.25,))
    defense = create_defense("efgsm", params)
    defense.setup(model, DefenseContext(epsilon=epsilon, num_classes=num_classes, input_shape=input_shape,
                                        num_train_examples=N, epochs=2, steps_per_epoch=1,
                                        device=torch.device("cpu")))
    return model, defense


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :4] = 0.0  # pixels on the box's faces: the box projection must hold
    x[:, :, -4:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


class Recorder(nn.Module):
    """Forwards to `inner` and keeps every input: the last one in train_step is the training input x_adv."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def linear_model(weights, bias):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, len(bias)))
    with torch.no_grad():
        model[1].weight.copy_(weights)
        model[1].bias.copy_(bias)
    return model


# ------------------------------------------------------------------------------------------------ config
def test_defaults_cost_and_validation():
    d = create_defense("efgsm")
    assert (d.sigma_ratio, d.gamma_decay, d.lambda_cls, d.label_smoothing, d.closest_class, d.loss_scale) == \
        (0.5, 0.95, 0.1, 0.1, "runner_up", "classification")
    assert d.cost() == Cost(2, 2)
    _, exact = make({"closest_class": "all"})
    assert exact.cost() == Cost(2, 11)  # one input gradient per class + the training backward
    for key, value in [("sigma_ratio", -0.1), ("gamma_decay", 1.5), ("lambda_cls", 0.0), ("label_smoothing", 1.0),
                       ("closest_class", "nearest"), ("loss_scale", "plain"), ("loss_scale", "Paper")]:
        with pytest.raises(ConfigError, match=key):
            create_defense("efgsm", {key: value})
    # the config layer checks Literal fields itself; the dataclass must refuse a bad loss_scale on its own too
    from robustune.methods.efgsm import EFGSM
    with pytest.raises(ValueError, match="loss_scale"):
        EFGSM(loss_scale="plain")


# ------------------------------------------------------------------------------------------- geometry
def test_start_point_is_centred_on_sign_of_gamma_and_stays_in_the_ball():
    _, d = make({"sigma_ratio": 0.0})
    x, _ = batch()
    idx = torch.arange(16) + 40
    d.gamma.copy_(torch.randn_like(d.gamma.float()).to(d.gamma.dtype))
    x0 = d.start_point(x, idx)
    interior = (x > EPS) & (x < 1 - EPS)
    expected = d.gamma[idx].float().sign() * EPS
    assert torch.allclose((x0 - x)[interior], expected[interior], atol=1e-6)

    _, noisy = make({"sigma_ratio": 3.0})
    noisy.gamma.copy_(d.gamma)
    x0 = noisy.start_point(x, idx)
    assert (x0 - x).abs().max() <= EPS + 1e-6 and x0.min() >= 0 and x0.max() <= 1
    assert (x0 - x)[interior].abs().lt(EPS - 1e-4).any()  # noise really spreads inside the ball


@pytest.mark.parametrize("closest", ["runner_up", "all"])
def test_refined_point_stays_in_the_ball_and_the_box(closest):
    model, d = make({"closest_class": closest, "sigma_ratio": 1.0})
    x, y = batch()
    d.gamma[:16] = 1.0
    x_adv, robust = d.perturb(model, x, y, torch.arange(16))
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert robust.dtype == torch.bool and robust.shape == (16,)


def test_refinement_lands_a_linear_model_on_the_decision_boundary_within_eps():
    # Two classes, label 0, Z_1 - Z_0 = w.x + b with ||w||_1 = 7.84. Example A sits 0.04 (L-inf; linearized =
    # exact) from the boundary, B sits 0.3; no noise and Gamma = 0, so the start is x itself.
    w = torch.where(torch.arange(784) % 2 == 0, 0.01, -0.01)  # w.x = 0 at x = 0.5
    x = torch.full((1, 1, 28, 28), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    for distance, robust_expected in [(0.04, False), (0.3, True)]:
        gap = distance * w.abs().sum()
        model = linear_model(torch.stack([torch.zeros(784), w]), torch.stack([gap, torch.tensor(0.0)]))
        _, d = make({"sigma_ratio": 0.0}, model=model, num_classes=2)
        x_adv, robust = d.perturb(model, x, y, torch.tensor([0]))
        with torch.no_grad():
            z = model(x_adv)[0]
        assert torch.equal((x_adv - x).sign().flatten(), w.sign())  # along sign(grad(Z_1 - Z_0))
        if distance < EPS:
            assert abs((z[0] - z[1]).item()) < 1e-4  # exactly onto the boundary
            assert torch.allclose((x_adv - x).abs(), torch.full_like(x, distance), atol=1e-5)
        else:
            assert torch.allclose((x_adv - x).abs(), torch.full_like(x, EPS), atol=1e-6)  # the ball stops it
            assert z[0] > z[1]
        assert robust.tolist() == [robust_expected]  # Delta < eps: at risk; Delta > eps: robust


def test_exact_closest_class_uses_linear_distance_not_the_logit_gap():
    # Label 0. Class 1 has the smaller logit gap (runner-up) but a small gradient difference (distance 0.128);
    # class 2 has a larger gap but a 10x larger gradient difference (distance 0.064 < eps).
    w1 = torch.where(torch.arange(784) % 2 == 0, 0.001, -0.001)
    w2 = torch.where(torch.arange(784) % 5 == 0, 0.01, -0.01)
    model = linear_model(torch.stack([torch.zeros(784), w1, w2]),
                         torch.tensor([0.0, -0.1 - (w1 * 0.5).sum(), -0.5 - (w2 * 0.5).sum()]))
    x = torch.full((1, 1, 28, 28), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    for closest, target, robust_expected in [("all", 2, False), ("runner_up", 1, True)]:
        _, d = make({"sigma_ratio": 0.0, "closest_class": closest}, model=model, num_classes=3)
        x_adv, robust = d.perturb(model, x, y, torch.tensor([0]))
        with torch.no_grad():
            z = model(x_adv)[0]
        if closest == "all":
            assert abs((z[0] - z[2]).item()) < 1e-4
        else:
            assert torch.equal((x_adv - x).sign().flatten(), w1.sign())  # toward class 1, stopped by the ball
            assert z[0] > z[1]
        assert robust.tolist() == [robust_expected]


# ------------------------------------------------------------------------------------------- Gamma
def test_gamma_is_updated_once_per_epoch_only_for_seen_examples_with_decay():
    model, d = make()
    recorder = Recorder(model)
    update = sgd_update(model)
    start = torch.randn(d.gamma.shape).to(d.gamma.dtype)
    d.gamma.copy_(start)
    x, y = batch()
    idx = torch.randperm(N)[:16]
    d.train_step(recorder, x, y, idx, 0, update)
    x_adv = recorder.inputs[-1]
    assert torch.equal(d.gamma, start)  # nothing changes before the epoch ends
    d.on_epoch_end(model, 0)
    seen = torch.zeros(N, dtype=torch.bool)
    seen[idx] = True
    assert torch.equal(d.gamma[~seen], start[~seen])  # unseen examples keep Gamma: no decay either
    expected = 0.95 * start[idx].float() + (x_adv - x).sign()
    assert torch.allclose(d.gamma[idx].float(), expected, atol=2e-2)
    assert (x_adv - x).sign().abs().sum() > 0

    # Next epoch: other examples only; this epoch's examples stay as they are, the buffer was reset.
    after_first = d.gamma.clone()
    other = torch.nonzero(~seen).squeeze(1)[:16]
    d.train_step(recorder, x, y, other, 1, update)
    x_adv2 = recorder.inputs[-1]
    d.on_epoch_end(model, 1)
    assert torch.equal(d.gamma[idx], after_first[idx])
    assert torch.allclose(d.gamma[other].float(), 0.95 * after_first[other].float() + (x_adv2 - x).sign(), atol=2e-2)


def test_state_round_trip_through_a_weights_only_checkpoint():
    model, d = make()
    x, y = batch()
    d.train_step(model, x, y, torch.arange(16), 0, sgd_update(model))
    d.on_epoch_end(model, 0)
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _, fresh = make()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gamma, d.gamma) and fresh.gamma[:16].abs().sum() > 0
    for a, b in zip(fresh.reconstructor.parameters(), d.reconstructor.parameters()):
        assert torch.equal(a, b)
    # The restored Adam state continues exactly like the original one.
    m1 = create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
    m2 = create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
    m2.load_state_dict(m1.state_dict())
    torch.manual_seed(5)
    r1 = d.train_step(m1, x, y, torch.arange(16), 1, sgd_update(m1))
    torch.manual_seed(5)
    r2 = fresh.train_step(m2, x, y, torch.arange(16), 1, sgd_update(m2))
    assert torch.equal(r1.loss, r2.loss)
    for a, b in zip(fresh.reconstructor.parameters(), d.reconstructor.parameters()):
        assert torch.equal(a, b)

    _, other_size = make()
    state["gamma"] = state["gamma"][:50]
    with pytest.raises(ValueError, match="Gamma"):
        other_size.load_state_dict(state)


# ----------------------------------------------------------------------------------------- training
def test_one_step_trains_both_the_reconstructor_and_the_target():
    model, d = make()
    x, y = batch()
    before_r = [p.detach().clone() for p in d.reconstructor.parameters()]
    before_c = [p.detach().clone() for p in model.parameters()]
    result = d.train_step(model, x, y, torch.arange(16), 0, sgd_update(model))
    assert all(not torch.equal(a, b) for a, b in zip(before_r, d.reconstructor.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_c, model.parameters()))
    assert 0.0 <= result.metrics["efgsm_robust_est"] <= 1.0
    assert result.logits.shape == (16, 10) and torch.isfinite(result.loss)
    # default loss = L_C + L_R / lambda, with the reported parts; the paper's form is L_R + lambda * L_C
    m = result.metrics
    assert result.loss.item() == pytest.approx(m["efgsm_cls_loss"] + m["efgsm_rec_loss"] / 0.1, rel=1e-5)
    model, paper = make({"loss_scale": "paper"})
    result = paper.train_step(model, x, y, torch.arange(16), 0, sgd_update(model))
    m = result.metrics
    assert result.loss.item() == pytest.approx(m["efgsm_rec_loss"] + 0.1 * m["efgsm_cls_loss"], rel=1e-5)


def backward_only(loss):
    """An `update` that leaves the classifier's gradients in .grad and does not step it."""
    loss.backward()


def reference_gradients(model, reconstructor, x_adv, x, y):
    """Gradients of plain CE and of MSE(R(softmax(C(x_adv))), x), w.r.t. the classifier's parameters."""
    params = list(model.parameters())
    logits = model(x_adv)
    ce = torch.autograd.grad(F.cross_entropy(logits, y), params, retain_graph=True)
    rec = torch.autograd.grad(F.mse_loss(reconstructor(F.softmax(logits, dim=1)), x), params)
    flat = lambda grads: torch.cat([g.flatten() for g in grads]).double()  # noqa: E731
    return flat(ce), flat(rec)


@pytest.mark.parametrize("lambda_cls", [0.1, 1e-5])
@pytest.mark.parametrize("loss_scale", ["classification", "paper"])
def test_classifier_gradient_is_plain_ce_plus_reconstruction_at_the_chosen_scale(loss_scale, lambda_cls):
    # Without label smoothing L_C is plain CE. The classifier's gradient from one training step, written as
    # a * grad CE + b * grad L_R (least squares), must have a = 1 by default (not lambda) and a = lambda in the
    # paper's form; b / a = 1 / lambda in both. At init grad L_R is ~5e5x smaller than grad CE: lambda 0.1
    # pins a, and lambda 1e-5 makes both terms visible in the step, so b is pinned too.
    model, d = make({"label_smoothing": 0.0, "lambda_cls": lambda_cls, "loss_scale": loss_scale})
    recorder = Recorder(model)
    reconstructor_before = copy.deepcopy(d.reconstructor)
    x, y = batch()
    d.train_step(recorder, x, y, torch.arange(16), 0, backward_only)
    x_adv = recorder.inputs[-1]
    ce, rec = reference_gradients(model, reconstructor_before, x_adv, x, y)
    step = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    ce_weight, rec_weight = (1.0, 1.0 / lambda_cls) if loss_scale == "classification" else (lambda_cls, 1.0)
    basis = torch.stack([ce, rec], dim=1)
    (a, b), = torch.linalg.lstsq(basis, step.unsqueeze(1)).solution.T.tolist()
    assert a == pytest.approx(ce_weight, rel=1e-4)
    # float32 round-off in the step limits b where its term is tiny (lambda 0.1)
    rec_tolerance = 1e-4 if lambda_cls < 1e-3 else 2e-3
    assert b == pytest.approx(rec_weight, rel=rec_tolerance)
    assert b / a == pytest.approx(1.0 / lambda_cls, rel=rec_tolerance)
    expected = basis @ torch.tensor([ce_weight, rec_weight], dtype=torch.float64)
    assert (step - expected).norm() < 1e-4 * expected.norm()


def test_reconstructor_steps_on_the_reconstruction_gradient_in_both_forms():
    # R only appears in L_R; whatever the loss scale, its Adam step must see grad L_R (weight 1).
    x, y = batch()
    after = {}
    for loss_scale in ("classification", "paper"):
        model, d = make({"loss_scale": loss_scale})
        recorder = Recorder(model)
        reconstructor_before = copy.deepcopy(d.reconstructor)
        torch.manual_seed(3)
        d.train_step(recorder, x, y, torch.arange(16), 0, backward_only)
        x_adv = recorder.inputs[-1]
        with torch.no_grad():
            probs = F.softmax(model(x_adv), dim=1)
        expected = torch.autograd.grad(F.mse_loss(reconstructor_before(probs), x),
                                       list(reconstructor_before.parameters()))
        for parameter, reference in zip(d.reconstructor.parameters(), expected):
            assert torch.allclose(parameter.grad, reference, rtol=1e-5, atol=1e-9)
        after[loss_scale] = [p.detach().clone() for p in d.reconstructor.parameters()]
    for a, b in zip(after["classification"], after["paper"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_reconstructor_output_matches_the_input_shape():
    from robustune.methods.efgsm import Reconstructor

    for shape in [(1, 28, 28), (3, 32, 32), (3, 30, 30)]:
        r = Reconstructor(10, shape)
        out = r(torch.softmax(torch.randn(4, 10), dim=1))
        assert out.shape == (4, *shape) and out.min() >= 0 and out.max() <= 1


def test_training_loop_epoch_metrics_and_checkpoint():
    overrides = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                 "train.epochs=1", "data.train_subset=640", "train.overfit_metric=train/efgsm_robust_est"]
    loop = TrainingLoop(load_config("efgsm", overrides=overrides), log=lambda _: None)
    metrics = loop.run_epoch()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0.0 <= metrics["train/efgsm_robust_est"] <= 1.0
    assert metrics["train/efgsm_gamma_updated"] == 1.0  # every training example was folded into Gamma
    buffer = io.BytesIO()
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    fresh = TrainingLoop(load_config("efgsm", overrides=overrides), log=lambda _: None)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), "test")
    assert torch.equal(fresh.defense.gamma, loop.defense.gamma)
    assert fresh.defense.gamma.abs().sum() > 0
    for a, b in zip(fresh.defense.reconstructor.parameters(), loop.defense.reconstructor.parameters()):
        assert torch.equal(a, b)


def test_search_space_is_valid():
    from robustune.search_space import load_space

    space = load_space("efgsm")
    assert {"method.sigma_ratio", "method.lambda_cls", "method.label_smoothing", "train.lr"} <= set(space)
