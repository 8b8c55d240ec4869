"""The leaderboard's verdict: row intervals, each seed's own test slice, the paired headline with its baseline
chosen on validation, and `report --compare`. Per-point outcomes are real outcomes.parquet files written by
robustune.evaluation.write_outcomes; the rows are the leaderboard's own row dicts, built by hand."""

from __future__ import annotations

import time

import pytest
import torch

from robustune.config import ConfigError, EvalConfig
from robustune.evaluation import attacked_slice, read_outcomes, write_outcomes
from robustune.leaderboard import accuracy_with_interval, compare, compare_text, headline
from robustune.stats import wilson_interval
from robustune.storage import location
from robustune.study_state import Entry, RunRecord, Study, StudyState

POINTS = 200


def outcome_file(folder, label: str, seed: int, robust: list[bool], first_point: int):
    """One run's outcomes.parquet: `robust` per attacked point (clean correct wherever robust)."""
    flags = {"clean": torch.ones(len(robust), dtype=torch.bool), "robust": torch.tensor(robust)}
    path = location(folder) / f"{label}-{seed}" / "outcomes.parquet"
    labels = torch.zeros(first_point + len(robust), dtype=torch.long)
    write_outcomes(flags, labels, path, first_point=first_point)
    return path


def study_state(tmp_path, outcomes: dict[str, dict[int, list[bool]]], budget_of: dict[str, str | None]):
    """A study state whose runs point at real outcome files; seed k attacked on points k*POINTS.."""
    seeds = sorted(next(iter(outcomes.values())))
    entries = [Entry(defense=label.split()[0], label=label, tune=budget_of[label] is not None,
                     budget=budget_of[label]) for label in outcomes]
    study = Study(name="t", description="", source="t.yaml", base={}, seeds=seeds,
                  evaluation={"points": POINTS}, entries=entries, featured=entries[0].label)
    state = StudyState(path=location(tmp_path), instance="study-t", study=study, parent_run_id="p",
                       tracking_uri="sqlite:///unused.db", output_dir=str(tmp_path), started=time.time())
    for label, by_seed in outcomes.items():
        for seed, robust in by_seed.items():
            path = outcome_file(tmp_path, label, seed, robust, first_point=seeds.index(seed) * POINTS)
            record = RunRecord(label, label.split()[0], seed, str(tmp_path / f"{label}-{seed}"), run_id=label,
                               evaluation={"outcomes_path": str(path)})
            state.runs[record.key] = record
    return state


def row(label: str, robust: float, validation: float, budget_of: str | None, tuned: bool = True) -> dict:
    return {"defense": label, "tuned": tuned, "budget_of": budget_of, "no_winner": None, "clean_mean": 0.8,
            "robust_mean": robust, "robust_ci_low": robust - 0.05, "robust_ci_high": robust + 0.05,
            "val_pgd_mean": validation, "total_s": 100.0, "search_s": 50.0, "search_budget_s": 60.0}


def points(correct: int, n: int = POINTS) -> list[bool]:
    return [True] * correct + [False] * (n - correct)


