"""The training loop itself, without Ray: schedules, learning, alarm, state round trip, NaN handling."""

import pytest
import torch

from robustune.config import ConfigError, TrainConfig
from robustune.resolve import load_config
from robustune.defense import StepResult
from robustune.loop import NonFiniteLossError, TrainingLoop, annealed_epoch, learning_rate

from conftest import fashion_mnist_dir

SYNTHETIC = ["data.name=synthetic", "data.val_size=500", "validation.examples=200", "train.batch_size=64"]


def make_loop(method="fgsm_rs", *overrides):
    return TrainingLoop(load_config(method, overrides=SYNTHETIC + list(overrides)), log=lambda _: None)


def test_schedules():
    total = 100
    cyclic = [learning_rate(TrainConfig(lr=0.2, lr_peak_fraction=0.4), s, total) for s in range(total)]
    assert max(cyclic) == pytest.approx(0.2) and cyclic.index(max(cyclic)) == 39
    assert cyclic[0] > 0 and cyclic[-1] == pytest.approx(0.0)
    step = [learning_rate(TrainConfig(lr=0.1, schedule="multistep", milestones=[0.5, 0.75]), s, total)
            for s in (0, 60, 90)]
    assert step == pytest.approx([0.1, 0.01, 0.001])
    cosine = [learning_rate(TrainConfig(lr=0.1, schedule="cosine"), s, total) for s in (0, 49, 99)]
    assert cosine[0] == pytest.approx(0.1, rel=1e-2) and cosine[1] == pytest.approx(0.05) and cosine[2] < 1e-9


def test_trials_are_first_judged_where_the_learning_rate_has_fallen_to_half_its_peak():
    cyclic = TrainConfig(lr=0.2, lr_peak_fraction=0.4)  # peak at 40%, half of it again at 70% of training
    assert [annealed_epoch(cyclic, epochs) for epochs in (1, 3, 4, 10, 15)] == [1, 3, 3, 7, 11]
    # Early epochs of the warm-up are below half the peak too; only the way down counts.
    assert annealed_epoch(TrainConfig(lr=0.2, lr_peak_fraction=0.9), 10) == 10
    cosine = TrainConfig(lr=0.1, schedule="cosine")  # half the peak at the middle
    assert [annealed_epoch(cosine, epochs) for epochs in (2, 4, 10)] == [1, 2, 5]
    multistep = TrainConfig(lr=0.1, schedule="multistep", milestones=[0.5, 0.75], lr_decay=0.1)
    assert annealed_epoch(multistep, 10) == 6  # the first epoch that ends after the first drop
    assert annealed_epoch(TrainConfig(schedule="constant"), 10) == 1  # never anneals: no epoch is fairer
    gentle = TrainConfig(lr=0.1, schedule="multistep", milestones=[0.5], lr_decay=0.8)
    assert annealed_epoch(gentle, 10) == 1


def test_loop_learns_synthetic_and_records_metrics():
    loop = make_loop("fgsm_rs", "train.epochs=2")
    metrics = [loop.run_epoch() for _ in range(2)]
    assert loop.finished and loop.epoch == 2 and len(loop.history) == 2
    for key in ("train/loss", "train/acc", "train/clean_acc", "val/clean_acc", "val/pgd_acc",
                "time/epoch_s", "time/total_s", "alarm/overfit"):
        assert key in metrics[-1]
    assert metrics[-1]["val/clean_acc"] > 0.8
    assert metrics[-1]["val/pgd_acc"] <= metrics[-1]["val/clean_acc"]
    assert loop.best_epoch in (1, 2) and loop.best_weights is not None


def test_state_round_trip_resumes_identically():
    """Two epochs straight equal one epoch, a save/load into a fresh loop, and another epoch."""
    straight = make_loop("fgsm_rs", "train.epochs=2")
    straight.run_epoch()
    straight.run_epoch()

    first = make_loop("fgsm_rs", "train.epochs=2")
    first.run_epoch()
    state = first.state_dict()
    resumed = make_loop("fgsm_rs", "train.epochs=2")
    resumed.load_state_dict(state, "test")
    resumed.run_epoch()
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[key], atol=1e-6), key
    assert resumed.history[-1]["val/pgd_acc"] == straight.history[-1]["val/pgd_acc"]


def test_overfit_alarm_and_early_stop_keep_best_weights():
    loop = make_loop("standard", "train.epochs=5", "train.early_stop_on_overfit=true")
    loop.run_epoch()
    best = {k: v.clone() for k, v in loop.model.state_dict().items()}
    # Simulate a collapse: the watched accuracy falls far below its best (no accuracy is within the drop of it).
    loop.selection.best_alarm_metric = 1.0 + loop.config.train.overfit_drop + 0.01
    loop.selection.best_weights = best
    metrics = loop.run_epoch()
    assert metrics["alarm/overfit"] == 1.0 and loop.stop_reason == "overfit" and loop.finished
    assert all(torch.equal(best[k], v) for k, v in loop.final_weights().items())


