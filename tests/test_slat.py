"""SLAT (single-step latent adversarial training): which stages it perturbs, by how much, at what cost."""

import math

import pytest
import torch
import torch.nn.functional as F

from robustune.attacks import clamp_to_ball
from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.models import create_model

LOOP_OVERRIDES = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                  "train.epochs=1", "data.train_subset=640"]
EPS = 0.1


def small_cnn():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))


def make(params=None, model=None, epsilon=EPS):
    model = model or small_cnn()
    defense = create_defense("slat", params)
    defense.setup(model, DefenseContext(epsilon=epsilon, num_classes=10, input_shape=model.input_shape,
                                        num_train_examples=64, epochs=1, steps_per_epoch=1,
                                        device=torch.device("cpu")))
    return defense, model


def batch(shape=(1, 28, 28), n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    x[:, :, :4] = 0.0  # pixels on the box edges: the projection to [0, 1] must bite
    x[:, :, -4:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def spy_calls(model):
    """Record (input, latent_perturbations) of every forward call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach().clone(), kwargs.get("latent_perturbations")))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def reference_gradients(model, x, y, stages):
    """Clean-loss gradients at the input and the stage outputs, computed independently."""
    x = x.clone().requires_grad_(True)
    capture = {}
    loss = F.cross_entropy(model(x, capture=capture), y)
    grads = torch.autograd.grad(loss, [x] + [capture[s] for s in stages])
    return grads[0], dict(zip(stages, grads[1:]))


def test_defaults_cost_and_validation():
    defense = create_defense("slat")
    assert (defense.latent_stages, defense.stages, defense.input_step_ratio, defense.latent_step_ratio) == (2, [], 1.0, 1.0)
    assert not defense.random_magnitude and not defense.random_start
    assert defense.cost() == Cost(2, 2)
    for bad in ({"latent_stages": -1}, {"input_step_ratio": -0.1}, {"latent_step_ratio": -1.0},
                {"stages": ["conv1", "conv1"]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            create_defense("slat", bad)


@pytest.mark.parametrize("params, expected", [
    ({}, ["conv1", "conv2"]),  # default: the first two stages
    ({"latent_stages": 1}, ["conv1"]),
    ({"latent_stages": 3}, ["conv1", "conv2", "fc1"]),
    ({"stages": ["fc1"]}, ["fc1"]),
    ({"stages": ["fc1", "conv1"]}, ["conv1", "fc1"]),
])
def test_perturbs_exactly_the_chosen_stages_by_eta_times_the_gradient_sign(params, expected):
    defense, model = make({"latent_step_ratio": 0.7, **params})
    x, y = batch()
    gx, glatent = reference_gradients(model, x, y, expected)
    calls = spy_calls(model)
    result = defense.loss(model, x, y, torch.arange(16), 0)
    assert len(calls) == 2
    clean_input, clean_perturbations = calls[0]
    assert torch.equal(clean_input, x) and not clean_perturbations  # first pass: the clean input only
    x_adv, deltas = calls[1]
    assert sorted(deltas) == sorted(expected)  # exactly the chosen stages, nothing else
    eta = 0.7 * EPS
    for name, delta in deltas.items():
        assert not delta.requires_grad
        assert torch.equal(delta, eta * glatent[name].sign()), name
        nonzero = glatent[name] != 0
        assert nonzero.any() and torch.all(delta.abs()[nonzero] == eta) and torch.all(delta[~nonzero] == 0)
    assert torch.equal(x_adv, clamp_to_ball(x + EPS * gx.sign(), x, EPS))
    assert torch.equal(result.logits, model(x_adv, latent_perturbations=deltas))


def test_no_latent_stages_is_fgsm():
    defense, model = make({"latent_stages": 0})
    x, y = batch()
    calls = spy_calls(model)
    torch.manual_seed(0)
    loss = defense.loss(model, x, y, torch.arange(16), 0).loss
    assert not calls[1][1]
    fgsm = create_defense("fgsm")
    fgsm.setup(model, defense.ctx)
    assert loss.item() == pytest.approx(fgsm.loss(model, x, y, None, 0).loss.item(), rel=1e-5)


def test_input_perturbation_stays_in_the_epsilon_ball_and_the_image_box():
    for params in ({"input_step_ratio": 3.0}, {"random_start": True, "input_step_ratio": 1.25}):
        defense, model = make(params, epsilon=0.2)
        x, y = batch()
        calls = spy_calls(model)
        defense.loss(model, x, y, torch.arange(16), 0)
        x_adv = calls[-1][0]
        assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() > 0.15  # the step is really taken


def test_latent_perturbation_increases_the_loss():
    defense, model = make({"latent_stages": 2})
    only_input, _ = make({"latent_stages": 0}, model)
    x, y = batch(n=64)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
    fgsm_loss = only_input.loss(model, x, y, None, 0).loss
    slat_loss = defense.loss(model, x, y, None, 0).loss
    assert clean < fgsm_loss < slat_loss


def test_one_gradient_call_two_forwards_one_update_per_batch(monkeypatch):
    defense, model = make()
    x, y = batch()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    grad_calls = []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        grad_calls.append(len(inputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    updates = []
    defense.train_step(model, x, y, torch.arange(16), 0, updates.append)
    assert len(forwards) == 2
    assert grad_calls == [3]  # one call: the input and both latent stages together
    assert len(updates) == 1
    updates[0].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_random_magnitude_variant_keeps_the_sign_within_eta():
    defense, model = make({"random_magnitude": True})
    x, y = batch()
    _, glatent = reference_gradients(model, x, y, ["conv1", "conv2"])
    calls = spy_calls(model)
    torch.manual_seed(0)
    defense.loss(model, x, y, torch.arange(16), 0)
    for name, delta in calls[1][1].items():
        nonzero = glatent[name] != 0
        assert torch.all(delta.abs() <= EPS + 1e-7)
        assert torch.all(torch.sign(delta)[nonzero & (delta != 0)] == glatent[name].sign()[nonzero & (delta != 0)])
        assert delta.abs()[nonzero].unique().numel() > 10  # magnitudes really vary


@pytest.mark.parametrize("name, kwargs, expected", [
    ("preact_resnet18", {}, ["stem", "layer1"]),
    ("wide_resnet", {"depth": 10, "width": 1}, ["stem", "block1"]),
])
def test_works_on_every_staged_model_through_its_stage_names(name, kwargs, expected):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, **kwargs)
    defense, model = make(model=model, epsilon=8 / 255)
    assert defense.perturbed_stages == expected
    x, y = batch(shape=(3, 32, 32), n=4)
    calls = spy_calls(model)
    capture = {}
    model(x, capture=capture)
    result = defense.loss(model, x, y, torch.arange(4), 0)
    deltas = calls[-1][1]
    assert sorted(deltas) == sorted(expected)
    for stage, delta in deltas.items():
        assert delta.shape == capture[stage].shape
        eta = torch.tensor(8 / 255)
        assert torch.all((delta.abs() == eta) | (delta == 0)) and (delta != 0).any()
    assert math.isfinite(result.loss.item())
    result.loss.backward()


def test_unknown_stages_fail_at_setup_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'block9'.*valid stages: \['conv1', 'conv2', 'fc1'\]"):
        make({"stages": ["conv1", "block9"]})
    with pytest.raises(ConfigError, match=r"latent_stages=4 .*only 3 stages: \['conv1', 'conv2', 'fc1'\]"):
        make({"latent_stages": 4})


def test_runs_in_the_training_loop_and_its_state_survives_a_checkpoint(tmp_path):
    from robustune.loop import TrainingLoop

    loop = TrainingLoop(load_config("slat", overrides=LOOP_OVERRIDES), log=lambda _: None)
    metrics = loop.run_epoch()
    for key in ("train/loss", "train/acc", "train/clean_batch_acc", "val/clean_acc", "val/pgd_acc"):
        assert math.isfinite(metrics[key]), key
    torch.save(loop.state_dict(), tmp_path / "state.pt")
    fresh = TrainingLoop(load_config("slat", overrides=LOOP_OVERRIDES), log=lambda _: None)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), "test")
    assert fresh.epoch == 1 and fresh.defense.perturbed_stages == ["conv1", "conv2"]
    for key, value in loop.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[key])
