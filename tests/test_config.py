import pytest
import yaml

from robustune.config import ConfigError, flatten, parse_override, raw_config
from robustune.resolve import load_config, resolve_config


def test_defaults_resolve_dataset_dependent_values():
    config = load_config("fgsm_rs")
    assert config.epsilon == pytest.approx(0.1)  # Fashion-MNIST's usual radius
    assert config.model_name == "small_cnn"
    assert config.method == {"name": "fgsm_rs", "alpha_ratio": 1.25}


def test_overrides_and_fraction_epsilon():
    config = load_config("pgd", overrides=["epsilon=8/255", "method.steps=7", "train.epochs=3",
                                           "data.name=synthetic", "data.val_size=500"])
    assert config.epsilon == pytest.approx(8 / 255)
    assert config.method["steps"] == 7 and config.train.epochs == 3


def test_config_file_then_overrides_then_method(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "pgd", "steps": 3}, "train": {"epochs": 9, "lr": 0.2}}))
    config = load_config("pgd", [str(path)], ["train.epochs=2"])
    assert (config.method["steps"], config.train.epochs, config.train.lr) == (3, 2, 0.2)


@pytest.mark.parametrize("override, message", [
    ("epsilon=1.5", "epsilon must be in [0, 1]"),
    ("epsilon=-0.1", "epsilon must be in [0, 1]"),
    ("train.epoch=3", "unknown key 'train.epoch'"),
    ("trian.epochs=3", "unknown key 'trian'"),
    ("train.epochs=three", "train.epochs: expected an integer"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.schedule=linear", "train.schedule: 'linear' is not one of"),
    ("method.steps=2.5", "method.steps: expected an integer"),
    ("method.stepz=3", "unknown key 'method.stepz'"),
    ("method.alpha_ratio=-1", "alpha_ratio must be > 0"),
    ("data.name=imagenet", "unknown dataset"),
    ("model.name=vit", "vit"),
    ("model.depth=28", "depth"),
    ("epsilon=abc", "epsilon: expected a number"),
    ("train.keep_best=maybe", "train.keep_best: expected true or false"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("pgd", overrides=[override])
    assert message.lower() in str(info.value).lower()


def test_unknown_method_lists_available():
    with pytest.raises(ConfigError, match="unknown method 'nope'.*fgsm_rs"):
        load_config("nope")


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(text)


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        raw_config("pgd", [str(path)])
    path.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        raw_config("pgd", [str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        raw_config("pgd", [str(tmp_path / "missing.yaml")])


def test_resolved_config_round_trips():
    config = load_config("pgd", overrides=["epsilon=0.2", "method.steps=3"])
    again = resolve_config(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
