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
