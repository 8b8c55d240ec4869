"""Intervals and paired tests against hand computations and constructed outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from robustune.stats import bootstrap_accuracy, mcnemar_p, paired_difference, verdict, wilson_interval


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
    assert result["difference"] == pytest.approx(-10 / 400)
    assert result["only_a"] == 0 and result["only_b"] == 30 and result["points"] == 1200 and result["seeds"] == 3
    assert result["high"] < 0 and result["p_value"] < 1e-6  # 2 * 0.5^30
    assert verdict(result, "worse model", "better model").startswith("worse model is worse than better model")
    flipped = paired_difference(better, worse)
    assert flipped["low"] > 0 and verdict(flipped, "B", "A").startswith("B is better than A")


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([outcomes(10, 0.5, 0)], [outcomes(10, 0.5, 0), outcomes(10, 0.5, 1)])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])


def test_row_interval_holds_seed_and_point_variation():
    one_seed = [outcomes(500, 0.6, 0)]
    mean, low, high = bootstrap_accuracy(one_seed)
    assert (low, high) == pytest.approx(wilson_interval(300, 500))  # one seed: the interval over its points
    # Three seeds whose accuracies differ (0.5, 0.6, 0.7): the row's interval is wider than any one seed's.
    spread = [outcomes(500, accuracy, s) for s, accuracy in enumerate((0.5, 0.6, 0.7))]
    mean, low, high = bootstrap_accuracy(spread)
    assert mean == pytest.approx(0.6)
    assert low < 0.6 < high and high - low > 2 * (wilson_interval(300, 500)[1] - 0.6)
    # Three seeds that agree: close to the interval of their 1500 points.
    agree = [outcomes(500, 0.6, s) for s in range(3)]
    mean, low, high = bootstrap_accuracy(agree)
    pooled_low, pooled_high = wilson_interval(900, 1500)
    assert low == pytest.approx(pooled_low, abs=0.01) and high == pytest.approx(pooled_high, abs=0.01)
    assert bootstrap_accuracy(spread) == bootstrap_accuracy(spread)  # seeded: the same interval every time


def test_a_verdict_says_when_seeds_not_points_keep_it_undecided():
    """Points that differ under McNemar, but seeds that disagree: no verdict, and the words say why."""
    comparison = {"difference": -0.11, "low": -0.29, "high": 0.002, "p_value": 5e-14, "points": 999, "seeds": 3}
    words = verdict(comparison, "A", "B")
    assert words.startswith("no significant difference") and "seed-to-seed variation keeps 0 inside" in words
    assert "seed-to-seed" not in verdict({**comparison, "p_value": 0.4}, "A", "B")
    assert "seed-to-seed" not in verdict({**comparison, "seeds": 1}, "A", "B")


def test_bootstrap_draws_have_the_distribution_of_resampled_points():
    """The bootstrap draws each seed's value counts (multinomial) instead of n point indices: its means must have
    the distribution of the seeds-then-points resampling written out index by index."""
    from robustune.stats import _bootstrap_means

    def by_index(arrays, resamples, rng):
        chosen = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
        return np.array([np.mean([arrays[s][rng.integers(0, arrays[s].size, size=arrays[s].size)].mean()
                                  for s in row]) for row in chosen])

    robust = [outcomes(333, accuracy, s) for s, accuracy in enumerate((0.35, 0.47, 0.56))]
    other = [outcomes(333, 0.5, 10 + s) for s in range(3)]
    differences = [a.astype(np.int8) - b.astype(np.int8) for a, b in zip(robust, other)]  # values -1, 0, +1
    for arrays in (robust, differences, [outcomes(50, 0.5, 7), outcomes(80, 0.6, 8)]):  # unequal sizes too
        fast = _bootstrap_means(arrays, 20000, np.random.default_rng(0))
        reference = by_index(arrays, 20000, np.random.default_rng(1))
        assert fast.mean() == pytest.approx(reference.mean(), abs=0.002)
        assert fast.std() == pytest.approx(reference.std(), rel=0.03)
        assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(np.quantile(reference, [0.025, 0.975]), abs=0.006)
    # A seed whose points all agree resamples to itself.
    assert np.all(_bootstrap_means([np.ones(20, dtype=bool)], 100, np.random.default_rng(0)) == 1.0)
