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
from robustune.methods.slat import DEFAULT_ACTIVATION_RATIO

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


def clean_activation_scales(model, x):
    """mean |h_k| over the whole batch for every stage, from a clean forward."""
    capture = {}
    with torch.no_grad():
        model(x, capture=capture)
    return {name: h.abs().mean() for name, h in capture.items()}


def latent_steps(defense, model, x, y):
    """The latent perturbations of one training batch: {stage: delta}."""
    calls = spy_calls(model)
    defense.loss(model, x, y, torch.arange(len(y)), 0)
    return calls[-1][1]


def test_defaults_cost_and_validation():
    defense = create_defense("slat")
    assert (defense.latent_stages, defense.stages, defense.input_step_ratio) == (2, [], 1.0)
    assert (defense.latent_step, defense.latent_step_activation_ratio) == ("relative", DEFAULT_ACTIVATION_RATIO)
    assert defense.latent_step_ratio == 1.0  # the paper's eta_k = eps, kept for latent_step="absolute"
    assert not defense.random_magnitude and not defense.random_start
    assert defense.cost() == Cost(2, 2)
    for bad, message in [
        ({"latent_stages": -1}, "latent_stages"),
        ({"input_step_ratio": -0.1}, "input_step_ratio"),
        ({"latent_step": "absolute", "latent_step_ratio": -1.0}, "latent_step_ratio"),
        ({"latent_step_activation_ratio": -0.1}, "latent_step_activation_ratio"),
        ({"latent_step_activation_ratio": float("inf")}, "latent_step_activation_ratio"),
        ({"latent_step": "scaled"}, r"latent_step.*'relative', 'absolute'"),
        ({"stages": ["conv1", "conv1"]}, "stages"),
        # the knob of the other form would be ignored silently: refused, naming the form it belongs to
        ({"latent_step_ratio": 0.5}, r"latent_step_ratio=0.5 .*only applies with latent_step='absolute'"),
        ({"latent_step": "absolute", "latent_step_activation_ratio": 0.2},
         r"latent_step_activation_ratio=0.2 .*only applies with latent_step='relative'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            create_defense("slat", bad)
    for field in ("latent_step_activation_ratio", "latent_step_ratio"):  # direct construction checks too
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=field):
                type(defense)(**{"latent_step": "absolute" if field == "latent_step_ratio" else "relative",
                                 field: value})
    with pytest.raises(ValueError, match="latent_step must be one of"):
        type(defense)(latent_step="Relative")


@pytest.mark.parametrize("params, expected", [
    ({}, ["conv1", "conv2"]),  # default: the first two stages
    ({"latent_stages": 1}, ["conv1"]),
    ({"latent_stages": 3}, ["conv1", "conv2", "fc1"]),
    ({"stages": ["fc1"]}, ["fc1"]),
    ({"stages": ["fc1", "conv1"]}, ["conv1", "fc1"]),
])
@pytest.mark.parametrize("step", [
    {"latent_step": "absolute", "latent_step_ratio": 0.7},  # the paper's form: eta_k = 0.7 eps, as before
    {"latent_step_activation_ratio": 0.3},  # relative: eta_k = 0.3 mean|h_k| of the batch's clean pass
], ids=["absolute", "relative"])
def test_perturbs_exactly_the_chosen_stages_by_eta_times_the_gradient_sign(params, expected, step):
    defense, model = make({**step, **params})
    x, y = batch()
    gx, glatent = reference_gradients(model, x, y, expected)
    scales = clean_activation_scales(model, x)
    calls = spy_calls(model)
    result = defense.loss(model, x, y, torch.arange(16), 0)
    assert len(calls) == 2
    clean_input, clean_perturbations = calls[0]
    assert torch.equal(clean_input, x) and not clean_perturbations  # first pass: the clean input only
    x_adv, deltas = calls[1]
    assert sorted(deltas) == sorted(expected)  # exactly the chosen stages, nothing else
    for name, delta in deltas.items():
        eta = 0.7 * EPS if step.get("latent_step") == "absolute" else (0.3 * scales[name]).item()
        assert result.metrics[f"latent_step_{name}"] == pytest.approx(eta, rel=1e-6)  # logged as train/...
        assert not delta.requires_grad
        assert torch.allclose(delta, eta * glatent[name].sign(), rtol=1e-6, atol=0), name
        nonzero = glatent[name] != 0
        assert nonzero.any() and torch.all(delta[~nonzero] == 0)
        assert torch.allclose(delta.abs()[nonzero], torch.tensor(eta), rtol=1e-6, atol=0)
    assert torch.equal(x_adv, clamp_to_ball(x + EPS * gx.sign(), x, EPS))
    assert torch.equal(result.logits, model(x_adv, latent_perturbations=deltas))


def test_absolute_step_is_the_old_behaviour_exactly():
    """latent_step="absolute" is the previous implementation: eta_k = latent_step_ratio * eps, bit for bit."""
    defense, model = make({"latent_step": "absolute", "latent_step_ratio": 0.7})
    x, y = batch()
    _, glatent = reference_gradients(model, x, y, ["conv1", "conv2"])
    for name, delta in latent_steps(defense, model, x, y).items():
        assert torch.equal(delta, 0.7 * EPS * glatent[name].sign()), name


def test_relative_step_follows_each_stages_activation_scale_and_absolute_does_not():
    """Doubling conv2's weights and bias doubles its (post-ReLU) output and nothing upstream: the relative
    step doubles at conv2 and stays at conv1; the absolute step stays everywhere."""
    x, y = batch()
    for step, conv2_factor in [({}, 2.0), ({"latent_step": "absolute"}, 1.0)]:
        defense, model = make(step)
        before = {name: delta.abs().max() for name, delta in latent_steps(defense, model, x, y).items()}
        scales_before = clean_activation_scales(model, x)
        with torch.no_grad():
            for p in model.stages["conv2"].parameters():
                p.mul_(2.0)
        scales_after = clean_activation_scales(model, x)
        assert torch.allclose(scales_after["conv2"], 2 * scales_before["conv2"], rtol=1e-5)  # the premise
        after = {name: delta.abs().max() for name, delta in latent_steps(defense, model, x, y).items()}
        assert after["conv1"] == pytest.approx(before["conv1"].item(), rel=1e-6), step
        assert after["conv2"] == pytest.approx(conv2_factor * before["conv2"].item(), rel=1e-5), step


@pytest.mark.parametrize("step", [{}, {"latent_step": "absolute"}], ids=["relative", "absolute"])
def test_random_magnitude_variant_keeps_the_sign_within_eta(step):
    defense, model = make({"random_magnitude": True, **step})
    x, y = batch()
    _, glatent = reference_gradients(model, x, y, ["conv1", "conv2"])
    scales = clean_activation_scales(model, x)
    calls = spy_calls(model)
    torch.manual_seed(0)
    defense.loss(model, x, y, torch.arange(16), 0)
    for name, delta in calls[1][1].items():
        nonzero = glatent[name] != 0
        eta = EPS if step else DEFAULT_ACTIVATION_RATIO * scales[name].item()
        assert torch.all(delta.abs() <= eta * (1 + 1e-6))
        assert delta.abs().max() > 0.9 * eta  # the bound is eta itself, not something smaller
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
        eta = DEFAULT_ACTIVATION_RATIO * capture[stage].abs().mean()  # BatchNorm in train mode: same batch stats
        assert torch.all(torch.isclose(delta.abs(), eta, rtol=1e-5, atol=0) | (delta == 0)) and (delta != 0).any()
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
    assert metrics["train/latent_step_conv1"] > 0 and metrics["train/latent_step_conv2"] > 0
    assert loop.defense.state_dict() == {}  # the step size is recomputed per batch, nothing to checkpoint
    torch.save(loop.state_dict(), tmp_path / "state.pt")
    fresh = TrainingLoop(load_config("slat", overrides=LOOP_OVERRIDES), log=lambda _: None)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), "test")
    assert fresh.epoch == 1 and fresh.defense.perturbed_stages == ["conv1", "conv2"]
    for key, value in loop.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[key])
