"""FGSM-PGI: prior buffers (carry-over, reset, multi-worker merge), the perturbation box, the regularizer."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustune.attacks import clamp_to_ball
from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.defense import Cost, DefenseContext, create_defense
from robustune.models import create_model
from robustune.search_space import check_samples_resolve, load_space
from robustune.loop import TrainingLoop

EPS = 0.1
N = 48  # training examples in the synthetic buffers
LOOP_OVERRIDES = ["data.name=synthetic", "data.val_size=500", "validation.examples=100", "train.batch_size=64",
                  "train.epochs=1", "data.train_subset=640"]


def small_model():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))


def make(params=None, *, rank=0, world_size=1, n=N, epsilon=EPS, model=None):
    model = small_model() if model is None else model
    defense = create_defense("fgsm_pgi", params)
    defense.setup(model, DefenseContext(epsilon=epsilon, num_classes=10, input_shape=(1, 28, 28),
                                        num_train_examples=n, epochs=3, steps_per_epoch=3,
                                        device=torch.device("cpu"), rank=rank, world_size=world_size, seed=5))
    return model, defense


def data(n=N):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def batches(epoch, n=N, size=16):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
    return [order[i:i + size] for i in range(0, n, size)]


def authors_smoothed_ce(logits, y, factor):
    """The authors' _label_smoothing(label, factor): factor on the true class, the rest spread evenly."""
    target = torch.full_like(logits, (1 - factor) / (logits.shape[1] - 1))
    target[torch.arange(len(y)), y] = factor
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def input_grad(model, x_start, y, factor):
    x_start = x_start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(authors_smoothed_ce(model(x_start), y, factor), x_start)
    return grad


def sign_grad(model, x_start, y, factor):
    return input_grad(model, x_start, y, factor).sign()


def run_epoch(model, defense, x, y, epoch, size=16):
    """One epoch of the defense's loss on a fixed model (no weight update), then the epoch end."""
    for idx in batches(epoch, size=size):
        defense.loss(model, x[idx], y[idx], idx, 0)
    defense.on_epoch_end(model, epoch)


def test_defaults_cost_and_validation():
    d = create_defense("fgsm_pgi")
    assert (d.prior, d.alpha_ratio, d.lambda_, d.momentum_decay, d.reset_every, d.label_smoothing) == \
        ("momentum", 1.0, 10.0, 0.3, 40, 0.4)
    assert d.momentum_form == "normalized_gradient"  # the authors' code, not the paper's sign(g) (see below)
    assert d.cost() == Cost(2, 3)
    with pytest.raises(ConfigError, match="method.prior"):
        create_defense("fgsm_pgi", {"prior": "previous"})
    with pytest.raises(ConfigError, match="reset_every"):
        create_defense("fgsm_pgi", {"reset_every": 0})
    with pytest.raises(ConfigError, match="momentum_form"):
        create_defense("fgsm_pgi", {"momentum_form": "l2"})
    from robustune.methods.fgsm_pgi import FGSMPGI
    with pytest.raises(ValueError, match="momentum_form must be 'normalized_gradient' .* or 'sign'"):
        FGSMPGI(momentum_form="signed")  # __post_init__ itself, not only the config layer's Literal check
    assert create_defense("fgsm_pgi", {"momentum_form": "sign"}).momentum_form == "sign"
    with pytest.raises(ConfigError, match="label_smoothing"):
        create_defense("fgsm_pgi", {"label_smoothing": 1.0})
    space = load_space("fgsm_pgi")
    check_samples_resolve(space, load_config("fgsm_pgi").to_dict())
    assert {"method.lambda_", "method.momentum_decay", "method.reset_every", "method.alpha_ratio"} <= set(space)