def test_one_seed_row_interval_is_the_wilson_interval_by_hand():
    # 0.5 of 100: p = 0.5, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.25/100 + 1.96^2/40000) / (1 + 1.96^2/100)
    mean, low, high = accuracy_with_interval([{"robust_acc": 0.5, "n_pgd": 100}], "robust")
    assert mean == 0.5 and (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert (low, high) == pytest.approx(wilson_interval(50, 100))


def test_row_interval_over_seeds_is_set_by_the_seeds_spread():
    reports = [{"aa_acc": 0.50, "n_aa": 300}, {"aa_acc": 0.56, "n_aa": 300}, {"aa_acc": 0.53, "n_aa": 300}]
    mean, low, high = accuracy_with_interval(reports, "aa")
    # The seeds' spread sets it: sd 0.03 over 3 seeds, t(0.975, 2) = 4.302653: half-width 0.074524.
    assert mean == pytest.approx(0.53) and (low, high) == pytest.approx((0.455476, 0.604524), abs=1e-6)
    # The same accuracies on ten times the points: the seeds' spread is no smaller, so neither is the interval.
    assert accuracy_with_interval([{**r, "n_aa": 3000} for r in reports], "aa")[1:] == pytest.approx((low, high))
    assert accuracy_with_interval([{"aa_acc": None, "n_aa": 0}], "aa") == (None, None, None)


def test_each_seed_is_attacked_on_its_own_slice():
    from robustune.study import seed_evaluation

    study = Study(name="t", description="", source="t.yaml", base={}, seeds=[3, 7, 11],
                  evaluation={"protocol": "quick", "points": 333}, entries=[])
    assert [seed_evaluation(study, s)["first_point"] for s in (3, 7, 11)] == [0, 333, 666]
    study.evaluation["seed_slices"] = False
    assert "first_point" not in seed_evaluation(study, 7) and "seed_slices" not in seed_evaluation(study, 7)
    config = EvalConfig(points=333, first_point=666)
    assert attacked_slice(config, 10_000) == slice(666, 999)
    assert attacked_slice(config, 800) == slice(666, 800)  # the end of the test split cuts the slice short
    with pytest.raises(ConfigError, match="eval.first_point=666 is past the end of the test split"):
        attacked_slice(config, 500)
    with pytest.raises(ConfigError, match="full protocol attacks the whole test set"):
        EvalConfig(protocol="full", first_point=10)


def test_study_refuses_more_attacked_points_than_the_test_split_before_any_work(tmp_path):
    import yaml

    from robustune.study import load_study

    definition = yaml.safe_load(open("tests/data/tiny_study.yaml"))
    definition["evaluation"]["points"] = 150  # 2 seeds x 150 > test_subset 200
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(definition))
    with pytest.raises(ConfigError, match=r"needs 300 test points \(150 per seed x 2 seeds, each its own slice\) "
                                          r"but data.test_subset is 200"):
        load_study(path)


def test_outcomes_round_trip_through_parquet_with_their_test_indices(tmp_path):
    path = outcome_file(tmp_path, "a", 0, [True, False, True], first_point=400)
    saved = read_outcomes(path)
    assert saved["test_index"] == [400, 401, 402] and saved["robust"] == [True, False, True]
    assert saved["clean"] == [True, True, True] and saved["label"] == [0, 0, 0]


def test_headline_baseline_is_chosen_on_validation_not_on_test(tmp_path):
    """Two baselines at the featured defense's budget: `pgd` is better on validation, `trades` on test. The
    headline compares with pgd; picking on test would have flattered nothing but the baseline."""
    outcomes = {"las_at": {0: points(100), 1: points(100)},
                "pgd (tuned)": {0: points(90), 1: points(90)},
                "trades (tuned)": {0: points(150), 1: points(150)}}
    state = study_state(tmp_path, outcomes, {"las_at": None, "pgd (tuned)": "las_at", "trades (tuned)": "las_at"})
    rows = [row("las_at", 0.50, 0.55, None, tuned=False), row("pgd (tuned)", 0.45, 0.60, "las_at"),
            row("trades (tuned)", 0.75, 0.40, "las_at")]
    text = headline(rows, "las_at", state)
    assert "baseline: the best tuned one at equal budget, pgd (tuned) (chosen on validation PGD accuracy 0.6000)" \
        in text, text
    assert "trades" not in text
    # Nested outcomes (pgd right only where las_at is): 20 discordant pairs, all one way.
    assert text.startswith("las_at is better than pgd (tuned) in robust accuracy (every attack) (+5.0 points"), text


def test_headline_says_better_only_when_the_interval_excludes_zero(tmp_path):
    # 30 more points right on each of 3 seeds of 200: a clear difference.
    outcomes = {"las_at": {s: points(130) for s in range(3)}, "pgd (tuned)": {s: points(100) for s in range(3)}}
    state = study_state(tmp_path, outcomes, {"las_at": None, "pgd (tuned)": "las_at"})
    rows = [row("las_at", 0.65, 0.5, None, tuned=False), row("pgd (tuned)", 0.5, 0.5, "las_at")]
    text = headline(rows, "las_at", state)
    assert text.startswith("las_at is better than pgd (tuned) in robust accuracy (every attack) (+15.0 points, "
                           "95% interval [+"), text
    assert "600 paired points over 3 seed(s)" in text
    same = compare(state, "pgd (tuned)", "pgd (tuned)")
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["low"] <= 0 <= same["high"]


