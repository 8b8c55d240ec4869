"""Behaviour tests for robustune.models (staged forward, registry, errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustune import models
from robustune.models import (
    ModelError,
    StagedModel,
    create_model,
    default_model_for,
    list_models,
    register_model,
)

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)

# Every registered model with a cheap config. Full-size WRNs are only used for the shape test.
CONFIGS: dict[str, tuple[tuple[int, int, int], dict]] = {
    "small_cnn": (MNIST_SHAPE, {}),
    "preact_resnet18": (CIFAR_SHAPE, {}),
    "wide_resnet": (CIFAR_SHAPE, {"depth": 10, "width": 1}),
    "wrn_28_10": (CIFAR_SHAPE, {}),
    "wrn_34_10": (CIFAR_SHAPE, {}),
}
# Cheap models for the per-stage tests; together they cover every StagedModel subclass.
CHEAP = ["small_cnn", "preact_resnet18", "wide_resnet"]


def build(name: str, num_classes: int = 10, seed: int = 0, **overrides) -> StagedModel:
    shape, kwargs = CONFIGS[name]
    kwargs = {**kwargs, **overrides}
    torch.manual_seed(seed)
    stats = {"mean": [0.4] * shape[0], "std": [0.2] * shape[0]}
    return create_model(name, num_classes=num_classes, input_shape=shape, **stats, **kwargs).eval()


def batch(name: str, b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, *CONFIGS[name][0]), generator=g)


def test_configs_cover_every_registered_model():
    # A newly registered model must be added to CONFIGS so the tests below exercise it.
    assert set(CONFIGS) == set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_and_capture(name):
    model = build(name, num_classes=7)
    assert model.num_classes == 7
    assert model.input_shape == CONFIGS[name][0]
    assert len(model.stage_names) > 0
    assert isinstance(model.stage_names, tuple)
    capture: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = model(batch(name, b=2), capture=capture)
    assert out.shape == (2, 7)
    assert list(capture) == list(model.stage_names)  # exactly the stages, in forward order
    assert all(t.shape[0] == 2 for t in capture.values())


@pytest.mark.parametrize(
    "name,shape",
    [("small_cnn", (3, 28, 28)), ("preact_resnet18", (1, 32, 32)), ("wide_resnet", (5, 32, 32))],
)
def test_any_channel_count(name, shape):
    kwargs = CONFIGS[name][1]
    model = create_model(name, num_classes=3, input_shape=shape, mean=[0.5], std=[0.5], **kwargs)
    assert model(torch.rand(2, *shape)).shape == (2, 3)


def test_stage_names():
    assert build("small_cnn").stage_names == ("conv1", "conv2", "fc1")
    assert build("preact_resnet18").stage_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert build("wide_resnet").stage_names == ("stem", "block1", "block2", "block3")


def test_small_cnn_architecture_and_width():
    model = build("small_cnn")
    capture: dict[str, torch.Tensor] = {}
    model(batch("small_cnn"), capture=capture)
    assert {k: tuple(v.shape[1:]) for k, v in capture.items()} == {
        "conv1": (32, 14, 14),
        "conv2": (64, 7, 7),
        "fc1": (128,),
    }
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    wide = build("small_cnn", width=2)
    wide(batch("small_cnn"), capture=capture)
    assert capture["fc1"].shape[1] == 256


def test_normalization_is_inside_small_cnn():
    mean, std = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.2, 0.25, 0.4])
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, input_shape=(3, 28, 28), mean=mean.tolist(), std=std.tolist())
    x = torch.rand(4, 3, 28, 28)

    # By hand from the raw parameters: normalize -> conv1 -> conv2 -> fc1 -> head.
    conv1, conv2, fc1 = model.stages["conv1"][0], model.stages["conv2"][0], model.stages["fc1"][1]
    h = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    h = F.relu(F.conv2d(h, conv1.weight, conv1.bias, stride=2, padding=1))
    h = F.relu(F.conv2d(h, conv2.weight, conv2.bias, stride=2, padding=1))
    h = F.relu(F.linear(h.flatten(1), fc1.weight, fc1.bias))
    expected = F.linear(h, model.head.weight, model.head.bias)
    torch.testing.assert_close(model(x), expected)

    # Same weights, other mean -> other output.
    torch.manual_seed(0)
    other = create_model("small_cnn", num_classes=10, input_shape=(3, 28, 28), mean=[0.0, 0.0, 0.0], std=std.tolist())
    assert not torch.allclose(model(x), other(x))


def test_normalization_stats_are_buffers_in_state_dict():
    model = build("small_cnn")
    sd = model.state_dict()
    assert "normalize.mean" in sd and "normalize.std" in sd
    assert "normalize.mean" not in dict(model.named_parameters())  # fixed stats, never trained
    torch.testing.assert_close(sd["normalize.mean"].flatten(), torch.tensor([0.4]))


def test_single_mean_value_broadcasts_to_channels():
    torch.manual_seed(0)
    a = create_model("small_cnn", num_classes=10, input_shape=(3, 28, 28), mean=[0.5], std=[0.25])
    torch.manual_seed(0)
    b = create_model("small_cnn", num_classes=10, input_shape=(3, 28, 28), mean=[0.5] * 3, std=[0.25] * 3)
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(a(x), b(x))


def test_deterministic_under_manual_seed():
    a, b = build("preact_resnet18", seed=3), build("preact_resnet18", seed=3)
    c = build("preact_resnet18", seed=4)
    x = batch("preact_resnet18")
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


@pytest.mark.parametrize("name", CHEAP)
def test_zero_perturbation_is_bit_identical(name):
    model, x = build(name), batch(name)
    with torch.no_grad():
        clean = model(x)
        capture: dict[str, torch.Tensor] = {}
        model(x, capture=capture)
        zeros = {n: torch.zeros_like(t) for n, t in capture.items()}
        assert torch.equal(model(x, latent_perturbations=zeros), clean)
        assert torch.equal(model(x, latent_perturbations={}), clean)


@pytest.mark.parametrize("name", CHEAP)
def test_perturbation_affects_only_downstream(name):
    model, x = build(name), batch(name)
    names = model.stage_names
    with torch.no_grad():
        clean_cap: dict[str, torch.Tensor] = {}
        clean = model(x, capture=clean_cap)
        for k, stage in enumerate(names):
            g = torch.Generator().manual_seed(k)
            delta = torch.randn(clean_cap[stage].shape, generator=g)
            cap: dict[str, torch.Tensor] = {}
            out = model(x, latent_perturbations={stage: delta}, capture=cap)
            assert not torch.allclose(out, clean), f"perturbing {stage} did not change the logits"
            for j, other in enumerate(names):
                if j <= k:  # upstream and the stage itself (captured before the perturbation)
                    assert torch.equal(cap[other], clean_cap[other]), f"{other} changed when perturbing {stage}"
                else:
                    assert not torch.allclose(cap[other], clean_cap[other]), f"{other} unchanged when perturbing {stage}"


def test_unknown_stage_key_raises():
    model = build("small_cnn")
    with pytest.raises(ModelError, match="layer9") as info:
        model(batch("small_cnn"), latent_perturbations={"layer9": torch.zeros(1)})
    assert "conv1" in str(info.value) and "fc1" in str(info.value)  # lists the valid names
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("name", CHEAP)
def test_grad_wrt_input_and_all_stage_outputs_in_one_backward(name):
    model = build(name).train()
    x = batch(name, b=2).requires_grad_(True)
    y = torch.tensor([0, 1])
    capture: dict[str, torch.Tensor] = {}
    loss = F.cross_entropy(model(x, capture=capture), y)
    names = list(model.stage_names)
    grads = torch.autograd.grad(loss, [x] + [capture[n] for n in names])
    assert len(grads) == 1 + len(names)
    for g, t in zip(grads, [x] + [capture[n] for n in names]):
        assert g is not None and g.shape == t.shape
        assert torch.isfinite(g).all()
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("name", CHEAP)
def test_grad_wrt_capture_equals_grad_wrt_perturbation(name):
    # SLAT's latent step uses either; they must agree because the delta is added to the captured output.
    model, x = build(name), batch(name)
    capture: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model(x, capture=capture)
    deltas = {n: torch.zeros_like(t, requires_grad=True) for n, t in capture.items()}
    capture = {}
    loss = model(x, latent_perturbations=deltas, capture=capture).logsumexp(1).sum()
    names = list(model.stage_names)
    grads = torch.autograd.grad(loss, [capture[n] for n in names] + [deltas[n] for n in names])
    for i, n in enumerate(names):
        torch.testing.assert_close(grads[i], grads[len(names) + i], msg=f"stage {n}")


def test_compiles_without_graph_breaks():
    model = build("small_cnn")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = batch("small_cnn")
    capture: dict[str, torch.Tensor] = {}
    delta = {"conv2": torch.full((2, 64, 7, 7), 0.1)}
    out = compiled(x, latent_perturbations=delta, capture=capture)
    torch.testing.assert_close(out, model(x, latent_perturbations=delta))
    assert list(capture) == list(model.stage_names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CHEAP)
def test_cuda_matches_cpu(name):
    model, x = build(name), batch(name)
    expected = model(x)
    out = model.cuda()(x.cuda(), latent_perturbations={model.stage_names[0]: torch.zeros(1, device="cuda")})
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ errors / registry


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as info:
        create_model("resnet9000", num_classes=10, input_shape=CIFAR_SHAPE, mean=[0.5], std=[0.5])
    assert "resnet9000" in str(info.value)
    for name in list_models():
        assert name in str(info.value)


def test_unknown_kwarg_is_named():
    with pytest.raises(ModelError, match="depht"):
        create_model("wide_resnet", num_classes=10, input_shape=CIFAR_SHAPE, mean=[0.5], std=[0.5], depht=10)
    with pytest.raises(ModelError, match="width"):
        create_model("preact_resnet18", num_classes=10, input_shape=CIFAR_SHAPE, mean=[0.5], std=[0.5], width=2)


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [
        ("small_cnn", (3, 32, 32), {}),
        ("preact_resnet18", (1, 28, 28), {}),
        ("wide_resnet", (3, 28, 28), {"depth": 10, "width": 1}),
        ("small_cnn", (28, 28), {}),
    ],
)
def test_incompatible_input_shape(name, shape, kwargs):
    with pytest.raises(ModelError, match="input_shape"):
        create_model(name, num_classes=10, input_shape=shape, mean=[0.5], std=[0.5], **kwargs)


@pytest.mark.parametrize("depth", [27, 4, 0])
def test_bad_wrn_depth(depth):
    with pytest.raises(ModelError, match="depth"):
        create_model("wide_resnet", num_classes=10, input_shape=CIFAR_SHAPE, mean=[0.5], std=[0.5], depth=depth, width=1)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"num_classes": 0}, "num_classes"),
        ({"width": 0}, "width"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments(overrides, match):
    args = {"num_classes": 10, "input_shape": CIFAR_SHAPE, "mean": [0.5] * 3, "std": [0.5] * 3, "depth": 10, "width": 1}
    args.update(overrides)
    with pytest.raises(ModelError, match=match):
        create_model("wide_resnet", **args)


def test_default_model_for():
    assert default_model_for((1, 28, 28)) == "small_cnn"
    assert default_model_for((3, 28, 28)) == "small_cnn"
    assert default_model_for((3, 32, 32)) == "preact_resnet18"
    with pytest.raises(ModelError):
        default_model_for((3, 64, 64))
    for shape in [(1, 28, 28), (3, 32, 32)]:  # the default must accept the shape it is chosen for
        create_model(default_model_for(shape), num_classes=10, input_shape=shape, mean=[0.5], std=[0.5])


def test_register_custom_model_uses_generic_staged_forward():
    class Tiny(StagedModel):
        def __init__(self, *, num_classes, input_shape, mean, std):
            super().__init__(num_classes=num_classes, input_shape=input_shape, mean=mean, std=std)
            self.stages = nn.ModuleDict({"a": nn.Flatten(), "b": nn.Identity()})
            self.head = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)

    try:
        register_model("_tiny_test")(Tiny)
        assert "_tiny_test" in list_models()
        with pytest.raises(ModelError, match="already registered"):
            register_model("_tiny_test")(Tiny)
        model = create_model("_tiny_test", num_classes=2, input_shape=(1, 2, 2), mean=[0.5], std=[0.5])
        assert model.stage_names == ("a", "b")
        x = torch.rand(1, 1, 2, 2)
        capture: dict[str, torch.Tensor] = {}
        out = model(x, latent_perturbations={"a": torch.ones(1, 4)}, capture=capture)
        torch.testing.assert_close(capture["a"], ((x - 0.5) / 0.5).flatten(1))
        torch.testing.assert_close(capture["b"], capture["a"] + 1)
        torch.testing.assert_close(out, model.head(capture["a"] + 1))
        with pytest.raises(ModelError, match="unknown argument"):
            create_model("_tiny_test", num_classes=2, input_shape=(1, 2, 2), mean=[0.5], std=[0.5], depth=3)
    finally:
        models._MODEL_REGISTRY.pop("_tiny_test", None)
