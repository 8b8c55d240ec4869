import dataclasses

import pytest
import torch
import torch.nn.functional as F

from robustune.config import ConfigError
from robustune.defense import Cost, DefenseContext, create_defense, list_defenses
from robustune.models import create_model

BASELINES = {"standard": (1, 1), "fgsm": (2, 2), "fgsm_rs": (2, 2), "pgd": (11, 11)}


def setup(name, params=None, epsilon=0.1):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
    defense = create_defense(name, params)
    defense.setup(model, DefenseContext(epsilon=epsilon, num_classes=10, input_shape=(1, 28, 28),
                                        num_train_examples=100, epochs=1, steps_per_epoch=1,
                                        device=torch.device("cpu")))
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    return model, defense, x, y


def test_registry_has_baselines_with_declared_costs():
    assert set(BASELINES) <= set(list_defenses())
    for name, (forward, backward) in BASELINES.items():
        assert create_defense(name).cost() == Cost(forward, backward)
    assert create_defense("pgd", {"steps": 7}).cost() == Cost(8, 8)


def test_defaults_from_the_papers():
    assert create_defense("fgsm_rs").alpha_ratio == 1.25
    assert create_defense("fgsm").alpha_ratio == 1.0
    pgd = create_defense("pgd")
    assert (pgd.steps, pgd.alpha_ratio) == (10, 0.25)


def test_defense_fields_are_validated():
    with pytest.raises(ConfigError, match="method.steps"):
        create_defense("pgd", {"steps": "many"})
    with pytest.raises(ConfigError, match="unknown key 'method.beta'"):
        create_defense("fgsm_rs", {"beta": 1})


def test_standard_loss_is_clean_cross_entropy():
    model, defense, x, y = setup("standard")
    result = defense.loss(model, x, y, torch.arange(16), 0)
    assert torch.allclose(result.loss, F.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", ["fgsm", "fgsm_rs", "pgd"])
def test_adversarial_defenses_train_on_perturbed_inputs_with_higher_loss(name):
    model, defense, x, y = setup(name)
    clean_loss = F.cross_entropy(model(x), y)
    torch.manual_seed(3)
    result = defense.loss(model, x, y, torch.arange(16), 0)
    assert result.loss > clean_loss
    assert result.loss.requires_grad and result.logits.shape == (16, 10)


def test_epsilon_zero_makes_fgsm_rs_standard_training():
    model, defense, x, y = setup("fgsm_rs", epsilon=0.0)
    result = defense.loss(model, x, y, torch.arange(16), 0)
    assert torch.allclose(result.loss, F.cross_entropy(model(x), y), atol=1e-6)


def test_train_step_calls_update_once_by_default():
    model, defense, x, y = setup("fgsm_rs")
    seen = []
    defense.train_step(model, x, y, torch.arange(16), 0, seen.append)
    assert len(seen) == 1 and seen[0].requires_grad


def test_defenses_with_auxiliary_networks_say_so_in_their_cost():
    """Their extra networks are outside the target-pass floor; the benchmark table names them."""
    with_auxiliary = {name for name in list_defenses() if create_defense(name).cost().auxiliary}
    assert with_auxiliary == {"efgsm", "fgsm_sdi", "las_at"}


def test_every_defense_is_a_dataclass_with_a_summary_and_cost():
    for name in list_defenses():
        defense = create_defense(name)
        assert dataclasses.is_dataclass(defense) and type(defense).summary
        assert isinstance(defense.cost(), Cost)