def test_rows_attacked_on_different_points_are_not_paired(tmp_path):
    outcomes = {"las_at": {0: points(100)}, "pgd (tuned)": {0: points(100)}}
    state = study_state(tmp_path, outcomes, {"las_at": None, "pgd (tuned)": "las_at"})
    moved = outcome_file(tmp_path, "moved", 0, points(100), first_point=5)
    state.runs["pgd (tuned)|0"].evaluation["outcomes_path"] = str(moved)
    with pytest.raises(ValueError, match="seed 0: las_at and pgd \\(tuned\\) were attacked on different test points"):
        compare(state, "las_at", "pgd (tuned)")
    rows = [row("las_at", 0.5, 0.5, None, tuned=False), row("pgd (tuned)", 0.5, 0.5, "las_at")]
    assert headline(rows, "las_at", state).startswith("las_at vs pgd (tuned): not paired (seed 0:")


def test_compare_text_names_unknown_rows_and_reports_missing_outcomes(tmp_path):
    outcomes = {"las_at": {0: points(120)}, "pgd (tuned)": {0: points(100)}}
    state = study_state(tmp_path, outcomes, {"las_at": None, "pgd (tuned)": "las_at"})
    text = compare_text(state, "las_at", "pgd (tuned)")
    lines = text.splitlines()
    assert lines[0] == "las_at vs pgd (tuned) in study study-t, paired on the same seeds and test points:"
    assert lines[1].startswith("- las_at is better than pgd (tuned) in robust accuracy (every attack) (+10.0 "
                               "points"), lines[1]
    assert "AutoAttack accuracy: las_at seed 0:" in lines[2] and "has no 'aa' outcomes" in lines[2]
    with pytest.raises(ConfigError, match="'nobody' is not a defense of study study-t \\(its rows: las_at, pgd"):
        compare_text(state, "las_at", "nobody")


def test_attacks_run_on_the_slice_from_first_point(tmp_path):
    """A model right exactly on the second half of the test points: attacked from point 4 it is robust
    everywhere, from point 0 nowhere; clean accuracy is over every point either way."""
    from torch import nn

    from robustune.evaluation import evaluate_points

    class MeanReader(nn.Module):  # class 1 when the image is bright: far from the boundary for a small epsilon
        def forward(self, x):
            brightness = x.mean(dim=(1, 2, 3))
            return torch.stack([1 - brightness, brightness], dim=1) * 10

    images = torch.cat([torch.zeros(4, 1, 4, 4), torch.ones(4, 1, 4, 4)])
    labels = torch.ones(8, dtype=torch.long)
    for first, expected in ((4, 1.0), (0, 0.0)):
        config = EvalConfig(protocol="custom", autoattack="none", points=4, first_point=first, checks=False)
        report, flags = evaluate_points(MeanReader(), images, labels, epsilon=0.01, config=config, log=lambda _: None)
        assert report["clean_acc"] == 0.5 and report["n_clean"] == 8 and report["first_point"] == first
        assert report["pgd_acc"] == expected and report["n_pgd"] == 4 and flags["robust"].tolist() == [expected] * 4
        path = location(tmp_path) / f"from-{first}.parquet"
        write_outcomes(flags, labels, path, first_point=first)
        assert read_outcomes(path)["test_index"] == list(range(first, first + 4))


def test_a_refit_far_below_the_trial_that_chose_it_is_flagged():
    from robustune.leaderboard import _diagnostic_labels, refit_shortfall

    assert refit_shortfall(0.45, 0.50) is None and refit_shortfall(None, 0.5) is None
    warning = refit_shortfall(0.09, 0.48)  # e.g. a config chosen on 2-epoch trials that collapsed at 4 epochs
    assert warning == ("refit below its search: validation PGD 0.090 (mean over the final runs) vs 0.480 for the "
                       "trial that chose the config")
    assert _diagnostic_labels({"no_winner": None, "diagnostics": f"{warning} | seed 0: collapsed@3-4"}) \
        == "refit below search, collapsed"


