"""FGSM-SDI: the learned initialization, its bounds, the generator's schedule and objective, state."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from robustune.attacks import input_gradient
from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.methods.fgsm_sdi import smoothed_cross_entropy
from robustune.models import create_model
from robustune.loop import TrainingLoop
from helpers import sgd_update, snapshot

EPS = 0.1
SMALL = {"generator_width": 8}  # the generator's width does not change what is tested; keep tests fast


def make(params=None, epsilon=EPS, batch=16, seed=0):
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
    defense = create_defense("fgsm_sdi", {**SMALL, **(params or {})})
    defense.setup(model, DefenseContext(epsilon=epsilon, num_classes=10, input_shape=(1, 28, 28),
                                        num_train_examples=100, epochs=1, steps_per_epoch=1,
                                        device=torch.device("cpu"), seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model, defense, x, y


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_perturbation_stays_in_the_ball_and_the_box():
    model, defense, x, y = make(batch=32, epsilon=0.3)
    x = torch.where(x < 0.3, 0.0, torch.where(x > 0.7, 1.0, x))  # many pixels on the box's faces
    x_adv, eta = defense.adversarial_examples(model, x, y)
    assert eta.abs().max() <= 0.3 and eta.abs().max() > 0  # eps * tanh(.)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1  # the authors' code let x + delta leave [0, 1]
    assert ((x_adv - x).abs() > 0.29).float().mean() > 0.1  # a real attack, not a no-op
    # The differentiable path used for the generator's update obeys the same bounds.
    grad_sign = input_gradient(model, x, y)[0].sign()
    x_gen = defense.perturb(model, x, y, defense.initialization(x, grad_sign))
    assert x_gen.requires_grad and (x_gen - x).abs().max() <= 0.3 + 1e-6 and 0 <= x_gen.min() <= x_gen.max() <= 1


def test_fgsm_step_is_alpha_sign_of_gradient_at_the_initialization():
    model, defense, x, y = make({"alpha_ratio": 0.5}, batch=8, epsilon=0.2)
    x = x * 0.2 + 0.4  # far from the box
    eta = torch.zeros_like(x)
    x_adv = defense.perturb(model, x, y, eta)
    grad = input_gradient(model, x, y)[0]
    assert torch.allclose(x_adv - x, 0.1 * grad.sign(), atol=1e-6)
    # From an initialization that leaves the box the gradient is taken at the clipped start x + eta in [0, 1].
    x = (x > 0.5).float()
    eta = 0.2 * (2 * x - 1)  # pushes every pixel out of the box (0 down, 1 up)
    start = (x + eta).clamp(0, 1)
    assert torch.equal(start, x)
    x_adv = defense.perturb(model, x, y, eta)
    expected = (x + 0.1 * input_gradient(model, x, y)[0].sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_generator_input_is_image_and_clean_gradient_sign():
    model, defense, x, y = make(batch=8)
    assert defense.generator.net[0].in_channels == 2  # 2 x image channels
    grad_sign = input_gradient(model, x, y)[0].sign()
    defense.generator.eval()
    with torch.no_grad():
        eta = defense.initialization(x, grad_sign)
        flipped = defense.initialization(x, -grad_sign)
    assert not torch.allclose(eta, flipped)  # the gradient sign is an input


def test_generator_updates_only_on_every_kth_batch_and_target_every_batch():
    model, defense, x, y = make({"generator_update_every": 3})
    update = sgd_update(model)
    generator_changes, target_changes = [], []
    for step in range(7):
        g_before, t_before = snapshot(defense.generator), snapshot(model)
        defense.train_step(model, x, y, torch.arange(len(y)), step, update)
        generator_changes.append(changed(g_before, defense.generator))
        target_changes.append(changed(t_before, model))
    assert generator_changes == [False, False, True, False, False, True, False]
    assert all(target_changes)
    assert defense.generator_updates == 2 and defense.batches_seen == 7


def test_generator_update_does_not_touch_the_target():
    model, defense, x, y = make()
    before = snapshot(model)
    defense.update_generator(model, x, y, input_gradient(model, x, y)[0].sign())
    assert not changed(before, model)
    assert all(p.grad is None for p in model.parameters())


def test_generator_ascends_the_targets_loss_through_the_fgsm_step():
    model, defense, x, y = make({"generator_lr": 1e-2}, batch=32)
    grad_sign = input_gradient(model, x, y)[0].sign()

    def loss_at_generated_examples():
        defense.generator.train()  # compare in the mode the updates see
        x_train = defense.perturb(model, x, y, defense.initialization(x, grad_sign))
        return smoothed_cross_entropy(model(x_train), y, 0.1).item()

    before = loss_at_generated_examples()
    losses = [defense.update_generator(model, x, y, grad_sign).item() for _ in range(15)]
    after = loss_at_generated_examples()
    # The FGSM sign is a constant, so this rise came through x + eta (and a sign error would lower it).
    assert after > before + 0.01 and losses[-1] > losses[0]


def test_target_loss_is_smoothed_ce_on_the_generated_examples():
    model, defense, x, y = make(batch=16)
    seen = []
    result = defense.train_step(model, x, y, torch.arange(16), 0, seen.append)
    x_adv, _ = defense.adversarial_examples(model, x, y)  # deterministic: G in eval mode, no randomness
    expected = smoothed_cross_entropy(model(x_adv), y, 0.1)
    assert len(seen) == 1 and result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    target = torch.full((16, 10), 0.1 / 9)
    target[torch.arange(16), y] = 0.9  # code: _label_smoothing(label, factor=0.9)
    logits = model(x_adv)
    assert expected.item() == pytest.approx(-(target * F.log_softmax(logits, 1)).sum(1).mean().item(), rel=1e-6)


def test_state_round_trip_restores_generator_optimizer_and_counters():
    model, defense, x, y = make({"generator_update_every": 2})
    update = sgd_update(model)
    for step in range(3):
        defense.train_step(model, x, y, torch.arange(16), step, update)
    buffer = io.BytesIO()
    torch.save(defense.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _, fresh, _, _ = make({"generator_update_every": 2}, seed=3)  # different initial generator
    fresh.load_state_dict(state)
    assert fresh.batches_seen == 3 and fresh.generator_updates == 1
    for name, value in defense.generator.state_dict().items():
        assert torch.equal(value, fresh.generator.state_dict()[name]), name
    # Same next update from both (Adam moments restored): batch 4 is an update batch.
    grad_sign = input_gradient(model, x, y)[0].sign()
    defense.update_generator(model, x, y, grad_sign)
    fresh.update_generator(model, x, y, grad_sign)
    for a, b in zip(defense.generator.parameters(), fresh.generator.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_cost_counts_clean_gradient_fgsm_training_and_generator_updates():
    assert create_defense("fgsm_sdi").cost() == Cost(3.1, 3.1)
    assert create_defense("fgsm_sdi", {"generator_update_every": 1}).cost() == Cost(5, 5)


def test_defaults():
    d = create_defense("fgsm_sdi")
    assert (d.alpha_ratio, d.generator_update_every, d.generator_lr, d.label_smoothing) == (1.0, 20, 1e-3, 0.1)


@pytest.mark.parametrize("key,value", [("generator_update_every", 0), ("alpha_ratio", 0.0),
                                       ("label_smoothing", 1.0), ("generator_lr", -1.0)])
def test_fields_are_validated(key, value):
    with pytest.raises(ConfigError, match=key):
        create_defense("fgsm_sdi", {key: value})


def test_epoch_metrics():
    model, defense, x, y = make({"generator_update_every": 2})
    update = sgd_update(model)
    for step in range(3):
        defense.train_step(model, x, y, torch.arange(16), step, update)
    metrics = defense.on_epoch_end(model, 0)
    assert metrics["sdi/generator_updates"] == 1 and 0 < metrics["sdi/init_abs"] <= 1
    assert math.isfinite(metrics["sdi/generator_loss"])
    assert defense.on_epoch_end(model, 1) == {"sdi/generator_updates": 0}  # reset


def test_training_loop_epoch_and_checkpoint_round_trip():
    overrides = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                 "train.epochs=1", "data.train_subset=640", "method.generator_update_every=4",
                 "method.generator_width=16"]
    loop = TrainingLoop(load_config("fgsm_sdi", overrides=overrides), log=lambda _: None)
    metrics = loop.run_epoch()
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["train/sdi/generator_updates"] == 2
    buffer = io.BytesIO()
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = TrainingLoop(load_config("fgsm_sdi", overrides=overrides), log=lambda _: None)
    fresh.load_state_dict(state, "test")
    assert fresh.defense.batches_seen == 10 and fresh.defense.generator_updates == 2
    for name, value in loop.defense.generator.state_dict().items():
        assert torch.equal(value, fresh.defense.generator.state_dict()[name]), name
    assert fresh.defense.generator_optimizer.state_dict()["state"][0]["step"] == 2
