import torch
from torch import nn

from robustune.attacks import clamp_to_ball, fgsm, margin_loss, pgd

from helpers import CountingModel


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_fgsm_is_exact_signed_step_within_box():
    model = linear_model()
    x, y = data()
    x_adv = fgsm(model, x, y, 0.1)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # For a linear model an interior step of size eps moves every free pixel by exactly eps.
    interior = (x > 0.1) & (x < 0.9)
    assert torch.allclose((x_adv - x).abs()[interior], torch.full_like(x[interior], 0.1), atol=1e-6)
    assert (loss_of(model, x_adv, y) >= loss_of(model, x, y) - 1e-6).all()


def test_pgd_stays_in_ball_and_beats_fgsm_on_average():
    model = linear_model()
    x, y = data(64)
    x_pgd = pgd(model, x, y, 0.2, alpha=0.05, steps=10, restarts=2)
    assert (x_pgd - x).abs().max() <= 0.2 + 1e-6 and x_pgd.min() >= 0 and x_pgd.max() <= 1
    assert loss_of(model, x_pgd, y).mean() >= loss_of(model, x, y).mean()


def test_per_example_epsilon_and_steps():
    model = linear_model()
    x, y = data(4)
    eps = torch.tensor([0.0, 0.05, 0.1, 0.3])
    x_adv = pgd(model, x, y, eps, alpha=eps / 2, steps=6)
    per_example_linf = (x_adv - x).flatten(1).abs().amax(1)
    assert (per_example_linf <= eps + 1e-6).all()
    assert per_example_linf[0] == 0
    # An example allowed zero steps and no random start stays put; one allowed steps moves.
    steps = torch.tensor([0, 3, 3, 3])
    x_adv = pgd(model, x, y, 0.1, alpha=0.02, steps=3, random_start=False, steps_per_example=steps)
    assert torch.equal(x_adv[0], x[0])
    assert not torch.equal(x_adv[1], x[1])


def test_margin_loss_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-2.0, 2.0]))


def test_cw_pgd_finds_misclassification_at_large_radius():
    model = linear_model()
    x, y = data(32)
    x_adv = pgd(model, x, y, 1.0, alpha=0.2, steps=20, loss="cw")
    assert (model(x_adv).argmax(1) != y).float().mean() > 0.9


def test_clamp_to_ball():
    x = torch.full((1, 1, 2, 2), 0.95)
    out = clamp_to_ball(x + 0.5, x, 0.1)
    assert torch.allclose(out, torch.ones_like(x))


def test_pgd_stops_at_the_first_iterate_that_fools_every_example_when_asked():
    model = CountingModel(linear_model())
    x, y = data(32)
    x_adv = pgd(model, x, y, 1.0, alpha=0.2, steps=50, random_start=False, loss="cw", stop_when_all_fooled=True)
    assert (model(x_adv).argmax(1) != y).all()
    assert model.calls < 20  # far fewer than the 50 steps' gradients (+1 final check, +1 above)
    # Where some example stays correctly classified, every step is taken: the same points as without stopping.
    model.calls = 0
    small = pgd(model, x, y, 0.01, alpha=0.005, steps=5, random_start=False, stop_when_all_fooled=True)
    assert model.calls == 6 and (model(small).argmax(1) == y).any()
    assert torch.equal(small, pgd(model, x, y, 0.01, alpha=0.005, steps=5, random_start=False))