def test_notes_shared_by_seeds_name_the_seeds_once_and_long_notes_are_cut_at_a_word():
    """Ten seeds raising the same evaluation warning make one note ('seeds 0-9: ...'), not ten that the 600-character
    cut stops in the middle of a word; seeds whose notes differ keep their own."""
    from robustune.leaderboard import NOTE_CHARACTERS, _clip, by_seed, seed_list

    assert [seed_list(s) for s in ([3], [0, 1], [0, 1, 2], list(range(10)), [7, 0, 1, 2, 3], [0, 2, 4, 5])] == [
        "seed 3", "seeds 0, 1", "seeds 0-2", "seeds 0-9", "seeds 0-3, 7", "seeds 0, 2, 4, 5"]
    dynamic = "it seems to be a dynamic defense! The evaluation with AutoAttack might be insufficient. (x2)"
    assert by_seed([(seed, dynamic) for seed in range(10)]) == f"seeds 0-9: {dynamic}"
    assert by_seed([(0, "overfit@3"), (1, "label_leak@1-3"), (2, "overfit@3")]) == \
        "seeds 0, 2: overfit@3 | seed 1: label_leak@1-3"
    assert by_seed([]) == ""
    long = " | ".join(f"seed {seed}: policy_entropy 6.6{seed} -> 4.2{seed}, policy_reward 3.5 -> 5.2"
                      for seed in range(20))
    cut = _clip(long)
    assert len(cut) <= NOTE_CHARACTERS + 4 and cut.endswith(" ...") and long.startswith(cut[:-4])
    assert long[len(cut) - 4] == " "  # cut where a word ends
    assert _clip("short note") == "short note"


# Robust accuracy vs clean accuracy of the seeds study's 11 rows (the crowded case) and the demo's two close rows.
CROWDED = [(0.746, 0.556, "trades (tuned)"), (0.739, 0.556, "efgsm (tuned)"), (0.736, 0.552, "fgsm_rs (tuned)"),
           (0.689, 0.543, "fgsm_pgi (tuned)"), (0.710, 0.534, "pgd (tuned)"), (0.700, 0.504, "fgsm_sdi (tuned)"),
           (0.686, 0.493, "slat (tuned)"), (0.656, 0.461, "las_at"), (0.610, 0.237, "atld (tuned)"),
           (0.807, 0.185, "eae (tuned)"), (0.802, 0.170, "standard")]
CLOSE_PAIR = [(0.740, 0.537, "fgsm_rs (tuned)"), (0.710, 0.534, "pgd (tuned)"), (0.656, 0.461, "las_at"),
              (0.802, 0.170, "standard")]


@pytest.mark.parametrize("labelled, size", [(CROWDED, (9.6, 6.4)), (CLOSE_PAIR, (7.2, 4.8))])
def test_plot_labels_overlap_neither_each_other_nor_other_points_and_stay_inside(labelled, size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustune.leaderboard import place_labels

    fig, ax = plt.subplots(figsize=size, dpi=120)
    ax.plot([x for x, _, _ in labelled], [y for _, y, _ in labelled], "o")
    ax.margins(x=0.12, y=0.08)
    fig.tight_layout()
    annotations = place_labels(ax, labelled)
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in annotations]
    inside = ax.get_window_extent(renderer)
    assert [a.get_text() for a in annotations] == [text for _, _, text in labelled]
    for i, box in enumerate(boxes):
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
            labelled[i][2]
        for j, other in enumerate(boxes[:i]):
            assert not box.overlaps(other), (labelled[i][2], labelled[j][2])
        for j, (x, y, _) in enumerate(labelled):
            if j != i:
                px, py = ax.transData.transform((x, y))
                assert not box.contains(px, py), (labelled[i][2], "covers the point of", labelled[j][2])
    plt.close(fig)


def test_the_leaderboard_plots_place_their_labels(tmp_path, monkeypatch):
    from robustune import leaderboard

    calls = []
    monkeypatch.setattr(leaderboard, "place_labels", lambda ax, labelled, **kw: calls.append(labelled))
    rows = [{**row(text, y, 0.5, None), "clean_ci_low": x - 0.01, "clean_ci_high": x + 0.01, "clean_mean": x}
            for x, y, text in CLOSE_PAIR]
    paths = leaderboard.plots(rows, tmp_path, "study t")
    assert [p.name for p in paths] == ["robust_vs_clean.png", "robust_vs_compute.png"]
    assert all(p.is_file() for p in paths)
    assert [[text for _, _, text in labelled] for labelled in calls] == [[t for _, _, t in CLOSE_PAIR]] * 2
