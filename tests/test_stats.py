"""Report statistics against values worked out by hand."""

import math

import pytest

from hf_relearn.stats import bootstrap_mean_interval, mean_sd, permutation_difference, rank_correlation, spearman


def test_spearman_with_ties_matches_the_hand_computed_value():
    # ranks of y with a tie: [1, 2, 3.5, 5, 3.5]; rho = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))  # a constant side has no ranks to correlate
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_rank_correlation_p_value_separates_order_from_noise():
    strong = rank_correlation(list(range(12)), [2 * i + (i % 2) for i in range(12)])
    assert strong.rho == pytest.approx(1.0) and strong.p_value < 0.001 and strong.low > 0.9
    # 4 points, perfectly ordered: only 2 of the 24 orders reach |rho| = 1, so p is about 1/12, not small
    few = rank_correlation([0, 1, 2, 3], [1, 2, 3, 4])
    assert few.p_value == pytest.approx(2 / 24, abs=0.02)
    noise = rank_correlation(list(range(12)), [5, 1, 9, 3, 11, 0, 7, 2, 10, 4, 8, 6])
    assert noise.p_value > 0.2 and noise.low < 0 < noise.high
    assert "rho = " in str(strong) and str(rank_correlation([1, 2], [3, 4])) == "rho n/a (n=2)"
    assert rank_correlation([0, 1, 2, 3, 4], [1, 3, 2, 5, 4]) == rank_correlation([0, 1, 2, 3, 4], [1, 3, 2, 5, 4])


def test_mean_sd_and_bootstrap_interval():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_sd([]))
    low, high = bootstrap_mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 < low < 3.0 < high < 5.0
    assert all(math.isnan(v) for v in bootstrap_mean_interval([1.0]))


def test_permutation_difference():

    # 4 vs 4 perfectly separated: 2 of the 70 splits are as extreme, so p is about 2/70
    assert permutation_difference([10, 11, 12, 13], [1, 2, 3, 4]) == pytest.approx(2 / 70, abs=0.01)
    assert permutation_difference([1, 5, 2, 6], [5, 1, 6, 2]) > 0.9  # the same values: no difference at all
    assert math.isnan(permutation_difference([], [1.0]))


def test_the_report_says_whether_the_zero_shot_jump_predicts_the_cost():
    from hf_relearn.grid_findings import jump_words

    def row(jump, steps, recovered=True, base=2.0):
        return dict(grid={"n_layer": 4}, trainable="block", swap=None, original_steps=1000, tolerance=0.01,
                    baseline_metric=base, after_reset_metric=base * (1 + jump) if base else jump, recovered=recovered,
                    steps_to_recover=steps if recovered else None, steps_trained=steps)  # fmt: skip

    ordered = [row(0.01 * i, 100 * i + 50) for i in range(1, 9)]
    (words,) = jump_words(ordered)
    assert "rho = +1.00" in words and words.endswith("a larger jump costs more.") and "unrecovered" not in words
    shuffled = [row(0.01 * i, s) for i, s in zip(range(1, 9), [500, 200, 800, 100, 700, 300, 600, 400], strict=True)]
    assert jump_words(shuffled)[0].endswith("no significant relation.")
    # unrecovered runs enter at their lower bound (the steps they trained) and are counted; distill (baseline 0)
    # ranks the absolute jump
    censored = ordered[:-1] + [row(0.08, 3000, recovered=False)]
    assert "(1 unrecovered runs enter at their lower bound)" in jump_words(censored)[0]
    distill = [row(0.01 * i, 100 * i, base=0.0) for i in range(1, 9)]
    assert "rho = +1.00" in jump_words(distill)[0]
    assert jump_words(ordered[:2]) == []  # too few distinct jumps to rank
