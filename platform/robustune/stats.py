"""Intervals and paired tests on per-point outcomes (is each attacked test point still classified correctly).

- `wilson_interval`: one model's accuracy over n points (95% by default).
- `bootstrap_accuracy`: a row over seeds: resample seeds, then points within each seed, so the interval holds
  seed-to-seed and test-point variation together.
- `paired_difference`: two defenses on the same points and seeds (seed s of both evaluated on the same test
  slice): the accuracy difference, its paired bootstrap interval and an exact McNemar p-value on the pooled
  discordant pairs.
Outcomes are 1-D boolean arrays (numpy, torch or lists); "by seed" means a list with one array per seed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
RESAMPLES = 4000  # bootstrap resamples: the interval's ends move by well under a point between reruns


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion correct / n: unlike the normal approximation it stays in
    [0, 1] and does not collapse to a point at 0 or n correct (the case of a defense at 0% or 100%)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one point, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_arrays(outcomes_by_seed: Sequence[Any], what: str) -> list[np.ndarray]:
    arrays = [np.asarray(outcomes, dtype=bool).reshape(-1) for outcomes in outcomes_by_seed]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError(f"{what}: need at least one seed with at least one point")
    return arrays


def _bootstrap_means(arrays: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` bootstrap means of the per-seed means: seeds drawn with replacement, then points within each
    (the same resampling serves per-point outcomes and paired per-point differences).

    Drawing a seed's n points with replacement draws each of its distinct values (0/1, or -1/0/+1 for paired
    differences) a multinomial number of times, with its share of the points as probability: the same
    distribution as drawing n indices, in a few operations per draw instead of n (a leaderboard takes tens of
    these intervals)."""
    seeds = len(arrays)
    chosen = rng.integers(0, seeds, size=(resamples, seeds))
    per_place = np.empty((resamples, seeds))  # the resampled mean of the seed drawn in each place
    for seed, points in enumerate(arrays):
        places = chosen == seed
        values, counts = np.unique(points.astype(np.float64), return_counts=True)
        draws = rng.multinomial(points.size, counts / points.size, size=int(places.sum()))
        per_place[places] = draws @ values / points.size
    return per_place.mean(axis=1)


def bootstrap_accuracy(outcomes_by_seed: Sequence[Any], *, resamples: int = RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean accuracy over seeds, interval low, high). With one seed there is no seed-to-seed variation to
    measure: the Wilson interval over its points is returned instead (a bootstrap of one seed is narrower)."""
    arrays = _as_arrays(outcomes_by_seed, "bootstrap_accuracy")
    mean = float(np.mean([a.mean() for a in arrays]))
    if len(arrays) == 1:
        return (mean, *wilson_interval(int(arrays[0].sum()), arrays[0].size))
    means = _bootstrap_means(arrays, resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2
    return mean, float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar_p(a: Any, b: Any) -> float:
    """Exact two-sided McNemar test: under "A and B are equally accurate", each point one gets right and the
    other wrong is equally likely to favour either; p = P(a split at least this lopsided). 1.0 when none differ."""
    a, b = np.asarray(a, dtype=bool).reshape(-1), np.asarray(b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same points, got {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    k = min(only_a, only_b)
    # P(X <= k) for X ~ Binomial(discordant, 1/2), doubled (two-sided), in log space for large counts.
    log_terms = [math.lgamma(discordant + 1) - math.lgamma(i + 1) - math.lgamma(discordant - i + 1)
                 - discordant * math.log(2) for i in range(k + 1)]
    peak = max(log_terms)
    tail = math.exp(peak) * sum(math.exp(t - peak) for t in log_terms)
    return min(1.0, 2 * tail)


def paired_difference(a_by_seed: Sequence[Any], b_by_seed: Sequence[Any], *, resamples: int = RESAMPLES,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Accuracy of A minus B on the same seeds and points: {"difference", "low", "high", "p_value", "points",
    "seeds", "only_a", "only_b"}. The interval resamples seeds, then points within each seed, the same points
    for A and B (paired); the p-value is McNemar's on every (seed, point) pair pooled."""
    a_arrays, b_arrays = _as_arrays(a_by_seed, "paired_difference"), _as_arrays(b_by_seed, "paired_difference")
    if len(a_arrays) != len(b_arrays) or any(x.size != y.size for x, y in zip(a_arrays, b_arrays)):
        raise ValueError("paired_difference needs both sides on the same seeds and the same points per seed, got "
                         f"{[x.size for x in a_arrays]} and {[y.size for y in b_arrays]} points per seed")
    # Per point: +1 A right and B wrong, -1 the reverse, 0 the same; its mean is the accuracy difference.
    differences = [x.astype(np.int8) - y.astype(np.int8) for x, y in zip(a_arrays, b_arrays)]
    difference = float(np.mean([d.mean() for d in differences]))
    boot = _bootstrap_means(differences, resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2
    pooled_a, pooled_b = np.concatenate(a_arrays), np.concatenate(b_arrays)
    return {"difference": difference,
            "low": float(np.quantile(boot, tail)), "high": float(np.quantile(boot, 1 - tail)),
            "p_value": mcnemar_p(pooled_a, pooled_b), "points": int(pooled_a.size), "seeds": len(differences),
            "only_a": int((pooled_a & ~pooled_b).sum()), "only_b": int((~pooled_a & pooled_b).sum())}


def verdict(comparison: dict[str, Any], a: str, b: str, what: str = "robust accuracy") -> str:
    """Words that follow the numbers: better / worse only when the interval excludes 0."""
    numbers = (f"{100 * comparison['difference']:+.1f} points, 95% interval [{100 * comparison['low']:+.1f}, "
               f"{100 * comparison['high']:+.1f}], McNemar p = {comparison['p_value']:.3g}, "
               f"{comparison['points']} paired points over {comparison['seeds']} seed(s)")
    if comparison["low"] > 0:
        return f"{a} is better than {b} in {what} ({numbers})"
    if comparison["high"] < 0:
        return f"{a} is worse than {b} in {what} ({numbers})"
    words = f"no significant difference in {what} between {a} and {b} at this budget ({numbers})"
    if comparison["seeds"] > 1 and comparison["p_value"] < 0.05:
        # McNemar sees the pooled points as independent; the interval also resamples seeds.
        words += ("; the pooled points alone differ (McNemar), but seed-to-seed variation keeps 0 inside the "
                  "interval")
    return words