@pytest.mark.parametrize("prior,form", [("epoch", None), ("momentum", "normalized_gradient"), ("momentum", "sign")])
def test_example_prior_carries_over_epochs_with_the_paper_update(prior, form):
    """The prior used for example i in epoch 2 is what epoch 1 stored for i (checked through the update rule:
    a fresh or misindexed prior would give another stored value), and MEP follows Alg. 3 with the momentum
    accumulating either g / mean|g| per example (the authors' code) or sign(g) (the paper's formula)."""
    model, d = make({"prior": prior} if form is None else {"prior": prior, "momentum_form": form})
    x, y = data()
    alpha, mu, factor = EPS, 0.3, 0.6
    eta = d.prior_buffer.clone()  # the first-epoch draw
    assert eta.abs().max() <= EPS and eta.abs().mean() > 0.3 * EPS
    momentum = torch.zeros_like(eta)
    for epoch in range(2):
        expected, expected_m = eta.clone(), momentum.clone()
        for idx in batches(epoch):
            start = clamp_to_ball(x[idx] + eta[idx], x[idx], EPS)
            grad = input_grad(model, start, y[idx], factor)
            g_c = grad.sign()
            delta_adv = clamp_to_ball(start + alpha * g_c, x[idx], EPS) - x[idx]
            if prior == "epoch":
                expected[idx] = delta_adv
            else:
                per_example_mean_abs = grad.abs().mean(dim=(1, 2, 3), keepdim=True)
                step = g_c if form == "sign" else grad / per_example_mean_abs
                expected_m[idx] = mu * momentum[idx] + step
                expected[idx] = clamp_to_ball(start + alpha * expected_m[idx].sign(), x[idx], EPS) - x[idx]
        run_epoch(model, d, x, y, epoch)
        assert torch.allclose(d.prior_buffer, expected, atol=1e-6), f"epoch {epoch + 1}"
        if prior == "momentum":
            assert torch.allclose(d.momentum_buffer, expected_m, rtol=1e-4, atol=1e-6)
        eta, momentum = expected, expected_m
        if form == "normalized_gradient" and epoch == 0:  # per example (not per batch): mean |m| is 1 for all
            assert torch.allclose(d.momentum_buffer.abs().mean(dim=(1, 2, 3)), torch.ones(N), atol=1e-5)
    if form == "sign":
        assert d.momentum_buffer.abs().max() > 1.0  # mu*m + g_c accumulated over two epochs


def priors_per_epoch(params, epochs, model, x, y):
    """The prior buffer after each of `epochs` epochs (fixed model, the same batches for every defense)."""
    _, d = make(params, model=model)
    stored = []
    for epoch in range(epochs):
        run_epoch(model, d, x, y, epoch)
        stored.append(d.prior_buffer.clone())
    return stored


def test_literal_sign_momentum_with_mu_03_stores_exactly_the_ep_priors():
    """The paper's m <- mu m + sign(g) with mu = 0.3: |mu m| < mu / (1 - mu) < 1, so sign(m) = sign(g)
    wherever g != 0 and the MEP prior is EP's delta_adv. This documents why the default is not this form."""
    model, (x, y) = small_model(), data()
    ep = priors_per_epoch({"prior": "epoch"}, 4, model, x, y)
    for mu in (0.3, 0.5):  # 1/2 is the largest mu for which the bound still holds
        mep = priors_per_epoch({"prior": "momentum", "momentum_form": "sign", "momentum_decay": mu}, 4, model, x, y)
        for epoch, (a, b) in enumerate(zip(ep, mep)):
            assert torch.equal(a, b), f"mu {mu}, epoch {epoch + 1}"
    # above 1/2 the literal form can keep an old direction (+1, +1, -1 gives m = 0.71 for mu = 0.9)
    mep = priors_per_epoch({"prior": "momentum", "momentum_form": "sign", "momentum_decay": 0.9}, 4, model, x, y)
    assert torch.equal(ep[0], mep[0]) and not torch.equal(ep[-1], mep[-1])


def test_normalized_gradient_momentum_makes_mep_differ_from_ep():
    """The authors' form: after the first epoch (m = g / mean|g|, so sign(m) = sign(g)) MEP and EP agree;
    from the second epoch on the accumulated momentum overrides this epoch's sign for some pixels."""
    model, (x, y) = small_model(), data()
    ep = priors_per_epoch({"prior": "epoch"}, 3, model, x, y)
    mep = priors_per_epoch({"prior": "momentum"}, 3, model, x, y)  # the defaults: normalized, mu = 0.3
    assert torch.equal(ep[0], mep[0])
    for epoch in (1, 2):
        differs = (ep[epoch] - mep[epoch]).abs().flatten(1).amax(1) > 1e-6
        assert differs.any(), f"epoch {epoch + 1}: MEP stored EP's priors for every example"
        # the priors stay in the ball either way, and the two forms change only some pixels
        assert mep[epoch].abs().max() <= EPS + 1e-6
        assert ((ep[epoch] - mep[epoch]).abs() > 1e-6).float().mean() < 0.5