def test_kept_epoch_follows_the_select_metric_and_standard_training_selects_on_clean_accuracy():
    from torch import nn

    from robustune.loop import ModelSelection

    # Epoch 1 is the more robust one, epoch 2 the more accurate one (a short standard run looks like this).
    epochs = [{"val/clean_acc": 0.44, "val/pgd_acc": 0.27}, {"val/clean_acc": 0.75, "val/pgd_acc": 0.20}]
    model = nn.Linear(2, 2)
    kept = {}
    for metric in ("val/pgd_acc", "val/clean_acc"):
        selection = ModelSelection(TrainConfig(select_metric=metric), has_validation=True)
        for epoch, metrics in enumerate(epochs, start=1):
            with torch.no_grad():
                model.weight.fill_(epoch)  # which epoch's weights were kept
            selection.observe(epoch, metrics, model)
        kept[metric] = (selection.best_epoch, selection.best_score, selection.best_weights["weight"][0, 0].item())
    assert kept == {"val/pgd_acc": (1, 0.27, 1.0), "val/clean_acc": (2, 0.75, 2.0)}

    # Standard training is the clean reference: its own default; a defense keeps validation PGD; a user setting wins.
    assert load_config("standard").train.select_metric == "val/clean_acc"
    assert load_config("standard").train.overfit_metric == "val/clean_acc"
    assert load_config("pgd").train.select_metric == "val/pgd_acc"
    assert load_config("standard", overrides=["train.select_metric=val/pgd_acc"]).train.select_metric == "val/pgd_acc"
    with pytest.raises(ConfigError, match="select_metric"):
        load_config("pgd", overrides=["train.select_metric=val/loss"])

    # A checkpoint written before select_metric existed (its best score under "val_pgd_acc") still resumes.
    selection = ModelSelection(TrainConfig(), has_validation=True)
    selection.load_state_dict({"epoch": 2, "val_pgd_acc": 0.4, "model": None, "alarm_metric": 0.4}, "completed")
    assert (selection.best_epoch, selection.best_score) == (2, 0.4)


def test_standard_training_keeps_its_most_accurate_epoch_not_its_most_robust():
    # Real data, the default study's size: standard training's validation PGD accuracy peaks early (an
    # undertrained model), its clean accuracy late, so the two rules keep different epochs.
    overrides = ["data.name=fashion-mnist", f"data.data_dir={fashion_mnist_dir()}", "data.train_subset=3000",
                 "data.val_size=1000", "validation.examples=500", "epsilon=0.1", "train.epochs=3"]
    kept = {}
    for metric in ("val/clean_acc", "val/pgd_acc"):
        loop = TrainingLoop(load_config("standard", overrides=[*overrides, f"train.select_metric={metric}"]),
                            log=lambda _: None)
        scores = [loop.run_epoch()[metric] for _ in range(3)]
        assert loop.selected_epoch == 1 + scores.index(max(scores))
        kept[metric] = loop.selected_epoch
    assert kept["val/clean_acc"] != kept["val/pgd_acc"]


def test_non_finite_loss_fails_cleanly():
    loop = make_loop("standard", "train.epochs=1")
    loop.defense.loss = lambda model, x, y, idx, step: StepResult(torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 1"):
        loop.run_epoch()


def test_warm_start_from_checkpoint(tmp_path):
    from robustune.checkpoints import save_checkpoint

    source = make_loop("standard", "train.epochs=1")
    source.run_epoch()
    save_checkpoint({"model": source.model.state_dict()}, tmp_path / "final.pt")
    warm = make_loop("standard", f"train.init_from={tmp_path / 'final.pt'}")
    for key, value in source.model.state_dict().items():
        assert torch.equal(value, warm.model.state_dict()[key])


def test_a_failed_run_counts_the_training_seconds_of_its_last_checkpoint(tmp_path):
    """A study's compute (the unused refits an entry counts, its utilization) includes runs that failed: a run
    folder without a report counts what its newest checkpoint says it spent; with a report, the report's."""
    import json

    from robustune.checkpoints import save_checkpoint
    from robustune.run import REPORT_FILE, train_seconds_spent

    assert train_seconds_spent(tmp_path) == 0.0  # nothing saved yet
    loop = make_loop("standard", "train.epochs=2")
    loop.run_epoch()
    save_checkpoint(loop.state_dict(), tmp_path / "epoch_001" / "state.pt")
    first = loop.total_seconds
    loop.run_epoch()
    save_checkpoint(loop.state_dict(), tmp_path / "epoch_002" / "state.pt")
    assert 0 < first < loop.total_seconds
    assert train_seconds_spent(tmp_path) == pytest.approx(loop.total_seconds)  # failed after epoch 2: no report
    (tmp_path / REPORT_FILE).write_text(json.dumps({"train_seconds": 123.5}))
    assert train_seconds_spent(tmp_path) == 123.5
