"""The recovery rule on noisy curves: a smoothed crossing, not the first evaluation that dips under the line."""

import math

import numpy as np
import pytest

from hf_relearn.errors import RelearnError
from hf_relearn.relearn.arguments import RelearnArguments
from hf_relearn.relearn.result import curve_noise, first_reach, smoothed

EVERY, CROSSING, BASE = 25, 40, 2.0  # evaluations every 25 steps; the trend crosses the 1% line at evaluation 40


def _noisy_curve(seed: int, slope: float, noise: float) -> list[tuple[int, float]]:
    """A relearn curve falling linearly by ``slope`` (share of the baseline per evaluation) through the 1% line at
    evaluation ``CROSSING``, levelling off 0.5% under the baseline, each evaluation off its trend by ``noise``."""
    rng = np.random.default_rng(seed)
    k = np.arange(80)
    trend = np.maximum(BASE * 1.01 + BASE * slope * (CROSSING - k), BASE * 0.995)
    values = trend * (1 + noise * rng.standard_normal(len(k)))
    return [(int(i * EVERY), float(v)) for i, v in zip(k, values, strict=True)]


def _errors(window: int, slope: float, noise: float = 0.003, seeds: int = 400) -> np.ndarray:
    """Found minus true crossing, in evaluations, over many noisy curves."""
    found = [first_reach(_noisy_curve(s, slope, noise), BASE * 1.01, False, 1, window) for s in range(seeds)]
    return np.array([f / EVERY - CROSSING for f in found])


def test_a_smoothed_crossing_is_found_within_one_evaluation_not_at_the_first_dip():
    # evaluations scatter by 0.3% around their trend (the median over decoder-grid's curves), the trend falls 0.2%
    # of the baseline per evaluation at the crossing
    raw, smooth = _errors(1, 0.002), _errors(5, 0.002)
    assert np.mean(np.abs(smooth) <= 1) >= 0.9
    assert np.mean(smooth <= -2) <= 0.02 < 0.08 <= np.mean(raw <= -2)
    # a slower fall (0.1% per evaluation, a third of the noise): the first dip comes 2 or more evaluations early in
    # about 4 curves of 10, the smoothed crossing in under 1 of 10
    raw, smooth = _errors(1, 0.001), _errors(5, 0.001)
    assert np.mean(smooth <= -2) <= 0.1 and np.mean(raw <= -2) >= 0.3
    assert np.median(smooth) >= 0 > np.median(raw)


def test_smoothed_is_a_centred_mean_that_never_changes_as_the_curve_grows():
    curve = [(0, 10.0), (10, 6.0), (20, 4.0), (30, 3.0), (40, 2.0), (50, 2.5), (60, 1.5)]
    assert smoothed(curve, 1) == curve
    assert smoothed(curve, 3) == [(0, 10.0), (10, 20 / 3), (20, 13 / 3), (30, 3.0), (40, 7.5 / 3), (50, 2.0)]
    # start: the window shrinks symmetrically (point 1 is the mean of points 0..2); end: the last 2 points wait
    assert smoothed(curve, 5) == [(0, 10.0), (10, 20 / 3), (20, 5.0), (30, 17.5 / 5), (40, 13 / 5)]
    for n, known in zip(range(1, 8), (1, 1, 2, 2, 3, 4, 5), strict=True):  # point i waits for point i + min(2, i)
        assert smoothed(curve[:n], 5) == smoothed(curve, 5)[:known]
    for bad in (0, 2, -1):
        with pytest.raises(RelearnError, match="odd number"):
            smoothed(curve, bad)


def test_first_reach_on_the_smoothed_curve():
    dip = [(0, 3.0), (10, 2.5), (20, 1.9), (30, 2.4), (40, 2.2), (50, 1.95), (60, 1.9), (70, 1.9), (80, 1.9)]
    assert first_reach(dip, 2.0, False) == 20  # the raw rule takes the single dip
    assert first_reach(dip, 2.0, False, window=3) == 60  # the mean around 50 is 2.02: not yet
    assert first_reach(dip, 2.0, False, patience=2, window=3) == 60
    assert first_reach(dip[:7], 2.0, False, window=3) is None  # 60's mean needs 70: the run goes one evaluation on
    rising = [(s, 4.0 - v) for s, v in dip]
    assert first_reach(rising, 2.0, True, window=3) == 60


def test_curve_noise_measures_the_scatter_around_the_trend():
    for noise in (0.002, 0.005):
        estimates = [curve_noise(_noisy_curve(s, 0.002, noise), 5) for s in range(50)]
        assert np.median(estimates) == pytest.approx(noise, rel=0.15)
    assert curve_noise([(0, 2.0), (10, 1.0)]) is None
    flat = [(10 * i, 1.5) for i in range(20)]
    assert curve_noise(flat) == 0.0
    assert curve_noise([(0, 2.0), *[(10 * i, math.nan) for i in range(1, 10)]]) is None


def test_reports_judge_a_run_in_the_direction_the_run_recorded():
    """A metric that falls when better but is not called a loss (an error rate under ``--greater_is_better false``):
    the report reads the direction from the result, not from the metric's name."""
    from hf_relearn.report.grid_findings import higher_is_better, steps_within

    row = {
        "recovery_metric": "eval_error_rate",
        "higher_is_better": False,
        "tolerance": 0.01,
        "recovered": False,
        "baseline_metric": 0.2,
        "steps_trained": 20,
        "curve": [[0, 0.5], [10, 0.3], [20, 0.205]],
    }
    assert not higher_is_better(row)
    assert steps_within(row, 0.05) == (20, True)  # within 5% of 0.2 from above: 0.205 <= 0.21
    legacy = {k: v for k, v in row.items() if k != "higher_is_better"}  # written before the direction was recorded
    assert higher_is_better(legacy) and steps_within(legacy, 0.05) == (0, True)
    assert not higher_is_better({**legacy, "recovery_metric": "eval_loss"})


# ------------------------------------------------------------------------------ the direction of the recovery metric
def test_greater_is_better_flips_the_direction_of_the_recovery_metric(tmp_path):
    def args(**kw):
        return RelearnArguments(output_dir=str(tmp_path), recovery_metric="perplexity_loss", **kw)

    assert args().higher_is_better is False  # from the name: a loss falls
    # --greater_is_better alone declares the direction; so it does for metric_for_best_model naming the same metric
    assert args(greater_is_better=True).higher_is_better is True
    assert args(greater_is_better=True, metric_for_best_model="perplexity_loss").higher_is_better is True
    assert args(greater_is_better=True, metric_for_best_model="eval_perplexity_loss").higher_is_better is True
    # and the other way round: a metric that rises by its name, declared lower-is-better
    rising = RelearnArguments(output_dir=str(tmp_path), recovery_metric="accuracy")
    assert rising.higher_is_better is True
    declared = RelearnArguments(output_dir=str(tmp_path), recovery_metric="accuracy", greater_is_better=False,
                                metric_for_best_model="accuracy")  # fmt: skip
    assert declared.higher_is_better is False