def test_priors_reset_on_schedule():
    model, d = make({"prior": "momentum", "reset_every": 2})
    x, y = data()
    first_draw = d.prior_buffer.clone()
    at_radius = lambda buffer: ((buffer.abs() - EPS).abs() < 1e-6).float().mean().item()  # noqa: E731
    assert at_radius(first_draw) < 0.01  # U(-eps, eps): no mass on the boundary
    run_epoch(model, d, x, y, 0)
    after_one = d.prior_buffer.clone()
    assert at_radius(after_one) > 0.3 and d.momentum_buffer.abs().sum() > 0  # epoch 1: no reset yet
    run_epoch(model, d, x, y, 1)  # the end of epoch 2 = reset_every: re-drawn for epoch 3
    redrawn = d.prior_buffer
    assert at_radius(redrawn) < 0.01 and redrawn.abs().max() <= EPS
    assert abs(redrawn.mean().item()) < 0.05 * EPS
    assert redrawn.std().item() == pytest.approx(EPS / 3 ** 0.5, rel=0.05)  # std of U(-eps, eps)
    assert not torch.allclose(redrawn, first_draw)  # a new draw, not the first one replayed
    assert torch.count_nonzero(d.momentum_buffer) == 0
    state = d.state_dict()
    assert state["resets"] == 1


class FakeAllReduce:
    """Two 'workers' in two threads: all_reduce_sum sums both ranks' tensors, like torch.distributed."""

    def __init__(self, world_size=2):
        self.barrier = threading.Barrier(world_size, timeout=20)
        self.slots = {}

    def for_rank(self, rank):
        def all_reduce_sum(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[r] for r in sorted(self.slots))
            self.barrier.wait()
            tensor.copy_(total)
            return tensor
        return all_reduce_sum


def end_epoch_on_both(ranks, model, epoch):
    group = FakeAllReduce(len(ranks))
    errors = []

    def work(rank, defense):
        defense.ctx.all_reduce_sum = group.for_rank(rank)
        try:
            defense.on_epoch_end(model, epoch)
        except Exception as error:  # pragma: no cover - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(r, d)) for r, d in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


@pytest.mark.parametrize("prior", ["epoch", "momentum"])
def test_merge_gives_the_same_buffers_with_one_or_two_workers(prior):
    x, y = data()
    model = small_model()
    _, single = make({"prior": prior}, model=model)
    ranks = [make({"prior": prior}, rank=r, world_size=2, model=model)[1] for r in range(2)]
    for epoch in range(2):
        for idx in batches(epoch):
            single.loss(model, x[idx], y[idx], idx, 0)
            for r, d in enumerate(ranks):  # each worker gets its shard of the same global batch
                shard = idx[r::2]
                d.loss(model, x[shard], y[shard], shard, 0)
        single.on_epoch_end(model, epoch)
        assert not torch.allclose(ranks[0].prior_buffer, single.prior_buffer)  # rank 0 alone misses rank 1's
        end_epoch_on_both(ranks, model, epoch)
        for d in ranks:
            assert torch.allclose(d.prior_buffer, single.prior_buffer, atol=1e-6), f"epoch {epoch + 1}"
            if prior == "momentum":
                assert torch.allclose(d.momentum_buffer, single.momentum_buffer, atol=1e-6)
            assert not d.touched.any()


def test_examples_no_worker_visited_keep_their_prior_through_the_merge():
    model, d = make({"prior": "momentum"})
    x, y = data()
    first_draw = d.prior_buffer.clone()
    visited = torch.arange(32)  # examples 32..47 are not seen this epoch
    d.loss(model, x[visited], y[visited], visited, 0)
    d.on_epoch_end(model, 0)
    assert torch.equal(d.prior_buffer[32:], first_draw[32:])
    assert not torch.allclose(d.prior_buffer[:32], first_draw[:32])


