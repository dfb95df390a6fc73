"""Censoring-aware statistics of recovery costs, with the trained base as the unit (lifelines and scipy).

A run that did not come back within the tolerance is right-censored at the share of the budget it trained: it never
enters a mean, a standard deviation or a rank as a value. Costs are summarised by Kaplan-Meier (recovered / total,
the median with its 95% interval or "not reached", a restricted mean up to a common horizon). The layers and reset
seeds of one base share that base, so every test first reduces a group to one outcome per base and then counts
bases: Gehan scores (which order censored values only where the order is certain) compared by an exact permutation
test, a sign test for pairs within a base, a Weibull accelerated-failure-time fit for a ratio with its interval.
Each test says how many bases it counts and the smallest p its design allows; below 3 bases a side it is not run.
Imports no torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

MIN_BASES = 3  # below this many bases a side: describe, do not test


@dataclass(frozen=True)
class Outcome:
    """One run's (or one base's) cost as a share of its base's budget, whether it was observed, and its base."""

    cost: float
    recovered: bool
    base: str


def _pct(x: float) -> str:
    return "not reached" if math.isinf(x) else f"{100 * x:.1f}%"


@dataclass(frozen=True)
class CostSummary:
    """Kaplan-Meier summary of a group of runs' costs (shares of their budgets)."""

    runs: int
    recovered: int
    bases: int
    median: float  # inf: not reached (fewer than half recovered by the last follow-up)
    low: float
    high: float  # inf: the interval is open above
    horizon: float  # the common horizon of the restricted mean: the shortest cap among the runs not back
    restricted_mean: float
    followed: float  # the longest follow-up: a median not reached is not reached within this

    def __str__(self) -> str:
        head = f"{self.recovered}/{self.runs} back ({self.bases} base{'s' if self.bases != 1 else ''})"
        if math.isinf(self.median):
            median = f"median not reached within {_pct(self.followed)}"
        else:
            median = f"median {_pct(self.median)} (95% CI {_pct(self.low)} to {_pct(self.high)})"
        return f"{head}; {median}; restricted mean to {_pct(self.horizon)}: {_pct(self.restricted_mean)}"


def _median(fitter) -> float:
    """The first cost at which the Kaplan-Meier curve is at 0.5 or below (inf if never). Compared with a margin of
    1e-9: the curve is a product of fractions, and 5/6 x 4/5 x 3/4 lands a rounding step above or below 0.5 depending
    on how many runs repeat each other, which must not move the median."""
    curve = fitter.survival_function_.iloc[:, 0]
    below = curve[curve <= 0.5 + 1e-9]
    return float(below.index[0]) if len(below) else math.inf


def summarise(outcomes: list[Outcome], horizon: float | None = None) -> CostSummary:
    """Kaplan-Meier summary of ``outcomes``: recovered / total, bases, the median cost with its 95% interval
    (lifelines; inf where not reached), and the restricted mean cost up to ``horizon`` (default: the shortest cap
    among the runs that did not recover, every run having been watched at least that long; the longest cost when
    all recovered). Guarantees: a censored run enters only
    as "not back by its cost"."""
    from lifelines import KaplanMeierFitter
    from lifelines.utils import median_survival_times, restricted_mean_survival_time

    durations = [o.cost for o in outcomes]
    observed = [o.recovered for o in outcomes]
    fitter = KaplanMeierFitter().fit(durations, observed)
    interval = median_survival_times(fitter.confidence_interval_)
    low, high = (float(v) for v in np.asarray(interval).reshape(-1)[:2])
    if horizon is None:  # every run was watched at least this long: the shortest cap among those that did not recover
        capped = [o.cost for o in outcomes if not o.recovered]
        horizon = min(capped) if capped else max(durations)
    mean = float(restricted_mean_survival_time(fitter, t=horizon)) if horizon > 0 else 0.0
    summary = CostSummary(
        runs=len(outcomes),
        recovered=sum(observed),
        bases=len({o.base for o in outcomes}),
        median=_median(fitter),
        low=low,
        high=high,
        horizon=horizon,
        restricted_mean=mean,
        followed=max(durations),
    )
    return summary


