"""Small descriptive statistics for reports (no scipy): mean and standard deviation of values that were all observed.

Costs that may be censored never come here: ``survival`` summarises and tests them.
"""

from __future__ import annotations

import math
import statistics


def mean_sd(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); (nan, nan) for no values, sd 0 for one."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(x: float | None) -> str:
    """A share as a percentage with one decimal ('12.3%'); 'n/a' for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
