"""Intervals and paired tests on per-point outcomes (is each attacked test point still classified correctly).

A leaderboard row is a defense trained on a few seeds, each evaluated on its own test points. What a reader
wants to know is what another set of seeds would give, so the seeds are the samples: with three of them, their
spread, not the number of test points, decides how much a row or a difference can say.

- `wilson_interval`: one model's accuracy over n points (95% by default).
- `seed_interval`: the mean of per-seed values with its Student t interval over the seeds.
- `accuracy_interval`: a row over seeds: the t interval over the seeds' accuracies (it holds seed-to-seed and
  test-point variation: each seed's accuracy carries its points' noise), never narrower than the Wilson interval
  of all their points pooled (three seeds that agree by chance do not make the test points' noise go away).
- `paired_difference`: two defenses on the same points and seeds (seed s of both evaluated on the same test
  slice): the mean of the per-seed accuracy differences, its t interval over seeds (never narrower than the
  test points' own noise) and the matching two-sided p-value; McNemar's exact p on the pooled points rides
  along: it says whether these trained models differ on these points, not whether another set of seeds would.
- `seeds_to_settle`: how many seeds would put 0 outside that interval if the per-seed differences kept their
  mean and spread (the verdict says it when it cannot decide: a size for the next study).
Outcomes are 1-D boolean arrays (numpy, torch or lists); "by seed" means a list with one array per seed.

Why not a bootstrap over seeds, then points (what robustune used before): with three seeds it cannot reach
past the best or the worst seed, and it counts the points' noise twice. In 1000 simulated studies of 3 seeds x
333 points whose seeds differ by a standard deviation of 5 and 10 points (what these short-trained models
show), its 95% interval held the true row mean 89% and 76% of the time and the true difference 86% and 78%;
the intervals here held them 97% and 94%, 96% and 95% (tests/test_stats.py checks the coverage).

Why not treat the points' binomial noise as known and estimate only the seeds' own spread (a variance-component
interval with Satterthwaite's degrees of freedom): it is narrower when seeds agree (about the pooled Wilson
interval, where the t interval over six seeds is on average 1.3 times wider), but the seeds' spread is still
estimated from a few seeds, and where that estimate comes out small by chance both the variance and the quantile
shrink. In 3000 simulated rows whose seeds differ by 5 points it held the truth 89% of the time over 3 seeds x
333 points and 92% over 6 x 167 (the t interval: 96%).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np
from scipy import stats as distributions

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


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


def _t_quantile(seeds: int, level: float) -> float:
    return float(distributions.t.ppf(1 - (1 - level) / 2, seeds - 1))


def _normal_quantile(level: float) -> float:
    return float(distributions.norm.ppf(1 - (1 - level) / 2))


def seed_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of per-seed values (accuracies, or differences paired by seed): the Student t interval
    over the seeds; no interval (None, None) for one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_interval: need at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = _t_quantile(len(values), level) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def accuracy_interval(counts: Sequence[tuple[int, int]], level: float = 0.95) -> tuple[float, float, float]:
    """(mean accuracy over seeds, low, high) from each seed's (correct, points): the t interval over the seeds'
    accuracies, widened where it is narrower to the Wilson interval of all their points pooled. One seed: its
    Wilson interval (there is no seed-to-seed variation to measure)."""
    if not counts:
        raise ValueError("accuracy_interval: need at least one seed")
    for correct, n in counts:
        wilson_interval(correct, n)  # the same checks: n > 0, 0 <= correct <= n
    z = _normal_quantile(level)
    pooled_low, pooled_high = wilson_interval(sum(c for c, _ in counts), sum(n for _, n in counts), z)
    mean, low, high = seed_interval([c / n for c, n in counts], level)
    if low is None:
        return mean, pooled_low, pooled_high
    return mean, max(0.0, min(low, pooled_low)), min(1.0, max(high, pooled_high))


def _as_arrays(outcomes_by_seed: Sequence[Any], what: str) -> list[np.ndarray]:
    arrays = [np.asarray(outcomes, dtype=bool).reshape(-1) for outcomes in outcomes_by_seed]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError(f"{what}: need at least one seed with at least one point")
    return arrays


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


def _two_sided_p(estimate: float, standard_error: float, distribution) -> float:
    if standard_error == 0:
        return 1.0 if estimate == 0 else 0.0
    return float(min(1.0, 2 * distribution.sf(abs(estimate) / standard_error)))


def paired_difference(a_by_seed: Sequence[Any], b_by_seed: Sequence[Any], *, level: float = 0.95) -> dict[str, Any]:
    """Accuracy of A minus B on the same seeds and points: {"difference", "low", "high", "p_value", "test",
    "per_seed", "mcnemar_p", "points", "seeds", "only_a", "only_b"}.

    Over two or more seeds: the t interval of the per-seed differences and the paired t-test's p, each widened
    (the p-value raised) to the normal interval and test of the points' own noise where that is wider, so the
    interval excludes 0 exactly when p < 1 - level. One seed: the normal interval of its per-point differences
    and McNemar's exact p. `mcnemar_p` is always McNemar's on every (seed, point) pair pooled."""
    a_arrays, b_arrays = _as_arrays(a_by_seed, "paired_difference"), _as_arrays(b_by_seed, "paired_difference")
    if len(a_arrays) != len(b_arrays) or any(x.size != y.size for x, y in zip(a_arrays, b_arrays)):
        raise ValueError("paired_difference needs both sides on the same seeds and the same points per seed, got "
                         f"{[x.size for x in a_arrays]} and {[y.size for y in b_arrays]} points per seed")
    # Per point: +1 A right and B wrong, -1 the reverse, 0 the same; its mean is the seed's accuracy difference.
    differences = [x.astype(np.float64) - y.astype(np.float64) for x, y in zip(a_arrays, b_arrays)]
    per_seed = [float(d.mean()) for d in differences]
    seeds = len(per_seed)
    difference = statistics.fmean(per_seed)
    # The mean of independent per-seed means: its variance from the points alone is sum(var_s / n_s) / seeds^2.
    points_error = math.sqrt(sum(float(d.var()) / d.size for d in differences)) / seeds
    z = _normal_quantile(level)
    half, p_value = z * points_error, _two_sided_p(difference, points_error, distributions.norm)
    pooled_a, pooled_b = np.concatenate(a_arrays), np.concatenate(b_arrays)
    mcnemar = mcnemar_p(pooled_a, pooled_b)
    if seeds > 1:
        seeds_error = statistics.stdev(per_seed) / math.sqrt(seeds)
        half = max(half, _t_quantile(seeds, level) * seeds_error)
        p_value = max(p_value, _two_sided_p(difference, seeds_error, distributions.t(seeds - 1)))
        test = f"paired t over {seeds} seeds"
    else:
        p_value, test = mcnemar, "McNemar"
    return {"difference": difference, "low": max(-1.0, difference - half), "high": min(1.0, difference + half),
            "p_value": p_value, "test": test, "per_seed": per_seed, "mcnemar_p": mcnemar,
            "points": int(pooled_a.size), "seeds": seeds,
            "only_a": int((pooled_a & ~pooled_b).sum()), "only_b": int((~pooled_a & pooled_b).sum())}


MOST_SEEDS = 100  # seeds_to_settle stops looking here


def seeds_to_settle(per_seed: Sequence[float], level: float = 0.95) -> int | None:
    """The fewest seeds whose t interval would leave out 0 if the per-seed values kept the mean and standard
    deviation these ones show: a figure to size the next study with, not a promise (a mean that holds gets there
    about half the time). None without two seeds that differ, or past MOST_SEEDS."""
    if len(per_seed) < 2 or statistics.stdev(per_seed) == 0:
        return None
    mean, spread = abs(statistics.fmean(per_seed)), statistics.stdev(per_seed)
    return next((n for n in range(2, MOST_SEEDS + 1) if _t_quantile(n, level) * spread / math.sqrt(n) < mean), None)


def verdict(comparison: dict[str, Any], a: str, b: str, what: str = "robust accuracy") -> str:
    """Words that follow the numbers: better / worse only when the interval excludes 0."""
    numbers = (f"{100 * comparison['difference']:+.1f} points, 95% interval [{100 * comparison['low']:+.1f}, "
               f"{100 * comparison['high']:+.1f}], {comparison['test']} p = {comparison['p_value']:.3g}")
    if comparison["seeds"] > 1:
        numbers += f" (per seed {', '.join(f'{100 * value:+.1f}' for value in comparison['per_seed'])})"
    numbers += f", {comparison['points']} paired points over {comparison['seeds']} seed(s)"
    if comparison["seeds"] < 2:
        # One seed compares two trained models; how much another seed would move either is unmeasured.
        numbers += "; one seed: these two models, not the defenses in general"
    if comparison["low"] > 0:
        return f"{a} is better than {b} in {what} ({numbers})"
    if comparison["high"] < 0:
        return f"{a} is worse than {b} in {what} ({numbers})"
    words = f"no significant difference in {what} between {a} and {b} at this budget ({numbers})"
    if comparison["seeds"] < 2:
        return words
    if comparison["mcnemar_p"] < 0.05:
        # The trained models differ on these points, but another set of seeds might not: say which decides.
        words += (f"; these models differ on the pooled points (McNemar p = {comparison['mcnemar_p']:.3g}), but "
                  "seed-to-seed variation keeps 0 inside the interval")
    # Seeds that agree exactly leave only the points' noise: more seeds of the same spread is no answer there.
    if statistics.stdev(comparison["per_seed"]) > 0:
        needed = seeds_to_settle(comparison["per_seed"])
        words += (f"; if the per-seed differences kept this mean and spread, {needed} seeds would put 0 outside "
                  "the interval" if needed else f"; at this mean and spread, not even {MOST_SEEDS} seeds would "
                  "settle it")
    return words
