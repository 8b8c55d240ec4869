"""EAE's gamma calibration (the paper's 'MLD of seed examples' rule) and its `calibrate-eae` command."""

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from robustune import cli, defense
from robustune.checkpoints import save_checkpoint
from robustune.resolve import load_config
from robustune.data import load_dataset
from robustune.methods import eae
from robustune.methods.eae import calibrate_command as command
from robustune.methods.eae import calibrate_eae, format_calibration, logit_difference, summarize
from robustune.models import create_model

OVERRIDES = ["data.name=synthetic", "data.val_size=500", "data.train_subset=640"]


@pytest.fixture(scope="module")
def trained():
    """A small_cnn trained by hand for a few steps on the synthetic data, its config and its data splits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    config = load_config("standard", overrides=OVERRIDES)
    splits = load_dataset("synthetic", val_size=500, train_subset=640, seed=config.seed)
    info = splits.info
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, input_shape=info.input_shape, mean=info.mean, std=info.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = splits.train.images.float() / 255, splits.train.labels
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        batch = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(previous)
    return model, config, splits


def parse(*argv):
    """The arguments as the CLI parses them: its parser registers the command EAE contributes."""
    return cli.build_parser().parse_args(["calibrate-eae", *argv])


def test_the_command_is_contributed_by_the_eae_defense_and_the_platform_names_no_defense(tmp_path, capsys,
                                                                                        monkeypatch):
    contributed = {c.name: c for c in defense.defense_commands()}
    assert contributed["calibrate-eae"] is eae.EAE.commands[0]
    assert contributed["calibrate-eae"].run is eae.calibrate_command
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "calibrate-eae" in capsys.readouterr().out
    # `robustune calibrate-eae` dispatches through the hook: a user error exits 2 with the command's message.
    assert cli.main(["calibrate-eae", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "robustune calibrate-eae: error: " in capsys.readouterr().err
    # The platform's CLI names no defense in its code; defense names appear only in help examples (strings).
    source = Path(cli.__file__).read_text()
    assert "calibrate" not in source
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""
    assert "eae" not in ast.unparse(tree).lower()
    # Two defenses declaring one command name: a clear error, not one silently hiding the other.
    clash = [type(f"Clash{i}", (defense.Defense,), {"commands": (defense.DefenseCommand("x", print, print),)})
             for i in range(2)]
    monkeypatch.setattr(defense, "_REGISTRY", {"one": clash[0], "two": clash[1]})
    with pytest.raises(ValueError, match="'x' is declared by two defenses: 'one' and 'two'"):
        defense.defense_commands()


def test_logit_difference_and_summary():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    assert logit_difference(logits, torch.tensor([0, 1])).tolist() == [2.0, -3.0]
    s = summarize(torch.arange(1.0, 11.0))
    assert s["count"] == 10 and s["mean"] == pytest.approx(5.5) and s["q50"] == pytest.approx(5.5)
    assert s["q10"] < s["q25"] < s["q50"] < s["q75"] < s["q90"]
    assert summarize(torch.empty(0)) == {"count": 0, "mean": None, "std": None, "q10": None, "q25": None,
                                         "q50": None, "q75": None, "q90": None}


def test_calibration_splits_seed_examples_by_fgsm_and_suggests_their_mean_gap(trained):
    model, config, splits = trained
    model.train()
    images, labels = splits.val.images, splits.val.labels  # uint8, as stored
    result = calibrate_eae(model, images, labels, epsilon=config.epsilon, batch_size=128)
    assert model.training  # the caller's mode is restored
    fooled, kept = result["fooled"], result["not_fooled"]
    with torch.no_grad():
        correct = int((model(images.float() / 255).argmax(1) == labels).sum())
    assert result["correct"] == correct == fooled["count"] + kept["count"]
    assert fooled["count"] >= 10 and kept["count"] >= 10  # a real split at the dataset's epsilon
    assert 0 <= fooled["mean"] < kept["mean"]  # the paper's observation: seed examples sit near the boundary
    assert result["suggested_gamma"] == fooled["mean"]
    for s in (fooled, kept):
        assert s["q10"] <= s["q25"] <= s["q50"] <= s["q75"] <= s["q90"] and s["std"] >= 0
    assert sum(result["histogram"]["fooled"]) == fooled["count"]
    assert sum(result["histogram"]["not_fooled"]) == kept["count"]
    json.dumps(result)  # plain data
    # Larger epsilon: more seed examples, reaching further from the boundary.
    larger = calibrate_eae(model, images, labels, epsilon=2 * config.epsilon)
    assert larger["fooled"]["count"] > fooled["count"] and larger["suggested_gamma"] > result["suggested_gamma"]
    # epsilon 0 fools nobody: no suggestion, and the text says so.
    none = calibrate_eae(model, images[:100], labels[:100], epsilon=0.0)
    assert none["fooled"]["count"] == 0 and none["suggested_gamma"] is None
    assert "suggested gamma: none" in format_calibration(none)


def test_format_shows_both_distributions_and_the_gamma(trained):
    model, config, splits = trained
    result = calibrate_eae(model, splits.val.images[:200], splits.val.labels[:200], epsilon=config.epsilon)
    text = format_calibration(result)
    assert "fooled (seed)" in text and "not fooled (non-seed)" in text and "#" in text and "=" in text
    assert f"suggested gamma: {result['suggested_gamma']:.3f}" in text


def test_command_prints_the_suggested_gamma_for_a_checkpoint_on_the_validation_split(trained, tmp_path, capsys,
                                                                                        monkeypatch):
    model, config, splits = trained
    path = save_checkpoint({"model": model.state_dict(), "config": config.to_dict()}, tmp_path / "final.pt")
    seen = {}
    real = eae.calibrate_eae

    def spy(model, images, labels, **kwargs):
        seen.update(images=images, labels=labels, **kwargs)
        return real(model, images, labels, **kwargs)

    monkeypatch.setattr(eae, "calibrate_eae", spy)
    assert command(parse("--checkpoint", str(path), "--examples", "300", "--epsilon", "8/255")) == 0
    out = capsys.readouterr().out
    assert seen["epsilon"] == pytest.approx(8 / 255)
    assert torch.equal(seen["images"], splits.val.images[:300])  # validation examples, never test ones
    assert torch.equal(seen["labels"], splits.val.labels[:300])
    expected = real(model, splits.val.images[:300], splits.val.labels[:300], epsilon=8 / 255)
    assert f"suggested gamma: {expected['suggested_gamma']:.3f}" in out
    assert f"method.gamma={expected['suggested_gamma']:.3f}" in out


def test_command_reads_a_run_folder_with_its_epsilon_and_set_overrides(trained, tmp_path, capsys):
    model, config, _ = trained
    run = tmp_path / "run"
    save_checkpoint({"model": model.state_dict(), "config": config.to_dict(), "report": {}}, run / "final.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert command(parse("--checkpoint", str(run), "--examples", "5000", "--set", "data.val_size=400")) == 0
    out = capsys.readouterr().out
    assert f"epsilon {config.epsilon:.4g}" in out and "on 400 validation examples" in out
    assert "suggested gamma:" in out


def test_command_reports_user_errors(tmp_path, capsys):
    assert command(parse("--checkpoint", str(tmp_path / "missing.pt"))) == 2
    assert "does not exist" in capsys.readouterr().err
    save_checkpoint({"model": {}}, tmp_path / "bare.pt")
    assert command(parse("--checkpoint", str(tmp_path / "bare.pt"))) == 2
    assert "no run config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_eae(torch.nn.Linear(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), epsilon=2.0)
    defaults = parse("--checkpoint", "x")
    assert (defaults.examples, defaults.epsilon, defaults.overrides) == (2000, None, [])


def test_a_run_with_calibrate_gamma_trains_with_the_gamma_of_the_papers_rule(trained, tmp_path):
    """calibrate_gamma: the run measures gamma on its warm-start model and validation split before any step,
    trains with it, logs it and keeps it in its checkpoints."""
    from robustune.loop import TrainingLoop

    model, config, splits = trained
    path = save_checkpoint({"model": model.state_dict(), "config": config.to_dict()}, tmp_path / "final.pt")
    expected = calibrate_eae(model, splits.val.images, splits.val.labels, epsilon=config.epsilon)["suggested_gamma"]
    assert expected is not None and expected != 3.63
    overrides = [*OVERRIDES, f"train.init_from={path}", "method.calibrate_gamma=true", "train.epochs=1",
                 "validation.examples=64"]
    loop = TrainingLoop(load_config("eae", overrides=overrides), log=lambda _: None)
    assert loop.defense.gamma == pytest.approx(expected)
    metrics = loop.run_epoch()
    assert metrics["train/gamma"] == pytest.approx(expected)
    torch.save(loop.state_dict(), tmp_path / "state.pt")
    resumed = TrainingLoop(load_config("eae", overrides=[*OVERRIDES, "train.epochs=1"]), log=lambda _: None)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), "test")
    assert resumed.defense.gamma == pytest.approx(expected)  # from the checkpoint, not the 3.63 default

    # Loaded for evaluation (init_from dropped, as for every trained model): the gamma comes from the saved
    # state, without the warm-start model the calibration would need (a study's evaluation once failed here).
    from robustune.run import load_trained

    final = save_checkpoint({"model": loop.model.state_dict(), "defense": loop.defense.state_dict(),
                             "config": loop.config.to_dict()}, tmp_path / "eae-final.pt")
    assert load_trained(final).defense.gamma == pytest.approx(expected)

    with pytest.raises(ValueError, match="init_from"):  # the rule needs a pretrained model
        TrainingLoop(load_config("eae", overrides=[*OVERRIDES, "method.calibrate_gamma=true"]), log=lambda _: None)
    with pytest.raises(ValueError, match="validation"):
        TrainingLoop(load_config("eae", overrides=[*OVERRIDES, f"train.init_from={path}", "data.val_size=0",
                                                   "method.calibrate_gamma=true"]), log=lambda _: None)
