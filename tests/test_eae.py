"""EAE (logit-space endogenous adversarial examples): the Eq. 7 move, its threshold, its gradient, the loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.methods.eae import endogenous_logits
from robustune.models import create_model

LOOP_OVERRIDES = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                  "train.epochs=1", "data.train_subset=640"]


class FixedLogits(nn.Module):
    """A 'model' whose output is a given logit matrix (a parameter, so gradients can be inspected)."""

    def __init__(self, logits):
        super().__init__()
        self.z = nn.Parameter(logits.clone())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.z * 1.0


def make(params=None, model=None):
    defense = create_defense("eae", params)
    model = model or create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
    defense.setup(model, DefenseContext(epsilon=0.1, num_classes=10, input_shape=(1, 28, 28), num_train_examples=64,
                                        epochs=1, steps_per_epoch=1, device=torch.device("cpu")))
    return defense, model


def random_logits(n=64, classes=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * scale
    y = torch.randint(0, classes, (n,), generator=g)
    return z, y


def expected_moved(z, y, gamma):
    """The paper's Eq. 7 written out per example, independently of the implementation."""
    out = z.clone()
    moved = []
    for i in range(len(y)):
        c = int(y[i])
        others = [(z[i, j].item(), j) for j in range(z.shape[1]) if j != c]
        zs, s = max(others)
        ld = z[i, c].item() - zs
        if 0 <= ld < gamma:
            out[i, c] -= ld / 2
            out[i, s] += ld / 2
            moved.append((i, c, s))
    return out, moved


def test_defaults_cost_and_validation():
    defense = create_defense("eae")
    assert defense.gamma == pytest.approx(3.63) and defense.top_class == "label"
    assert 2.0 <= defense.gamma <= 4.0  # the paper's thumb rule
    assert defense.cost() == Cost(1, 1)
    with pytest.raises(ConfigError, match="gamma"):
        create_defense("eae", {"gamma": -1.0})
    with pytest.raises(ConfigError, match="top_class"):
        create_defense("eae", {"top_class": "runner_up"})