class Recorder(nn.Module):
    """Wraps a model and records every input the defense feeds it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("prior", ["batch", "epoch", "momentum"])
def test_every_model_input_is_in_the_ball_and_the_box(prior):
    model, d = make({"prior": prior})
    recorder = Recorder(model)
    x, y = data()
    x = (x > 0.5).float() * 0.98 + 0.01  # pixels next to 0 and 1, so the [0, 1] clamp matters
    for epoch in range(2):
        for idx in batches(epoch, size=20):  # 20, 20, 8: the batch size changes within the epoch
            recorder.inputs.clear()
            d.loss(recorder, x[idx], y[idx], idx, 0)
            assert len(recorder.inputs) == 2
            for seen in recorder.inputs:
                assert (seen - x[idx]).abs().max() <= EPS + 1e-6
                assert seen.min() >= 0 and seen.max() <= 1
            assert (recorder.inputs[1] - recorder.inputs[0]).abs().max() > 0.5 * EPS  # a real FGSM step
        d.on_epoch_end(model, epoch)


def test_batch_prior_is_the_previous_batch_perturbation_and_handles_size_changes():
    model, d = make({"prior": "batch"})
    recorder = Recorder(model)
    x, y = data()
    sizes = [16, 10, 16]
    start = 0
    previous = None
    for size in sizes:
        idx = torch.arange(start, start + size)
        start += size
        recorder.inputs.clear()
        d.loss(recorder, x[idx], y[idx], idx, 0)
        prior_start, adv = recorder.inputs
        if previous is not None:
            rows = min(size, previous.shape[0])
            xb = x[idx][:rows]
            assert torch.allclose(prior_start[:rows], clamp_to_ball(xb + previous[:rows], xb, EPS))
            if size > rows:  # rows the previous (smaller) batch did not have start from fresh noise
                fresh = prior_start[rows:] - x[idx][rows:]
                assert fresh.abs().max() <= EPS and fresh.abs().mean() > 0.2 * EPS
        previous = adv - x[idx]  # this batch's delta_adv is the next batch's prior
        assert torch.allclose(d.batch_prior, previous)


def test_regularizer_is_zero_when_prior_equals_delta_adv_and_the_logit_mse_otherwise():
    from robustune.methods.fgsm_pgi import prior_guided_loss, smoothed_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits, other = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    # s = 0.4 is the authors' factor 0.6: 0.6 on the true class, 0.4 spread over the 9 others (not torch's).
    assert torch.allclose(smoothed_cross_entropy(logits, y, 0.4), authors_smoothed_ce(logits, y, 0.6))
    assert torch.equal(smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))
    total, ce, reg = prior_guided_loss(logits, logits.clone(), y, 10.0, 0.4)
    assert reg == 0 and torch.equal(total, ce)  # eta = delta_adv: nothing to regularize
    other.requires_grad_(True)
    total, ce, reg = prior_guided_loss(logits, other, y, 10.0, 0.4)
    assert torch.allclose(reg, ((logits - other) ** 2).mean())  # squared L2 of the logits, mean-reduced
    assert torch.allclose(total, ce + 10.0 * reg)
    (grad,) = torch.autograd.grad(total, other)  # f(x + eta) is trained too, as in the authors' code
    assert torch.allclose(grad, -2 * 10.0 * (logits - other) / logits.numel())


def test_zero_radius_makes_delta_adv_equal_the_prior_and_the_loss_clean():
    model, d = make({"prior": "momentum"}, epsilon=0.0)
    x, y = data(16)
    result = d.loss(model, x, y, torch.arange(16), 0)
    assert result.metrics["pgi_reg"] == 0.0
    assert torch.allclose(result.loss, authors_smoothed_ce(model(x), y, 0.6), atol=1e-6)


def test_training_loop_epoch_and_checkpoint_round_trip(tmp_path):
    loop = TrainingLoop(load_config("fgsm_pgi", overrides=LOOP_OVERRIDES), log=lambda _: None)
    metrics = loop.run_epoch()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert "train/pgi_reg" in metrics and "train/pgi_prior_abs_mean" in metrics
    buffer = loop.defense.prior_buffer
    assert buffer.shape == (len(loop.splits.train), 1, 28, 28)
    torch.save(loop.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = TrainingLoop(load_config("fgsm_pgi", overrides=LOOP_OVERRIDES), log=lambda _: None)
    assert not torch.equal(fresh.defense.prior_buffer, buffer)
    fresh.load_state_dict(state, tmp_path / "state.pt")
    assert torch.equal(fresh.defense.prior_buffer, buffer)
    assert torch.equal(fresh.defense.momentum_buffer, loop.defense.momentum_buffer)
    assert fresh.defense.resets == loop.defense.resets
