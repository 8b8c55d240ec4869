"""ATLD: label-free latent-manifold examples, the logit discriminator, the consistency weight and IMT."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustune.attacks import pgd
from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.models import create_model
from robustune.loop import TrainingLoop
from helpers import sgd_update, snapshot

EPS = 0.1


def new_model():
    return create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))


def make(params=None, model=None):
    torch.manual_seed(0)
    model = model if model is not None else new_model()
    defense = create_defense("atld", params)
    defense.setup(model, DefenseContext(epsilon=EPS, num_classes=10, input_shape=(1, 28, 28), num_train_examples=64,
                                        epochs=1, steps_per_epoch=1, device=torch.device("cpu")))
    return model, defense


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :4] = 0.0  # pixels on the box's faces
    x[:, :, -4:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


class Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


# ------------------------------------------------------------------------------------------------ config
def test_defaults_cost_and_validation():
    d = create_defense("atld")
    assert (d.step_ratio, d.random_start, d.label_smoothing) == (1.0, True, 0.5)
    assert (d.discriminator_optimizer, d.discriminator_lr, d.discriminator_steps) == ("adam", 1e-3, 2)
    assert d.discriminator_input == "standardized"
    assert (d.consistency, d.consistency_weight, d.imt, d.imt_plus, d.imt_step_ratio) == \
        ("grad_ratio", 0.5, True, True, 1.0)
    assert d.cost() == Cost(3, 4)
    assert create_defense("atld", {"consistency": "fixed"}).cost() == Cost(3, 2)
    for key, value in [("step_ratio", 0.0), ("label_smoothing", 1.0), ("discriminator_steps", 0),
                       ("imt_step_ratio", 1.5), ("consistency", "none"), ("discriminator_lr", -1.0),
                       ("discriminator_optimizer", "rmsprop"), ("discriminator_input", "softmax")]:
        with pytest.raises(ConfigError, match=key):
            create_defense("atld", {key: value})


def test_discriminator_optimizer_default_and_the_papers_option():
    _, d = make()
    assert isinstance(d.d_optimizer, torch.optim.Adam)
    assert d.d_optimizer.param_groups[0]["lr"] == 1e-3 and d.d_optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    _, paper = make({"discriminator_optimizer": "sgd", "discriminator_input": "logits"})
    assert not paper.discriminator.standardize and d.discriminator.standardize
    group = paper.d_optimizer.param_groups[0]
    assert isinstance(paper.d_optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 2e-4)
    assert paper.discriminator_steps == 2


def test_label_smoothing_follows_the_authors_formula():
    from robustune.methods.atld import smoothed_targets

    t = smoothed_targets(torch.tensor([3, 0]), 10, 0.5)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert t[0, 3] == 0.5 and t[1, 0] == 0.5 and torch.allclose(t[0, :3], torch.full((3,), 0.5 / 9))


# ------------------------------------------------------------------------------------------------ LMAE
@pytest.mark.parametrize("random_start", [True, False])
def test_latent_manifold_example_stays_in_the_ball_and_the_box(random_start):
    model, d = make({"random_start": random_start, "step_ratio": 1.5})
    x, _ = batch()
    x_adv = d.latent_manifold_example(model, x)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2


def test_latent_manifold_example_makes_the_logits_look_perturbed_to_d():
    model, d = make({"random_start": False, "step_ratio": 0.02})
    x, _ = batch(seed=4)
    x = x.clamp(0.05, 0.95)
    x_adv = d.latent_manifold_example(model, x)
    with torch.no_grad():
        natural_score_before = d.discriminator(model(x))[:, 0]
        natural_score_after = d.discriminator(model(x_adv))[:, 0]
    assert (natural_score_after < natural_score_before).float().mean() > 0.9


def test_latent_manifold_example_uses_no_labels():
    x, y = batch()
    crafted = []
    for labels in (y, y[torch.randperm(16, generator=torch.Generator().manual_seed(3))]):
        model, d = make()
        recorder = Recorder(model)
        torch.manual_seed(11)
        d.train_step(recorder, x, labels, torch.arange(16), 0, lambda loss: None)
        crafted.append(recorder.inputs[-1])  # the classifier's training input x_adv
    assert (crafted[0] - x).abs().max() > 0
    assert torch.equal(crafted[0], crafted[1])


# ----------------------------------------------------------------------------------- who updates what
def test_discriminator_step_changes_only_the_discriminator():
    from robustune.methods.atld import smoothed_targets

    model, d = make()
    x, y = batch()
    with torch.no_grad():
        natural = model(x)
        perturbed = model(d.latent_manifold_example(model, x))
    before_c, before_d = snapshot(model), snapshot(d.discriminator)
    d.train_discriminator(natural, perturbed, smoothed_targets(y, 10, 0.5))
    assert all(changed(before_d, d.discriminator))
    assert not any(changed(before_c, model))
    assert all(p.grad is None for p in model.parameters())


def test_discriminator_learns_to_separate_natural_from_perturbed_logits():
    from robustune.methods.atld import smoothed_targets

    _, d = make({"discriminator_optimizer": "sgd", "discriminator_lr": 0.05, "discriminator_steps": 1,
                 "discriminator_input": "logits"})  # the two sets differ by a shift only
    g = torch.Generator().manual_seed(0)
    natural, perturbed = torch.randn(64, 10, generator=g) + 2.0, torch.randn(64, 10, generator=g) - 2.0
    targets = smoothed_targets(torch.randint(0, 10, (64,), generator=g), 10, 0.5)
    _, first_natural, first_perturbed = d.train_discriminator(natural, perturbed, targets)
    for _ in range(60):
        loss, accuracy_natural, accuracy_perturbed = d.train_discriminator(natural, perturbed, targets)
    assert min(accuracy_natural, accuracy_perturbed) > 0.95
    assert accuracy_natural + accuracy_perturbed > first_natural + first_perturbed


def short_run_accuracy(params, batches=40):
    """D's accuracy (natural, perturbed) on 10 fresh batches after `batches` others, each batch scored before D
    trains on it. Natural logits peak at the label; perturbed ones also raise a runner-up class (as a step
    towards another class does); both noisy. 40 batches are half an epoch of the 3-epoch, 10k-image run."""
    from robustune.methods.atld import smoothed_targets

    _, d = make(params)
    g = torch.Generator().manual_seed(0)

    def train_on_fresh_batch():
        y = torch.randint(0, 10, (64,), generator=g)
        runner_up = (y + torch.randint(1, 10, (64,), generator=g)) % 10
        natural = 2.0 * F.one_hot(y, 10).float() + 0.3 * torch.randn(64, 10, generator=g)
        perturbed = natural + 1.5 * F.one_hot(runner_up, 10).float() + 0.3 * torch.randn(64, 10, generator=g)
        d.train_discriminator(natural, perturbed, smoothed_targets(y, 10, 0.5))

    for _ in range(batches):
        train_on_fresh_batch()
    d.on_epoch_end(None, 0)  # drop the counts of those batches
    for _ in range(10):
        train_on_fresh_batch()
    metrics = d.on_epoch_end(None, 1)
    return metrics["disc_acc_natural"], metrics["disc_acc_perturbed"]


def test_discriminator_leaves_chance_within_a_short_run_with_the_defaults():
    natural, perturbed = short_run_accuracy({})
    assert natural > 0.65 and perturbed > 0.65
    # The paper's D (SGD at 1e-3, sized for hundreds of epochs, on raw logits) is still at chance after as many
    # batches: it calls nearly everything one way.
    natural, perturbed = short_run_accuracy({"discriminator_optimizer": "sgd", "discriminator_input": "logits"})
    assert (natural + perturbed) / 2 < 0.6


def test_discriminator_input_standardization_removes_shift_and_scale():
    _, d = make()
    _, raw = make({"discriminator_input": "logits"})
    raw.discriminator.load_state_dict(d.discriminator.state_dict())
    logits = torch.randn(8, 10)
    with torch.no_grad():
        assert torch.allclose(d.discriminator(logits), d.discriminator(3.0 * logits + 5.0), atol=1e-5)
        assert not torch.allclose(raw.discriminator(logits), raw.discriminator(3.0 * logits + 5.0), atol=1e-3)
        standardized = (logits - logits.mean(1, keepdim=True)) / logits.std(1, keepdim=True, correction=0)
        assert torch.allclose(d.discriminator(logits), raw.discriminator(standardized), atol=1e-5)


def test_epoch_end_reports_discriminator_accuracy_on_each_side_and_resets():
    from robustune.methods.atld import ATLD, smoothed_targets

    assert ATLD.progress_metrics == ("disc_acc_natural", "disc_acc_perturbed")
    _, d = make({"discriminator_lr": 1e-12})  # D stays (practically) where it is set below
    with torch.no_grad():
        d.discriminator.head.weight[0] = 0.0
        d.discriminator.head.bias[0] = 5.0  # calls everything natural
    y = torch.arange(16) % 10
    for _ in range(3):
        d.train_discriminator(torch.randn(16, 10), torch.randn(16, 10), smoothed_targets(y, 10, 0.5))
    assert d.on_epoch_end(None, 0) == {"disc_acc_natural": 1.0, "disc_acc_perturbed": 0.0}
    assert d.on_epoch_end(None, 1) == {}  # counts start again each epoch
    with torch.no_grad():
        d.discriminator.head.bias[0] = -5.0  # everything perturbed
    d.train_discriminator(torch.randn(16, 10), torch.randn(16, 10), smoothed_targets(y, 10, 0.5))
    assert d.on_epoch_end(None, 2) == {"disc_acc_natural": 0.0, "disc_acc_perturbed": 1.0}


def test_classifier_update_changes_only_the_classifier():
    from robustune.methods.atld import smoothed_targets

    model, d = make()
    x, y = batch()
    targets = smoothed_targets(y, 10, 0.5)
    with torch.no_grad():
        natural = model(x)
    x_adv = d.latent_manifold_example(model, x).requires_grad_(True)
    logits = model(x_adv)
    loss, weight, _ = d.classifier_loss(x_adv, logits, natural, targets)
    before_c, before_d = snapshot(model), snapshot(d.discriminator)
    sgd_update(model)(loss)
    assert any(changed(before_c, model))
    assert not any(changed(before_d, d.discriminator))
    assert all(p.grad is None for p in d.discriminator.parameters())


def test_consistency_weight_is_half_the_ratio_of_the_largest_input_gradients():
    from robustune.methods.atld import smoothed_targets, soft_cross_entropy

    model, d = make()
    x, y = batch()
    targets = smoothed_targets(y, 10, 0.5)
    with torch.no_grad():
        natural = model(x)
    x_adv = d.latent_manifold_example(model, x).requires_grad_(True)
    logits = model(x_adv)
    loss, weight, mse = d.classifier_loss(x_adv, logits, natural, targets)
    (g_ce,) = torch.autograd.grad(soft_cross_entropy(model(x_adv), targets), x_adv)
    (g_mse,) = torch.autograd.grad(F.mse_loss(model(x_adv), natural), x_adv)
    expected = 0.5 * g_ce.abs().max() / g_mse.abs().max()
    assert weight.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() == pytest.approx(soft_cross_entropy(logits, targets).item() + expected.item() * mse.item(),
                                        rel=1e-4)
    assert not weight.requires_grad  # a constant, as in the authors' code

    _, fixed = make({"consistency": "fixed", "consistency_weight": 0.25})
    _, weight, _ = fixed.classifier_loss(x_adv.detach(), model(x_adv.detach()), natural, targets)
    assert weight.item() == 0.25


def test_train_step_updates_discriminator_and_classifier():
    model, d = make()
    x, y = batch()
    before_c, before_d = snapshot(model), snapshot(d.discriminator)
    result = d.train_step(model, x, y, torch.arange(16), 0, sgd_update(model))
    assert any(changed(before_c, model)) and all(changed(before_d, d.discriminator))
    assert torch.isfinite(result.loss) and result.logits.shape == (16, 10)
    assert result.metrics["atld_consistency_weight"] > 0 and result.metrics["atld_d_loss"] > 0
    assert set(d.on_epoch_end(model, 0)) == {"disc_acc_natural", "disc_acc_perturbed"}


# ------------------------------------------------------------------------------------------------ IMT
def synthetic(n, offset=0):
    from robustune.data import load_dataset

    train = load_dataset("synthetic", val_size=100, train_subset=1280).train
    return train.images[offset:offset + n].float().div(255), train.labels[offset:offset + n]


def trained(steps=15, params=None):
    """ATLD after a few steps on learnable synthetic data (10 template classes), in eval mode."""
    model, d = make({"consistency": "fixed", **(params or {})})
    update = sgd_update(model, lr=0.2)
    x, y = synthetic(64 * steps)
    for step in range(steps):
        rows = slice(64 * step, 64 * (step + 1))
        d.train_step(model, x[rows], y[rows], torch.arange(64), step, update)
    model.eval()
    return model, d


def test_inference_model_is_the_imt_wrapper_or_the_bare_model():
    from robustune.methods.atld import ManifoldTransformedModel

    model, d = make()
    wrapper = d.inference_model(model)
    assert isinstance(wrapper, ManifoldTransformedModel)
    assert wrapper.model is model and wrapper.discriminator is d.discriminator
    _, bare = make({"imt": False})
    assert bare.inference_model(model) is model


def test_imt_step_raises_the_natural_score_inside_the_ball():
    model, d = trained(params={"imt_step_ratio": 0.05})
    wrapper = d.inference_model(model)
    x, _ = batch(seed=7)
    x_t = wrapper.transform(x)
    assert (x_t - x).abs().max() <= EPS + 1e-6 and x_t.min() >= 0 and x_t.max() <= 1
    with torch.no_grad():
        before = d.discriminator(model(x))[:, 0]
        after = d.discriminator(model(x_t))[:, 0]
    assert (after > before).float().mean() > 0.9


def test_imt_plus_halves_the_step_only_when_d_is_uncertain():
    model, d = make({"imt_step_ratio": 0.5})
    x = torch.full((4, 1, 28, 28), 0.5)
    wrapper = d.inference_model(model)
    head = d.discriminator.head
    with torch.no_grad():
        head.weight[0] *= 1e-3  # natural probability ~ sigmoid(bias)
        head.bias[0] = 0.0  # ~0.5: uncertain
    assert torch.allclose((wrapper.transform(x) - x).abs(), torch.full_like(x, 0.25 * EPS), atol=1e-6)
    with torch.no_grad():
        head.bias[0] = 5.0  # confident: full step
    assert torch.allclose((wrapper.transform(x) - x).abs(), torch.full_like(x, 0.5 * EPS), atol=1e-6)
    _, plain = make({"imt_step_ratio": 0.5, "imt_plus": False})
    plain.discriminator.load_state_dict(d.discriminator.state_dict())
    with torch.no_grad():
        plain.discriminator.head.bias[0] = 0.0
    assert torch.allclose((plain.inference_model(model).transform(x) - x).abs(), torch.full_like(x, 0.5 * EPS),
                          atol=1e-6)


def test_imt_changes_predictions_on_attacked_inputs():
    model, d = trained()
    x, y = synthetic(64, offset=1100)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.5  # the classifier has learned something
    x_adv = pgd(model, x, y, EPS, alpha=EPS / 4, steps=5)
    wrapper = d.inference_model(model)
    with torch.no_grad():
        bare_pred, imt_pred = model(x_adv).argmax(1), wrapper(x_adv).argmax(1)
    assert (bare_pred != imt_pred).any()
    d.imt_step_ratio = 0.0  # control: a zero step is the bare classifier
    with torch.no_grad():
        assert torch.equal(d.inference_model(model)(x_adv).argmax(1), bare_pred)


def test_imt_wrapper_is_differentiable_end_to_end():
    model, d = trained(params={"imt_step_ratio": 0.5})
    wrapper = d.inference_model(model).eval()
    x, y = batch(n=8, seed=5)
    x = x.clamp(0.2, 0.8).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(wrapper(x), y), x)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The step's sign is piecewise constant, so the exact gradient is the classifier's at the moved point.
    x_t = wrapper.transform(x.detach()).requires_grad_(True)
    (grad_at_moved,) = torch.autograd.grad(F.cross_entropy(model(x_t), y), x_t)
    assert torch.allclose(grad, grad_at_moved, atol=1e-6)
    # Under no_grad (clean evaluation) and with frozen parameters (as evaluate() runs it).
    for p in wrapper.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = wrapper(x.detach())
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    x_pgd = pgd(wrapper, x.detach(), y, EPS, alpha=EPS / 4, steps=2)
    assert (x_pgd - x).abs().max() <= EPS + 1e-6


# ------------------------------------------------------------------------------------- adaptive attacks
def test_attack_surrogates_are_the_bare_classifier_and_the_joint_model():
    from robustune.methods.atld import JointAttackModel

    model, d = make()
    surrogates = d.attack_surrogates(model)
    assert set(surrogates) == {"bare_classifier", "joint"}
    assert surrogates["bare_classifier"] is model
    joint = surrogates["joint"]
    assert isinstance(joint, JointAttackModel) and joint.model is model and joint.discriminator is d.discriminator
    _, bare = make({"imt": False})  # deployed = the bare classifier, which the evaluation attacks anyway
    assert bare.attack_surrogates(model) == {}


def test_surrogates_map_inputs_to_logits_with_gradients_to_the_input():
    model, d = trained(params={"imt_step_ratio": 0.5})
    surrogates = d.attack_surrogates(model)
    for p in [*model.parameters(), *d.discriminator.parameters()]:
        p.requires_grad_(False)  # as the evaluation runs them
    x, y = batch(n=8, seed=5)
    x = x.clamp(0.2, 0.8).requires_grad_(True)
    for name, width in (("bare_classifier", 10), ("joint", 11)):  # joint: K classes + D's "natural" column
        logits = surrogates[name](x)
        assert logits.shape == (8, width) and torch.isfinite(logits).all()
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_joint_cross_entropy_is_the_classifier_loss_plus_the_discriminator_loss():
    model, d = trained()
    joint = d.attack_surrogates(model)["joint"]
    x, _ = batch(n=8, seed=6)
    with torch.no_grad():
        logits, natural_logit, out = model(x), d.discriminator(model(x))[:, 0], joint(x)
        assert natural_logit.std() > 0  # D's term varies from input to input
        d_loss = F.binary_cross_entropy_with_logits(natural_logit, torch.zeros_like(natural_logit), reduction="none")
        for label in range(10):  # every label, not only the true one
            y = torch.full((8,), label)
            expected = F.cross_entropy(logits, y, reduction="none") + d_loss
            assert torch.allclose(F.cross_entropy(out, y, reduction="none"), expected, atol=1e-5)
        # The extra column is D's probability of "natural"; the classes keep f's proportions.
        probs = out.softmax(1)
        assert torch.allclose(probs[:, 10], torch.sigmoid(natural_logit), atol=1e-6)
        assert torch.allclose(probs[:, :10] / probs[:, :10].sum(1, keepdim=True), logits.softmax(1), atol=1e-6)


def test_pgd_on_the_joint_model_also_fools_the_discriminator():
    model, d = trained()
    surrogates = d.attack_surrogates(model)
    x, y = synthetic(64, offset=1100)
    natural_score = {}
    for name, surrogate in surrogates.items():
        x_adv = pgd(surrogate, x, y, EPS, alpha=EPS / 4, steps=5, generator=torch.Generator().manual_seed(0))
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        with torch.no_grad():
            natural_score[name] = d.discriminator(model(x_adv))[:, 0].mean()
    assert natural_score["joint"] > natural_score["bare_classifier"]


# ----------------------------------------------------------------------------------------------- state
def test_discriminator_state_round_trip_through_a_weights_only_checkpoint():
    model, d = make()
    x, y = batch()
    d.train_step(model, x, y, torch.arange(16), 0, sgd_update(model))
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    _, fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(fresh.discriminator.parameters(), d.discriminator.parameters()):
        assert torch.equal(a, b)
    assert d._disc_counts[1] == 16 and torch.equal(fresh._disc_counts, d._disc_counts)  # the epoch's D counts
    older = {key: value for key, value in d.state_dict().items() if key != "disc_counts"}
    make()[1].load_state_dict(older)  # a checkpoint from before the counts loads (they start at zero)
    # Momentum buffers came back too: the next D steps match exactly.
    from robustune.methods.atld import smoothed_targets

    natural, perturbed, targets = torch.randn(16, 10), torch.randn(16, 10), smoothed_targets(y, 10, 0.5)
    d.train_discriminator(natural, perturbed, targets)
    fresh.train_discriminator(natural, perturbed, targets)
    for a, b in zip(fresh.discriminator.parameters(), d.discriminator.parameters()):
        assert torch.equal(a, b)


def test_training_loop_epoch_metrics_and_checkpoint():
    from robustune.methods.atld import ManifoldTransformedModel

    overrides = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                 "train.epochs=1", "data.train_subset=640"]
    loop = TrainingLoop(load_config("atld", overrides=overrides), log=lambda _: None)
    metrics = loop.run_epoch()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert {"train/disc_acc_natural", "train/disc_acc_perturbed", "train/atld_d_loss", "val/pgd_acc"} <= set(metrics)
    assert all(0.0 <= metrics[f"train/{name}"] <= 1.0 for name in loop.defense.progress_metrics)
    assert isinstance(loop.defense.inference_model(loop.model), ManifoldTransformedModel)
    buffer = io.BytesIO()
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    fresh = TrainingLoop(load_config("atld", overrides=overrides), log=lambda _: None)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), "test")
    for a, b in zip(fresh.defense.discriminator.parameters(), loop.defense.discriminator.parameters()):
        assert torch.equal(a, b)
    assert fresh.defense.d_optimizer.state_dict()["state"].keys() == \
        loop.defense.d_optimizer.state_dict()["state"].keys()


def test_search_space_is_valid():
    from robustune.search_space import load_space

    space = load_space("atld")
    assert {"method.step_ratio", "method.label_smoothing", "method.consistency_weight", "train.lr"} <= set(space)


def test_atld_clips_gradients_by_default_and_the_config_can_change_or_drop_it():
    """ATLD's own training default (Defense.train_defaults) fills train.grad_clip only where the config is
    silent; other defenses are untouched."""
    from robustune.resolve import load_config

    assert load_config("atld").train.grad_clip == 1.0
    assert load_config("atld", overrides=["train.grad_clip=5"]).train.grad_clip == 5.0
    assert load_config("atld", overrides=["train.grad_clip=null"]).train.grad_clip is None
    assert load_config("fgsm_rs").train.grad_clip is None
    # the resolved config carries it, so a run folder's config reproduces the run without the defense's help
    assert load_config("atld").to_dict()["train"]["grad_clip"] == 1.0
