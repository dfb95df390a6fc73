"""Censored costs and tests that count bases, against cases worked out by hand."""

import math

import pytest

from hf_relearn.stats.survival import Outcome, compare, gehan_scores, paired, per_base, ratio, summarise, trend


def _o(cost, recovered=True, base="a"):
    return Outcome(cost, recovered, base)


def test_kaplan_meier_median_and_restricted_mean_by_hand():
    # 0.1 and 0.2 recovered, 0.3 censored, 0.4 recovered, 0.5 censored:
    # S = 4/5 after 0.1, 0.8 * 3/4 = 0.6 after 0.2, (0.3 leaves the risk set: 2 left) 0.6 * 1/2 = 0.3 after 0.4
    runs = [_o(0.1, base="a"), _o(0.2, base="b"), _o(0.3, False, "c"), _o(0.4, base="d"), _o(0.5, False, "e")]
    s = summarise(runs)
    assert (s.runs, s.recovered, s.bases) == (5, 3, 5)
    assert s.median == pytest.approx(0.4)  # the first cost at which S falls to 0.5 or below
    # the horizon: the shortest cap of a run not back (0.3); the area under S up to it, 0.1 x 1 + 0.1 x 0.8 + 0.1 x 0.6
    assert s.horizon == 0.3 and s.restricted_mean == pytest.approx(0.24)
    # to 0.5: + 0.1 x 0.6 (0.3 to 0.4) + 0.1 x 0.3 (0.4 to 0.5) = 0.33
    assert summarise(runs, horizon=0.5).restricted_mean == pytest.approx(0.33)
    assert s.followed == 0.5 and "3/5 back (5 bases); median 40.0%" in str(s)
    # fewer than half back: the median is not reached, and the words say within what
    never = summarise([_o(0.3, False), _o(0.3, False), _o(0.1)])
    assert math.isinf(never.median) and "median not reached within 30.0%" in str(never)


def test_a_capped_run_never_counts_as_a_cost():
    # two runs back at 10% and one capped at 20%: a mean would say 13.3%; Kaplan-Meier says the median is 20%+
    s = summarise([_o(0.1, base="a"), _o(0.1, base="b"), _o(0.2, False, "c")])
    assert s.median == pytest.approx(0.1) and s.recovered == 2
    capped_late = summarise([_o(0.1, base="a"), _o(0.9, False, "b"), _o(0.9, False, "c")])
    assert math.isinf(capped_late.median)


def test_gehan_scores_order_only_what_is_certain():
    a, b, c, d = _o(0.1), _o(0.2), _o(0.15, False), _o(0.3, False)
    # a is certainly cheaper than everyone; c (censored at 0.15) is dearer than a, undecided against b and d
    assert gehan_scores([a, b, c, d]).tolist() == [-3, 0, 1, 2]


def test_a_base_is_one_outcome():
    runs = [_o(0.1, base="x"), _o(0.3, base="x"), _o(0.2, base="x"), _o(0.5, False, "y"), _o(0.4, False, "y")]
    assert per_base(runs) == [Outcome(0.2, True, "x"), Outcome(0.5, False, "y")]
    # repeating every run (extra reset seeds with the same numbers) changes nothing
    assert per_base(runs * 4) == per_base(runs)


def test_tests_count_bases_and_say_what_the_design_allows():
    dear = [_o(0.5 + 0.1 * i, base=f"d{i}") for i in range(3)]
    cheap = [_o(0.1 + 0.01 * i, base=f"c{i}") for i in range(3)]
    test = compare(dear, cheap)
    # 3 vs 3 bases, perfectly separated: 2 of the 20 splits are as extreme, so p = 0.1, and nothing smaller exists
    assert test.bases == (3, 3) and test.p == pytest.approx(0.1) and test.min_p == pytest.approx(0.1)
    assert not test.significant and "3 vs 3 bases; the smallest p this design allows is 0.1" in str(test)
    # repeating every run 5 times (reset seeds that add no information) leaves the p-value where it was
    assert compare(dear * 5, cheap * 5) == test
    assert compare(dear[:2], cheap) is None  # 2 bases a side: described, not tested
    pairs = [(d, c) for d, c in zip(dear, cheap, strict=True)]
    assert paired(pairs)[:3] == (3, 0, 0) and paired(pairs)[3].p == pytest.approx(0.25)
    six = [(d, c) for d, c in zip(dear * 2, cheap * 2, strict=True)]
    six = [(Outcome(d.cost, d.recovered, f"{d.base}{i}"), c) for i, (d, c) in enumerate(six)]
    assert paired(six)[3].p == pytest.approx(2 / 64) and paired(six)[3].min_p == pytest.approx(2 / 64)


def test_a_trend_over_three_values_of_three_bases():
    values = [2, 2, 2, 4, 4, 4, 8, 8, 8]
    costs = [0.40, 0.45, 0.50, 0.20, 0.22, 0.25, 0.10, 0.11, 0.12]
    outcomes = [_o(c, base=f"b{i}") for i, c in enumerate(costs)]
    rho, test = trend(values, outcomes)
    assert rho == pytest.approx(-1.0 * 0.9486832980505138)  # ties in the values: Spearman with average ranks
    assert test.p < 0.01 and test.bases == (3, 3, 3) and test.min_p <= test.p
    fitted = ratio(values, outcomes)
    assert 0.4 < fitted.ratio < 0.6 and fitted.low < fitted.ratio < fitted.high  # about halved per doubling
    assert trend(values[:6], outcomes[:6]) is not None and trend(values[:5], outcomes[:5]) is None


def test_reset_seeds_that_repeat_a_run_change_no_p_value_of_a_rebuilt_report(tmp_path):
    """decoder-grid's published results.csv, and the same with 4 more reset seeds per run that repeat its numbers
    (no new information): every p-value of the rebuilt report is the same."""
    import json
    import re
    import shutil
    from pathlib import Path

    from hf_relearn.report.build import build_report
    from hf_relearn.storage import read_results, write_results
    from hf_relearn.study.rows import STUDY_COLUMNS

    published = Path(__file__).resolve().parents[1] / "docs" / "results" / "decoder-grid"
    reports = []
    for copies in (1, 5):
        folder = tmp_path / f"x{copies}"
        folder.mkdir()
        shutil.copy(published / "recipe.yaml", folder / "recipe.yaml")
        rows = read_results(published / "results.csv")
        encoded = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
        repeated = [
            {**r, "seed": r["seed"] + 100 * k, "run_id": f"{r['run_id']}-copy{k}"}
            for r in encoded
            for k in range(copies)
        ]
        write_results(folder / "results.csv", repeated, STUDY_COLUMNS)
        reports.append(build_report(folder)["report"].read_text())
    p_values = [re.findall(r"p (?:=|<) \d\.\d+", text) for text in reports]
    assert len(p_values[0]) > 20 and p_values[0] == p_values[1]