def median_or_bound(outcomes: list[Outcome]) -> tuple[float, bool]:
    """The Kaplan-Meier median cost of ``outcomes`` and True where it was reached; where fewer than half came back
    by their caps, the longest follow-up, a lower bound of the median, and False. Never an average of caps."""
    summary = summarise(outcomes)
    return (summary.median, True) if math.isfinite(summary.median) else (summary.followed, False)


def per_base(outcomes: list[Outcome]) -> list[Outcome]:
    """One outcome per base, in first-seen order: the Kaplan-Meier median of its runs where reached (observed),
    else censored at its longest follow-up. A base with one run keeps that run's outcome."""
    bases: dict[str, list[Outcome]] = {}
    for o in outcomes:
        bases.setdefault(o.base, []).append(o)
    out = []
    for base, runs in bases.items():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        median = summarise(runs).median
        if math.isinf(median):
            out.append(Outcome(max(o.cost for o in runs), False, base))
        else:
            out.append(Outcome(median, True, base))
    return out


def gehan_scores(outcomes: list[Outcome]) -> np.ndarray:
    """Each outcome's Gehan score: how many others are certainly cheaper minus how many are certainly dearer. An
    order is certain where the cheaper one was observed and came first (a censored run is dearer than every run
    observed before its cost, and undecided against the others)."""

    def cheaper(a: Outcome, b: Outcome) -> bool:
        return a.recovered and (a.cost < b.cost or (a.cost == b.cost and not b.recovered))

    return np.array(
        [sum(cheaper(b, a) for b in outcomes) - sum(cheaper(a, b) for b in outcomes) for a in outcomes], dtype=float
    )


