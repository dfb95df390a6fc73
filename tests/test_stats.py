"""Report statistics against values worked out by hand."""

import math

from hf_relearn.stats.summary import mean_sd


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_sd([]))


def _row(base, layer, jump, steps, recovered=True, baseline=2.0):
    return dict(grid={"n_layer": 4}, trainable="block", swap=None, original_steps=1000, tolerance=0.01,
                base_id=base, layer=layer, baseline_metric=baseline,
                after_reset_metric=baseline * (1 + jump) if baseline else jump, recovered=recovered,
                steps_to_recover=steps if recovered else None, steps_trained=steps)  # fmt: skip


def test_the_report_says_whether_the_zero_shot_jump_goes_with_the_cost_within_a_base():
    from hf_relearn.report.grid_findings import jump_words

    # 4 bases x 4 layers: in every base a larger jump costs more
    ordered = [_row(f"b{b}", i, 0.01 * i + 0.001 * b, 100 * i + 50 + b) for b in range(4) for i in range(1, 5)]
    (words,) = jump_words(ordered)
    assert "a larger jump went with a higher cost in 4 of 4 bases, less in 0" in words
    assert "(sign test over bases, p = 0.125; the smallest p this design allows is 0.125)" in words
    # reset seeds that repeat each run change nothing: the base is the unit
    assert jump_words(ordered * 3) == [words]
    # in two bases the order is reversed: 2 of 4
    mixed = ordered[:8] + [_row(f"b{b}", i, 0.01 * i, 1000 - 100 * i) for b in (2, 3) for i in range(1, 5)]
    assert "higher cost in 2 of 4 bases, less in 2" in jump_words(mixed)[0]
    # a run not back is dearer than those back before the steps it trained, undecided against the others
    censored = ordered[:-1] + [_row("b3", 4, 0.045, 3000, recovered=False)]
    assert "higher cost in 4 of 4 bases" in jump_words(censored)[0]
    # distill (intact loss 0) ranks the absolute jump; two bases are too few to test
    distill = [_row(f"b{b}", i, 0.01 * i, 100 * i, baseline=0.0) for b in range(2) for i in range(1, 5)]
    assert "in 2 of 2 bases (too few to test)" in jump_words(distill)[0]
    assert jump_words(ordered[:2]) == []  # too few distinct jumps
