"""Intervals and paired tests against hand computations and constructed outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from robustune.stats import (accuracy_interval, mcnemar_p, paired_difference, seed_interval, seeds_to_settle,
                             verdict, wilson_interval)


def test_wilson_interval_matches_a_hand_computation():
    # 8 of 10 correct, z = 1.96: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167,
    # half-width 1.96 sqrt(0.8 * 0.2 / 10 + 1.96^2 / 400) / (1 + 1.96^2/10) = 0.2266.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 200)  # a defense at 0%: the interval still has width (z^2/n / (1 + z^2/n))
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.01884, abs=1e-4)
    assert wilson_interval(500, 1000)[1] - 0.5 == pytest.approx(0.0309, abs=1e-4)  # ±3 points at 1000 points
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct must be"):
        wilson_interval(11, 10)


def test_mcnemar_matches_the_binomial_tail():
    a = np.array([True] * 10 + [False] * 10)
    b = a.copy()
    assert mcnemar_p(a, b) == 1.0  # no discordant pair
    # 8 points only A gets right, 2 only B: p = 2 * P(Binomial(10, 1/2) <= 2) = 2 * 56/1024.
    a = np.array([True] * 8 + [False] * 2 + [True] * 5)
    b = np.array([False] * 8 + [True] * 2 + [True] * 5)
    assert mcnemar_p(a, b) == pytest.approx(2 * 56 / 1024)
    assert mcnemar_p(b, a) == pytest.approx(2 * 56 / 1024)  # symmetric
    with pytest.raises(ValueError, match="same points"):
        mcnemar_p(a, b[:-1])


def outcomes(n: int, accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flags = np.zeros(n, dtype=bool)
    flags[rng.choice(n, size=round(accuracy * n), replace=False)] = True
    return flags


def test_identical_models_differ_by_nothing():
    seeds = [outcomes(400, 0.6, s) for s in range(3)]
    result = paired_difference(seeds, [s.copy() for s in seeds])
    assert result["difference"] == 0.0 and result["p_value"] == 1.0
    assert result["low"] <= 0.0 <= result["high"]
    assert verdict(result, "A", "B").startswith("no significant difference")


def test_a_model_wrong_on_30_more_points_is_significantly_worse():
    better = [outcomes(400, 0.6, s) for s in range(3)]
    worse = [flags.copy() for flags in better]
    for flags in worse:  # 10 more wrong points per seed, 30 in all, each one the better model gets right
        flags[np.flatnonzero(flags)[:10]] = False
    result = paired_difference(worse, better)
    assert result["difference"] == pytest.approx(-10 / 400) and result["per_seed"] == pytest.approx([-0.025] * 3)
    assert result["only_a"] == 0 and result["only_b"] == 30 and result["points"] == 1200 and result["seeds"] == 3
    assert result["mcnemar_p"] == pytest.approx(2 * 0.5 ** 30)
    # The seeds agree exactly (sd 0), so the points' own noise sets the interval: per point -1 on 10 of 400
    # (variance 0.025 * 0.975), the mean of 3 seeds: standard error sqrt(3 * 0.024375 / 400) / 3 = 0.0045069.
    assert result["high"] == pytest.approx(-0.025 + 1.959964 * 0.0045069, abs=1e-6)
    assert result["high"] < 0 and result["p_value"] < 1e-6 and result["test"] == "paired t over 3 seeds"
    assert verdict(result, "worse model", "better model").startswith("worse model is worse than better model")
    flipped = paired_difference(better, worse)
    assert flipped["low"] > 0 and verdict(flipped, "B", "A").startswith("B is better than A")


def test_paired_difference_over_seeds_is_the_t_interval_of_the_per_seed_differences():
    """Seeds whose differences are +2, +4 and +12 points (400 points each): mean +6, sd sqrt(0.0028) = 0.052915,
    standard error 0.030551, t(0.975, 2) = 4.302653: half-width 0.131448; paired t-test p = 0.188497. The
    points alone (McNemar on the pooled 1200) call it significant; the verdict says the seeds keep it open."""
    a, b = [], []
    for seed, extra in enumerate((8, 16, 48)):
        base = outcomes(400, 0.5, seed)
        better = base.copy()
        better[np.flatnonzero(~base)[:extra]] = True  # right on `extra` more points than b
        a.append(better), b.append(base)
    result = paired_difference(a, b)
    assert result["per_seed"] == pytest.approx([0.02, 0.04, 0.12]) and result["difference"] == pytest.approx(0.06)
    assert (result["low"], result["high"]) == pytest.approx((0.06 - 0.131448, 0.06 + 0.131448), abs=1e-6)
    assert result["p_value"] == pytest.approx(0.188497, abs=1e-6) and result["mcnemar_p"] < 1e-20
    words = verdict(result, "A", "B")
    assert words.startswith("no significant difference in robust accuracy between A and B at this budget (+6.0 "
                            "points, 95% interval [-7.1, +19.1], paired t over 3 seeds p = 0.188 (per seed +2.0, "
                            "+4.0, +12.0), 1200 paired points over 3 seed(s))"), words
    assert "these models differ on the pooled points (McNemar p = " in words
    # mean 6, sd 5.2915: 5 seeds give t(4) 2.776 x 5.2915 / sqrt(5) = 6.57 > 6, 6 seeds 2.571 x 5.2915 / sqrt(6) = 5.55
    assert words.endswith("; if the per-seed differences kept this mean and spread, 6 seeds would put 0 outside "
                          "the interval"), words
    # One seed: the points are all there is; McNemar's exact p and the normal interval of the differences.
    one = paired_difference(a[2:], b[2:])
    assert one["test"] == "McNemar" and one["p_value"] == one["mcnemar_p"] == pytest.approx(2 * 0.5 ** 48)
    assert one["low"] == pytest.approx(0.12 - 1.959964 * np.sqrt(0.12 * 0.88 / 400), abs=1e-6)
    assert "per seed" not in verdict(one, "A", "B")
    assert verdict(one, "A", "B").endswith("400 paired points over 1 seed(s); one seed: these two models, not the "
                                           "defenses in general)")


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([outcomes(10, 0.5, 0)], [outcomes(10, 0.5, 0), outcomes(10, 0.5, 1)])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])


def test_seed_interval_is_the_student_t_interval_by_hand():
    # Values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138.
    mean, low, high = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (low, high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    assert seed_interval([4.0]) == (4.0, None, None)
    with pytest.raises(ValueError, match="at least one"):
        seed_interval([])


def test_seeds_to_settle_is_the_fewest_seeds_whose_t_interval_leaves_out_zero():
    # Mean 2, sd 1: 3 seeds give 4.303 / sqrt(3) = 2.48 > 2, 4 seeds 3.182 / 2 = 1.59 < 2.
    assert seeds_to_settle([1.0, 2.0, 3.0]) == 4 and seeds_to_settle([-1.0, -2.0, -3.0]) == 4
    assert seeds_to_settle([0.5]) is None and seeds_to_settle([0.1, 0.1, 0.1]) is None  # no spread to scale
    assert seeds_to_settle([1.0, -1.0, 0.5]) is None  # a mean this small against this spread: past 100 seeds
    identical = verdict({"difference": 0.0, "low": -0.01, "high": 0.01, "p_value": 1.0, "test": "paired t over 3 seeds",
                         "per_seed": [0.0, 0.0, 0.0], "mcnemar_p": 1.0, "points": 999, "seeds": 3}, "A", "B")
    assert "seeds would" not in identical and "settle" not in identical
    undecided = verdict({"difference": 0.0, "low": -0.1, "high": 0.1, "p_value": 1.0, "test": "paired t over 3 seeds",
                         "per_seed": [0.05, -0.05, 0.0], "mcnemar_p": 0.9, "points": 999, "seeds": 3}, "A", "B")
    assert undecided.endswith("; at this mean and spread, not even 100 seeds would settle it"), undecided
    # Seeds that agree exactly, undecided only by the points' noise: no seed count is named.
    agreeing = verdict({"difference": 0.01, "low": -0.02, "high": 0.04, "p_value": 0.5, "test": "paired t over 3 seeds",
                        "per_seed": [0.01, 0.01, 0.01], "mcnemar_p": 0.5, "points": 999, "seeds": 3}, "A", "B")
    assert agreeing.endswith("999 paired points over 3 seed(s))"), agreeing


def test_row_interval_holds_seed_and_point_variation():
    # One seed: the interval over its points.
    assert accuracy_interval([(300, 500)]) == (0.6, *wilson_interval(300, 500))
    # Seeds at 0.50, 0.56, 0.53 of 300: sd 0.03, t half-width 4.302653 * 0.03 / sqrt(3) = 0.074524, wider than
    # the pooled points' Wilson interval (477 of 900: about +-0.033).
    mean, low, high = accuracy_interval([(150, 300), (168, 300), (159, 300)])
    assert mean == pytest.approx(0.53) and (low, high) == pytest.approx((0.53 - 0.074524, 0.53 + 0.074524), abs=1e-6)
    # Seeds that agree exactly: never narrower than the Wilson interval of their 1500 points pooled.
    assert accuracy_interval([(300, 500)] * 3) == (pytest.approx(0.6), *wilson_interval(900, 1500))
    # Kept inside [0, 1]: seeds at 0.01, 0.02, 0.30 (t interval from below 0).
    mean, low, high = accuracy_interval([(3, 300), (6, 300), (90, 300)])
    assert low == 0.0 and high < 1.0
    with pytest.raises(ValueError, match="correct must be in"):
        accuracy_interval([(301, 300)])


def test_a_verdict_says_when_seeds_not_points_keep_it_undecided():
    """Points that differ under McNemar, but seeds that disagree: no verdict, and the words say why."""
    comparison = {"difference": -0.11, "low": -0.29, "high": 0.002, "p_value": 0.06, "test": "paired t over 3 seeds",
                  "per_seed": [-0.02, -0.04, -0.27], "mcnemar_p": 5e-14, "points": 999, "seeds": 3}
    words = verdict(comparison, "A", "B")
    assert words.startswith("no significant difference") and "seed-to-seed variation keeps 0 inside" in words
    assert "(per seed -2.0, -4.0, -27.0)" in words
    assert "seed-to-seed" not in verdict({**comparison, "mcnemar_p": 0.4}, "A", "B")
    assert "seed-to-seed" not in verdict({**comparison, "seeds": 1, "test": "McNemar"}, "A", "B")


def _coverage(seed_sd: float, simulations: int, rng: np.random.Generator) -> dict[str, float]:
    """How often the row interval holds the true mean accuracy (0.5) and the paired interval the true mean
    difference (0), and their mean half-widths, over simulated studies of 3 seeds x 333 points whose seeds differ
    by `seed_sd`."""
    hits, halves = {"row": 0, "difference": 0}, {"row": 0.0, "difference": 0.0}
    for _ in range(simulations):
        accuracies = 0.5 + rng.normal(0, seed_sd, 3)
        b = [rng.random(333) < p for p in accuracies]
        # A agrees with B on 60% of the points (paired), its per-seed gap to B drawn around 0 with sd `seed_sd`.
        gaps = rng.normal(0, seed_sd, 3)
        a = [np.where(rng.random(333) < 0.6, x, rng.random(333) < p + gap / 0.4)
             for x, p, gap in zip(b, accuracies, gaps)]
        _, low, high = accuracy_interval([(int(x.sum()), x.size) for x in b])
        hits["row"] += low <= 0.5 <= high
        halves["row"] += (high - low) / 2
        result = paired_difference(a, b)
        hits["difference"] += result["low"] <= 0 <= result["high"]
        halves["difference"] += (result["high"] - result["low"]) / 2
    return {**{k: v / simulations for k, v in hits.items()},
            **{f"{k} half": v / simulations for k, v in halves.items()}}


def test_intervals_over_three_seeds_hold_the_truth_as_often_as_they_claim():
    """With seeds that differ by 10 points (as short-trained models do), a 95% interval must hold the true value
    about 95% of the time. A bootstrap over 3 seeds then points (robustune's former method) held it 76% (rows)
    and 77% (differences) in this simulation; below 0.92 over 400 simulated studies would be a real defect
    (the count's own standard error is about 0.011)."""
    rng = np.random.default_rng(2026)
    spread = _coverage(0.10, 400, rng)
    assert spread["row"] >= 0.92 and spread["difference"] >= 0.92, spread
    # Seeds that agree: the intervals still hold the truth, without growing to what spread seeds need (an interval
    # of [0, 1] would pass the coverage checks): about +-6 points for a row, +-5 for a difference at 3 x 333.
    agree = _coverage(0.0, 400, rng)
    assert agree["row"] >= 0.92 and agree["difference"] >= 0.92, agree
    assert agree["row half"] < 0.08 and agree["difference half"] < 0.07, agree
    assert spread["row half"] > 2 * agree["row half"], (spread, agree)
