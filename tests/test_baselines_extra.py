"""Free-AT, FGSM + GradAlign and TRADES: what makes each of them that defense."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustune.attacks import clamp_to_ball, fgsm
from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.methods.fgsm_ga import grad_align_regularizer
from robustune.models import create_model
from robustune.search_space import check_samples_resolve, load_space
from robustune.loop import TrainingLoop

EPS = 0.1
LOOP_OVERRIDES = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                  "train.epochs=1", "data.train_subset=640"]


def small_model():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))


def make(name, params=None, model=None, num_classes=10, epsilon=EPS):
    model = small_model() if model is None else model
    defense = create_defense(name, params)
    defense.setup(model, DefenseContext(epsilon=epsilon, num_classes=num_classes, input_shape=(1, 28, 28),
                                        num_train_examples=100, epochs=1, steps_per_epoch=1,
                                        device=torch.device("cpu")))
    return model, defense


def data(n=16, seed=1, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, num_classes, (n,), generator=g)


class Recorder(nn.Module):
    """Wraps a model and records every input the defense feeds it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


def platform_update(model, lr=0.05):
    """What TrainingLoop._update does on one worker: zero_grad (model only), backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    calls = []

    def update(loss):
        calls.append(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return update, calls


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------ all three
@pytest.mark.parametrize("name, defaults, cost", [
    ("free", {"replays": 8, "alpha_ratio": 1.0}, Cost(8, 8)),
    ("fgsm_ga", {"alpha_ratio": 1.25, "random_start": False, "lambda_": 0.2}, Cost(3, 5)),
    ("trades", {"beta": 6.0, "steps": 10, "alpha_ratio": 0.007 / 0.031, "init_std": 0.001}, Cost(12, 12)),
])
def test_defaults_cost_search_space(name, defaults, cost):
    defense = create_defense(name)
    assert {k: getattr(defense, k) for k in defaults} == defaults
    assert defense.cost() == cost
    check_samples_resolve(load_space(name), load_config(name).to_dict())


def test_fields_are_validated():
    for name, params, key in [("free", {"replays": 0}, "replays"), ("fgsm_ga", {"lambda_": -1}, "lambda_"),
                              ("trades", {"steps": 0}, "steps"), ("trades", {"beta": -0.5}, "beta")]:
        with pytest.raises(ConfigError, match=key):
            create_defense(name, params)


@pytest.mark.parametrize("name, params", [("free", {"replays": 3}), ("fgsm_ga", {}),
                                          ("fgsm_ga", {"random_start": True}), ("trades", {"steps": 4})])
def test_forward_count_matches_the_declared_cost_and_inputs_stay_in_the_box(name, params):
    model, defense = make(name, params)
    recorder = Recorder(model)
    x, y = data()
    x = (x > 0.5).float()  # pixels at 0 and 1: any step or noise out of [0, 1] must be clamped
    update, _ = platform_update(model)
    defense.train_step(recorder, x, y, torch.arange(16), 0, update)
    assert len(recorder.inputs) == defense.cost().forward
    for seen in recorder.inputs:
        assert (seen - x).abs().max() <= EPS + 1e-6 and seen.min() >= 0 and seen.max() <= 1


@pytest.mark.parametrize("name", ["free", "fgsm_ga", "trades"])
def test_training_loop_epoch_and_checkpoint_round_trip(name, tmp_path):
    overrides = LOOP_OVERRIDES + (["method.replays=2"] if name == "free" else [])
    loop = TrainingLoop(load_config(name, overrides=overrides), log=lambda _: None)
    metrics = loop.run_epoch()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    torch.save(loop.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = TrainingLoop(load_config(name, overrides=overrides), log=lambda _: None)
    fresh.load_state_dict(state, tmp_path / "state.pt")
    assert fresh.defense.state_dict().keys() == loop.defense.state_dict().keys()
    for key, value in loop.defense.state_dict().items():
        assert torch.equal(fresh.defense.state_dict()[key], value)
    if name == "free":
        assert "delta" in state["defense"]  # the persistent perturbation resumes too


# --------------------------------------------------------------------------------------------------- Free-AT
def test_free_replays_each_batch_m_times_and_steps_delta_from_the_same_backward():
    model, defense = make("free", {"replays": 4})
    x, y = data()
    # Large steps, so later weights give other input-gradient signs: each replay's delta step must use the
    # gradient of that replay's own backward (the weights before its optimizer step).
    update, calls = platform_update(model, lr=2.0)
    start = params_of(model)
    x_leaf = x.clone().requires_grad_(True)
    (grad0,) = torch.autograd.grad(F.cross_entropy(model(x_leaf), y), x_leaf)  # replay 1, before its step
    defense.train_step(model, x, y, torch.arange(16), 0, update)
    assert len(calls) == 4
    assert any(not torch.equal(a, b) for a, b in zip(start, params_of(model)))
    # Replay the same 4 steps by hand: delta_{k+1} = clip(delta_k + eps * sign(grad at weights_k)).
    model2, _ = make("free", {"replays": 4})
    update2, _ = platform_update(model2, lr=2.0)
    delta = torch.zeros_like(x)
    for k in range(4):
        leaf = delta.clone().requires_grad_(True)
        loss = F.cross_entropy(model2(clamp_to_ball(x + leaf, x, EPS)), y)
        update2(loss)
        if k == 0:
            assert torch.equal(leaf.grad.sign(), grad0.sign())
        delta = (delta + EPS * leaf.grad.sign()).clamp(-EPS, EPS)
    assert torch.allclose(defense.delta, delta)
    assert defense.delta.abs().max() <= EPS + 1e-7


def test_free_delta_persists_across_batches_and_resets_on_a_new_batch_size():
    model, defense = make("free", {"replays": 2})
    recorder = Recorder(model)
    update, _ = platform_update(model)
    x1, y1 = data(16, seed=1)
    x2, y2 = data(16, seed=2)
    x3, y3 = data(8, seed=3)
    defense.train_step(recorder, x1, y1, torch.arange(16), 0, update)
    assert torch.equal(recorder.inputs[0], x1)  # delta starts at zero
    carried = defense.delta.clone()
    assert carried.abs().max() == pytest.approx(EPS) and carried.abs().max() <= EPS + 1e-7
    recorder.inputs.clear()
    defense.train_step(recorder, x2, y2, torch.arange(16), 1, update)
    assert torch.allclose(recorder.inputs[0], clamp_to_ball(x2 + carried, x2, EPS))  # warm start
    recorder.inputs.clear()
    defense.train_step(recorder, x3, y3, torch.arange(8), 2, update)
    assert torch.equal(recorder.inputs[0], x3)  # a batch of another size starts from zero again


def test_free_needs_update_to_backpropagate():
    model, defense = make("free", {"replays": 2})
    x, y = data()
    with pytest.raises(RuntimeError, match="delta.grad"):
        defense.train_step(model, x, y, torch.arange(16), 0, lambda loss: None)


def test_free_runs_budget_over_m_epochs_through_the_platform():
    overrides = LOOP_OVERRIDES[:-2] + ["data.train_subset=256", "train.epochs=10", "method.replays=4"]
    loop = TrainingLoop(load_config("free", overrides=overrides), log=lambda _: None)
    assert loop.epochs == math.ceil(10 / 4) == 3
    assert loop.total_steps == 3 * loop.steps_per_epoch
    assert create_defense("free", {"replays": 8}).epochs_for(30) == 4
    calls = []
    inner = loop._update
    loop._update = lambda loss: (calls.append(1), inner(loss))
    for epoch in range(3):
        assert not loop.finished
        loop.run_epoch()
        assert len(calls) == 4 * loop.steps_per_epoch * (epoch + 1)  # m updates per batch
    assert loop.finished and loop.global_step == loop.total_steps


# ------------------------------------------------------------------------------------------------- GradAlign
def test_grad_align_is_zero_for_a_two_class_linear_model():
    """For logits Wx + b with 2 classes, grad_x CE = (p_1 - y_1)(w_1 - w_0): every input gradient is parallel
    to w_1 - w_0 with a sign fixed by the label, so cos(grad at x, grad at x + eta) = 1 exactly."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2))
    x, y = data(32, num_classes=2)
    reg, mean_cos = grad_align_regularizer(linear, x, y, EPS)
    assert mean_cos.item() == pytest.approx(1.0, abs=1e-5) and abs(reg.item()) < 1e-5
    _, defense = make("fgsm_ga", {"lambda_": 1.0}, model=linear, num_classes=2)
    result = defense.loss(linear, x, y, torch.arange(32), 0)
    assert abs(result.metrics["grad_align_reg"]) < 1e-5
    x_adv = fgsm(linear, x, y, EPS, alpha=1.25 * EPS)
    assert torch.allclose(result.loss, F.cross_entropy(linear(x_adv), y), atol=1e-5)
    # The same construction with 10 classes is not aligned: the test above is not trivially zero.
    torch.manual_seed(0)
    linear10 = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    nn.init.normal_(linear10[1].weight, std=0.3)
    x10, y10 = data(32)
    assert grad_align_regularizer(linear10, x10, y10, 0.5)[0].item() > 1e-3