def test_moved_logits_tie_the_top_two_exactly_and_leave_the_others_untouched(monkeypatch):
    z, y = random_logits()
    gamma = 3.0
    defense, model = make({"gamma": gamma}, FixedLogits(z))
    # The training loss is CE on the moved logits: capture them at the loss.
    seen = {}
    original = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        seen["logits"] = logits.detach().clone()
        return original(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    result = defense.loss(model, torch.zeros(64, 1), y, torch.arange(64), 0)
    monkeypatch.undo()
    moved_logits = seen["logits"]
    reference, moved = expected_moved(z, y, gamma)
    assert 5 < len(moved) < 60  # a real mix of moved and untouched examples
    moved_rows = {i for i, _, _ in moved}
    for i, c, s in moved:
        assert moved_logits[i, c] == moved_logits[i, s]  # an exact tie on the decision boundary
        assert moved_logits[i, c] == pytest.approx((z[i, c] + z[i, s]).item() / 2, abs=1e-6)
        others = [j for j in range(10) if j not in (c, s)]
        assert torch.equal(moved_logits[i, others], z[i, others])
    for i in set(range(64)) - moved_rows:
        assert torch.equal(moved_logits[i], z[i])
    assert torch.allclose(moved_logits, reference, atol=1e-6)
    assert result.metrics["eae_fraction"] == pytest.approx(len(moved) / 64)
    assert torch.equal(result.logits, z)  # training accuracy is measured on the clean logits


def test_examples_with_gap_at_least_gamma_train_on_plain_cross_entropy():
    z, y = random_logits(seed=1)
    gamma = 2.5
    _, moved = expected_moved(z, y, gamma)
    moved_rows = {i for i, _, _ in moved}
    far = torch.tensor([i for i in range(64) if i not in moved_rows])
    defense, model = make({"gamma": gamma}, FixedLogits(z[far]))
    result = defense.loss(model, torch.zeros(len(far), 1), y[far], far, 0)
    assert torch.equal(result.loss, F.cross_entropy(z[far], y[far]))
    assert result.metrics["eae_fraction"] == 0.0
    # On the full batch the loss is the mean of CE on moved logits where LD < gamma and plain CE elsewhere.
    defense, model = make({"gamma": gamma}, FixedLogits(z))
    reference, _ = expected_moved(z, y, gamma)
    full = defense.loss(model, torch.zeros(64, 1), y, torch.arange(64), 0).loss
    assert full.item() == pytest.approx(F.cross_entropy(reference, y).item(), rel=1e-6)
    assert full > F.cross_entropy(z, y)  # tying the top two only ever raises CE


def test_gamma_zero_is_standard_training():
    torch.manual_seed(0)
    defense, model = make({"gamma": 0.0})
    standard = create_defense("standard")
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    assert torch.equal(defense.loss(model, x, y, torch.arange(32), 0).loss, standard.loss(model, x, y, None, 0).loss)


def test_misclassified_examples_follow_top_class():
    # Row 0 is misclassified (label 0, top class 1, gap 2); row 1 is correct with gap 1.
    z = torch.tensor([[1.0, 3.0, 0.0, -1.0], [4.0, 3.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    label, model = make({"gamma": 3.0}, FixedLogits(z))
    _, moved, ld = endogenous_logits(z, y, 3.0, "label")
    assert moved.tolist() == [False, True] and ld.tolist() == [-2.0, 1.0]
    loss_label = label.loss(model, torch.zeros(2, 1), y, torch.arange(2), 0).loss
    expected_label = (F.cross_entropy(z[:1], y[:1]) + F.cross_entropy(torch.tensor([[3.5, 3.5, 0.0, 0.0]]), y[1:])) / 2
    assert loss_label.item() == pytest.approx(expected_label.item(), rel=1e-6)
    # Algorithm 1 taken literally: the top two logits (classes 1 and 0) are tied whatever the label says.
    predicted, model = make({"gamma": 3.0, "top_class": "predicted"}, FixedLogits(z))
    loss_pred = predicted.loss(model, torch.zeros(2, 1), y, torch.arange(2), 0).loss
    expected_pred = (F.cross_entropy(torch.tensor([[2.0, 2.0, 0.0, -1.0]]), y[:1])
                     + F.cross_entropy(torch.tensor([[3.5, 3.5, 0.0, 0.0]]), y[1:])) / 2
    assert loss_pred.item() == pytest.approx(expected_pred.item(), rel=1e-6)


def test_the_move_is_a_constant_so_the_gradient_still_separates_the_two_classes():
    """d loss / d z must be the CE gradient at the moved point, softmax(z') - onehot(y): were the move
    differentiated through, z_y and z_s would get identical gradients and nothing would widen the gap."""
    z = torch.tensor([[2.0, 1.0, -1.0], [5.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    defense, model = make({"gamma": 3.0}, FixedLogits(z))
    defense.loss(model, torch.zeros(2, 1), y, torch.arange(2), 0).loss.backward()
    moved = torch.tensor([[1.5, 1.5, -1.0], [5.0, 0.0, 0.0]])
    expected = (moved.softmax(1) - F.one_hot(y, 3)) / 2
    assert torch.allclose(model.z.grad, expected, atol=1e-6)
    assert model.z.grad[0, 0] < 0 < model.z.grad[0, 1]  # pushes the label up and the runner-up down


def test_gradient_reaches_every_model_parameter_and_uses_no_input_gradient(monkeypatch):
    torch.manual_seed(0)
    defense, model = make({"gamma": 100.0})  # every correctly classified example is moved
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    grad_calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grad_calls.append(1) or real_grad(*a, **k))
    seen = []
    defense.train_step(model, x, y, torch.arange(32), 0, seen.append)
    assert len(forwards) == 1 and not grad_calls and len(seen) == 1  # 1F1B: one forward, one update
    seen[0].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_runs_in_the_training_loop_and_its_state_survives_a_checkpoint(tmp_path):
    from robustune.loop import TrainingLoop

    loop = TrainingLoop(load_config("eae", overrides=LOOP_OVERRIDES), log=lambda _: None)
    metrics = loop.run_epoch()
    for key in ("train/loss", "train/acc", "train/eae_fraction", "val/clean_acc", "val/pgd_acc"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["train/eae_fraction"] <= 1.0
    torch.save(loop.state_dict(), tmp_path / "state.pt")
    fresh = TrainingLoop(load_config("eae", overrides=LOOP_OVERRIDES), log=lambda _: None)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), "test")
    assert fresh.epoch == 1 and fresh.defense.gamma == loop.defense.gamma
    for key, value in loop.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[key])
