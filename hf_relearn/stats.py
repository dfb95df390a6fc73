"""Small statistics for reports: mean ± sd, Spearman's rank correlation with a permutation p-value, bootstrap
intervals. numpy only (no scipy), deterministic (fixed seeds), so a rebuilt report prints the same numbers."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np


def mean_sd(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); (nan, nan) for no values, sd 0 for one."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks); nan when either side is constant or n < 3."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho of n pairs, its two-sided permutation p-value and a bootstrap 95% interval of rho."""

    rho: float
    p_value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.rho):
            return f"rho n/a (n={self.n})"
        p = "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"
        return f"rho = {self.rho:+.2f} ({p}, 95% CI {self.low:+.2f} to {self.high:+.2f}, n = {self.n})"


def rank_correlation(
    xs: list[float], ys: list[float], permutations: int = 5000, resamples: int = 2000, seed: int = 0
) -> RankCorrelation:
    """Spearman's rho with a two-sided permutation p-value (share of shuffles of ``ys`` with |rho| at least as
    large, counting the observed one) and a percentile bootstrap 95% interval (pairs resampled with replacement).
    Deterministic for a given ``seed``."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    rho = spearman(x, y)
    if math.isnan(rho):
        return RankCorrelation(math.nan, math.nan, math.nan, math.nan, len(x))
    rng = np.random.default_rng(seed)
    rx, ry = _ranks(x), _ranks(y)
    hits = 1
    for _ in range(permutations):
        if abs(np.corrcoef(rx, rng.permutation(ry))[0, 1]) >= abs(rho) - 1e-12:
            hits += 1
    p_value = hits / (permutations + 1)
    boots = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        value = spearman(x[pick], y[pick])
        if not math.isnan(value):
            boots.append(value)
    low, high = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))) if boots else (math.nan,) * 2
    return RankCorrelation(rho, p_value, low, high, len(x))


def bootstrap_mean_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (nan, nan for fewer than two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def permutation_difference(a: list[float], b: list[float], permutations: int = 5000, seed: int = 0) -> float:
    """Two-sided permutation p-value of the difference of means of ``a`` and ``b`` (labels shuffled, the observed
    split counted); nan when either group is empty. Deterministic for a given ``seed``."""
    if not a or not b:
        return math.nan
    values = np.asarray(list(a) + list(b), dtype=float)
    observed = abs(np.mean(a) - np.mean(b))
    rng = np.random.default_rng(seed)
    hits = 1
    for _ in range(permutations):
        shuffled = rng.permutation(values)
        if abs(shuffled[: len(a)].mean() - shuffled[len(a) :].mean()) >= observed - 1e-12:
            hits += 1
    return hits / (permutations + 1)