def test_grad_align_regularizer_is_positive_and_double_backpropagates_on_a_cnn():
    model, defense = make("fgsm_ga")
    x, y = data()
    torch.manual_seed(4)
    reg, mean_cos = grad_align_regularizer(model, x, y, EPS)
    assert 0 < reg.item() < 1 and mean_cos.item() == pytest.approx(1 - reg.item())
    grads = torch.autograd.grad(reg, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # create_graph=True: weights get a gradient


def test_grad_align_loss_is_fgsm_ce_plus_lambda_times_the_regularizer():
    model, defense = make("fgsm_ga", {"lambda_": 0.5})
    x, y = data()
    result = defense.loss(model, x, y, torch.arange(16), 0)
    x_adv = fgsm(model, x, y, EPS, alpha=1.25 * EPS)  # zero start: deterministic
    ce = F.cross_entropy(model(x_adv), y)
    assert torch.allclose(result.loss, ce + 0.5 * result.metrics["grad_align_reg"], atol=1e-5)
    assert result.metrics["grad_align_reg"] > 0
    _, plain = make("fgsm_ga", {"lambda_": 0.0}, model=model)
    assert plain.cost() == Cost(2, 2)
    assert torch.allclose(plain.loss(model, x, y, torch.arange(16), 0).loss, ce)


# ---------------------------------------------------------------------------------------------------- TRADES
def test_trades_with_beta_zero_is_standard_training_exactly():
    model, trades = make("trades", {"beta": 0.0})
    _, standard = make("standard", model=model)
    x, y = data()
    torch.manual_seed(0)
    ours = trades.loss(model, x, y, torch.arange(16), 0).loss
    reference = standard.loss(model, x, y, torch.arange(16), 0).loss
    assert torch.equal(ours, reference)
    g1 = torch.autograd.grad(ours, list(model.parameters()))
    g2 = torch.autograd.grad(reference, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_trades_loss_is_clean_ce_plus_beta_kl_at_the_authors_kl_attack_point():
    model, trades = make("trades")
    recorder = Recorder(model)
    x, y = data()
    torch.manual_seed(0)
    result = trades.loss(recorder, x, y, torch.arange(16), 0)
    x_adv = recorder.inputs[-1]
    # The authors' attack by hand: Gaussian start of std 0.001, 10 signed steps of 0.007/0.031 eps ascending
    # KL(f(x) || f(x')) (clean distribution fixed), each projected into the eps-ball and [0, 1]. No labels.
    with torch.no_grad():
        clean = model(x)
    # Near x the KL's gradient is a difference of nearly equal probabilities, so its signs are sensitive to
    # rounding: write the KL as sum exp(log p)(log p - log q), elementwise as the defense's F.kl_div does.
    log_p = F.log_softmax(clean, 1)
    p_clean = log_p.exp()
    torch.manual_seed(0)
    x_ref = clamp_to_ball(x + 0.001 * torch.randn_like(x), x, EPS)
    for _ in range(10):
        x_ref.requires_grad_(True)
        kl_sum = (p_clean * (log_p - F.log_softmax(model(x_ref), 1))).sum()
        (grad,) = torch.autograd.grad(kl_sum, x_ref)
        x_ref = clamp_to_ball(x_ref.detach() + 0.007 / 0.031 * EPS * grad.sign(), x, EPS)
    same = ((x_adv - x_ref).abs() <= 1e-6).float().mean().item()
    assert same > 0.98, same  # (a rounding-level sign flip at the start may move a few pixels)
    with torch.no_grad():
        adv = model(x_adv)
        kl = (p_clean * (F.log_softmax(clean, 1) - F.log_softmax(adv, 1))).sum(1).mean()  # KL(f(x) || f(x'))
        corner = x + EPS * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(9)) * 2 - EPS
        corner_kl = (p_clean * (F.log_softmax(clean, 1) - F.log_softmax(model(corner.clamp(0, 1)), 1))).sum(1).mean()
    assert kl > 3 * corner_kl  # the attack climbs the KL far above a random corner of the ball
    assert torch.allclose(result.loss, F.cross_entropy(clean, y) + 6.0 * kl, atol=1e-5)
    # Other labels give the same adversarial point.
    recorder.inputs.clear()
    torch.manual_seed(0)
    trades.loss(recorder, x, (y + 1) % 10, torch.arange(16), 0)
    assert torch.equal(recorder.inputs[-1], x_adv)