@dataclass(frozen=True)
class Test:
    """A p-value that counts bases, with what its design allows."""

    p: float
    min_p: float
    bases: tuple[int, ...]
    method: str

    def __str__(self) -> str:
        p = "p < 0.001" if self.p < 0.001 else f"p = {self.p:.3f}"
        n = " vs ".join(str(b) for b in self.bases)
        return f"{p}, {self.method}, {n} bases; the smallest p this design allows is {self.min_p:.3g}"

    @property
    def significant(self) -> bool:
        return self.p < 0.05


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def rank_correlation(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along ``axis`` (average ranks for ties, scipy's rankdata); 0 where a side is constant.
    Vectorised, so that a permutation test evaluates all its shuffles at once."""
    from scipy import stats

    ra, rb = stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis)
    ra = ra - ra.mean(axis=axis, keepdims=True)
    rb = rb - rb.mean(axis=axis, keepdims=True)
    norm = np.sqrt((ra**2).sum(axis=axis) * (rb**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=axis) / norm
    return np.nan_to_num(rho)


def _permutation_p(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    """Two-sided permutation p-value (scipy): of the difference in means (``independent``, exact for small groups)
    or of Spearman's rho of paired values (``pairings``); deterministic."""
    from scipy import stats

    if kind == "independent":
        data, statistic = (x, y), _mean_difference
    else:  # shuffle x against a fixed y: exact up to 8 values (9999 random orders beyond), deterministic either way
        data = (x,)

        def statistic(a: np.ndarray, axis: int = -1) -> np.ndarray:
            return rank_correlation(a, np.broadcast_to(y, a.shape), axis)

    result = stats.permutation_test(
        data, statistic, permutation_type=kind, n_resamples=9999, alternative="two-sided", vectorized=True, rng=0
    )
    return float(result.pvalue)


def compare(a: list[Outcome], b: list[Outcome]) -> Test | None:
    """Whether two groups of bases differ in cost: per-base outcomes (:func:`per_base`), Gehan scores of the pooled
    bases, an exact two-sided permutation test of their difference in mean score. None below ``MIN_BASES`` a side."""
    a, b = per_base(a), per_base(b)
    if min(len(a), len(b)) < MIN_BASES:
        return None
    scores = gehan_scores(a + b)
    p = _permutation_p(scores[: len(a)], scores[len(a) :], "independent")
    split = np.arange(len(a) + len(b), dtype=float)
    min_p = _permutation_p(split[: len(a)], split[len(a) :], "independent")
    return Test(p, min_p, (len(a), len(b)), "exact permutation test of Gehan scores")


def trend(values: list[float], outcomes: list[Outcome]) -> tuple[float, Test] | None:
    """Whether cost follows ``values`` (one per outcome; e.g. depth): per-base outcomes (a base's value is its
    first run's), Spearman's rho of value with Gehan score, a two-sided permutation p-value. (rho, test), or None
    with fewer than 2 values or ``MIN_BASES`` bases at the least common value."""
    value_of = {}
    for v, o in zip(values, outcomes, strict=True):
        value_of.setdefault(o.base, v)
    bases = per_base(outcomes)
    xs = np.array([value_of[o.base] for o in bases], dtype=float)
    counts = [int((xs == v).sum()) for v in np.unique(xs)]
    if len(counts) < 2 or min(counts) < MIN_BASES:
        return None
    scores = gehan_scores(bases)
    rho = float(rank_correlation(xs, scores))
    p = _permutation_p(xs, scores, "pairings")
    min_p = _permutation_p(xs, xs, "pairings")
    return rho, Test(p, min_p, tuple(counts), "permutation test of Spearman's rho of value and Gehan score")


def paired(pairs: list[tuple[Outcome, Outcome]]) -> tuple[int, int, int, Test | None]:
    """Pairs within a base (e.g. its edge layers vs its middle ones, each reduced per base): (first certainly
    dearer, certainly cheaper, undecided, a two-sided sign test over the decided bases, or None below
    ``MIN_BASES`` decided)."""
    from scipy import stats

    dearer = cheaper = 0
    for a, b in pairs:
        score = gehan_scores([a, b])[0]
        dearer, cheaper = dearer + (score > 0), cheaper + (score < 0)
    decided = dearer + cheaper
    if decided < MIN_BASES:
        return dearer, cheaper, len(pairs) - decided, None
    p = float(stats.binomtest(dearer, decided, 0.5).pvalue)
    test = Test(p, float(2 * 0.5**decided), (decided,), "sign test over bases")
    return dearer, cheaper, len(pairs) - decided, test


@dataclass(frozen=True)
class Ratio:
    """A cost ratio from a Weibull accelerated-failure-time fit on per-base outcomes: per doubling of a value (or
    between two groups), its 95% interval and the smallest ratio the design could have detected (80% power,
    two-sided 5%: exp(2.8 standard errors))."""

    ratio: float
    low: float
    high: float
    detectable: float

    def __str__(self) -> str:
        return (
            f"{self.ratio:.2f}x (95% CI {self.low:.2f}x to {self.high:.2f}x; the design could detect a factor of "
            f"{self.detectable:.2f} or more)"
        )


def ratio(values: list[float], outcomes: list[Outcome], log2: bool = True) -> Ratio | None:
    """The cost ratio per doubling of ``values`` (``log2``) or per unit of them, from per-base outcomes; None where
    the fit cannot be made (fewer than 2 recovered bases, or no convergence)."""
    import pandas as pd
    from lifelines import WeibullAFTFitter

    value_of = {}
    for v, o in zip(values, outcomes, strict=True):
        value_of.setdefault(o.base, v)
    bases = per_base(outcomes)
    if sum(o.recovered for o in bases) < 2 or len({value_of[o.base] for o in bases}) < 2:
        return None
    x = [math.log2(value_of[o.base]) if log2 else value_of[o.base] for o in bases]
    frame = pd.DataFrame({"T": [o.cost for o in bases], "E": [o.recovered for o in bases], "x": x})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = WeibullAFTFitter().fit(frame, "T", "E", formula="x")
        coef = float(fit.params_.loc[("lambda_", "x")])
        se = float(fit.standard_errors_.loc[("lambda_", "x")])
    except Exception:  # lifelines raises several types when a tiny censored sample does not converge
        return None
    if not (math.isfinite(coef) and math.isfinite(se)) or se > 20:
        return None
    return Ratio(math.exp(coef), math.exp(coef - 1.96 * se), math.exp(coef + 1.96 * se), math.exp(2.8 * se))
