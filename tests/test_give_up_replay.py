"""The give-up replay behind README's "no run gives up early" and docs/results/README.md's table: its rules on
curves built by hand (so the answer is known), its counting, and the numbers the docs quote, recomputed from the
published results.csv files."""

import json
from pathlib import Path

import pytest

from hf_relearn.cli.main import main as cli
from hf_relearn.report import analyses as replay_mod

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = sorted((ROOT / "docs" / "results").glob("*/results.csv"))

THRESHOLD = 2.02  # baseline 2.0, within 1%


def _falling(steps: int, start: float, per_step: float) -> list[tuple[int, float]]:
    return [(s, start - per_step * s) for s in range(10, steps + 1, 10)]


def test_pace_rule_gives_up_only_where_the_recent_pace_misses_the_threshold_by_the_cap():
    flat = [(s, 2.5) for s in range(10, 210, 10)]  # no progress at all
    assert replay_mod.pace_gives_up(flat, THRESHOLD, False, 1000, 6, 0.25, 1)
    reaching = _falling(200, 2.5, 0.001)  # at step 200: 2.3, 0.28 above the threshold, falling 0.001 a step
    assert not replay_mod.pace_gives_up(reaching, THRESHOLD, False, 1000, 6, 0.25, 1)  # 0.8 to come by step 1000
    assert replay_mod.pace_gives_up(reaching, THRESHOLD, False, 300, 6, 0.25, 1)  # only 0.1 to come by step 300
    # a margin M gives up only when even M times the projected progress would miss: 0.4 > 0.28 by step 300
    assert not replay_mod.pace_gives_up(reaching, THRESHOLD, False, 300, 6, 0.25, 4)
    # too few evaluations for a stretch: never
    assert not replay_mod.pace_gives_up(flat[:6], THRESHOLD, False, 1000, 6, 0.25, 1)
    # higher is better: the mirror image
    mirrored = [(s, -v) for s, v in flat]
    assert replay_mod.pace_gives_up(mirrored, -THRESHOLD, True, 1000, 6, 0.25, 1)
    assert not replay_mod.pace_gives_up([(s, -v) for s, v in reaching], -THRESHOLD, True, 1000, 6, 0.25, 1)


def test_plateau_rule_counts_evaluations_without_a_new_best():
    curve = [(10, 3.0), (20, 2.6), (30, 2.7), (40, 2.65), (50, 2.6)]  # best 2.6 at step 20, not beaten since
    assert replay_mod.plateau_gives_up(curve, THRESHOLD, False, 1000, 3)
    assert not replay_mod.plateau_gives_up(curve, THRESHOLD, False, 1000, 4)  # step 10 is 4 back: 2.6 beat it
    assert not replay_mod.plateau_gives_up(curve + [(60, 2.55)], THRESHOLD, False, 1000, 3)


def _run(curve, recovered_at=None, cap=1000) -> dict:
    return {
        "study": "hand", "run": f"r{len(curve)}-{recovered_at}", "recovered": recovered_at is not None,
        "steps_to_recover": recovered_at, "steps_trained": recovered_at or cap, "threshold": THRESHOLD,
        "higher": False, "cap": cap, "curve": curve,
    }  # fmt: skip


def test_replay_counts_a_stalled_run_that_recovered_later_as_a_false_give_up_and_saved_steps_on_the_others():
    # stalls at 2.5 for 40 evaluations, then falls to the threshold at step 600: the rule stops it at step 160
    stalled = [(s, 2.5) for s in range(10, 410, 10)] + [(s, 2.5 - 0.0024 * (s - 400)) for s in range(410, 610, 10)]
    assert stalled[-1][1] <= THRESHOLD
    never = [(s, 2.5) for s in range(10, 1010, 10)]  # never recovers: the rule stops it at step 160 too
    rule = lambda c, t, h, cap: replay_mod.plateau_gives_up(c, t, h, cap, 15)  # noqa: E731
    result = replay_mod.replay([_run(stalled, recovered_at=600), _run(never)], rule)
    assert result["false_give_ups"] == 1
    assert "stopped at 160, recovered at 600" in result["false_runs"][0]
    assert result["saved_share_of_unrecovered_steps"] == pytest.approx((1000 - 160) / 1000)
    # a run that recovered at step 300 and trained on (stop_at_recovery false), flat from there: what the rule does
    # after the recovery is no give-up
    trained_on = _run(_falling(300, 2.32, 0.001) + [(s, 2.02) for s in range(310, 1010, 10)], recovered_at=300)
    assert replay_mod.replay([trained_on], rule)["false_give_ups"] == 0
    # a rule that never fires: nothing saved, nothing lost
    calm = replay_mod.replay([_run(stalled, recovered_at=600), _run(never)], lambda *a: False)
    assert calm["false_give_ups"] == 0 and calm["saved_share_of_unrecovered_steps"] == 0.0


def test_the_numbers_the_docs_quote_come_from_the_published_curves():
    runs = replay_mod.distinct_runs(PUBLISHED)
    recovered = [r for r in runs if r["recovered"]]
    unrecovered_steps = sum(r["steps_trained"] for r in runs if not r["recovered"])
    assert (len(runs), len(recovered)) == (403, 98)
    assert round(100 * unrecovered_steps / sum(r["steps_trained"] for r in runs)) == 85
    quoted = {  # docs/results/README.md's table: (recovered runs stopped, % of unrecovered steps saved)
        (6, 0.25, 1): (46, 62),
        (12, 0.5, 1): (7, 43),
        (12, 0.5, 8): (3, 11),
    }
    for (p, w, m), (stopped, saved) in quoted.items():
        got = replay_mod.replay(
            runs, lambda c, t, h, cap, p=p, w=w, m=m: replay_mod.pace_gives_up(c, t, h, cap, p, w, m)
        )
        assert (got["false_give_ups"], round(100 * got["saved_share_of_unrecovered_steps"])) == (stopped, saved)
    for p, (stopped, saved) in {20: (9, 9), 50: (1, 1)}.items():
        got = replay_mod.replay(runs, lambda c, t, h, cap, p=p: replay_mod.plateau_gives_up(c, t, h, cap, p))
        assert (got["false_give_ups"], round(100 * got["saved_share_of_unrecovered_steps"])) == (stopped, saved)
    # the stalled run the docs name: the demo's last layer at 1e-2, seed 1, no new best for 50 evaluations
    plateau50 = replay_mod.replay(runs, lambda c, t, h, cap: replay_mod.plateau_gives_up(c, t, h, cap, 50))
    assert plateau50["false_runs"] == [
        "demo-lr-check:seed1/decoder.3-scratch-block@lr-1e-2-r1 (stopped at 790, recovered at 1480)"
    ]


def test_the_jump_and_cost_numbers_the_docs_quote_come_from_the_published_studies():
    for tolerance, (up, down, none) in {None: (16, 5, 4), 0.05: (25, 0, 0)}.items():
        found = replay_mod.jump_cost_bases(PUBLISHED, tolerance)
        got = (sum(s["rho"] > 0 for s in found), sum(s["rho"] < 0 for s in found), sum(s["rho"] == 0 for s in found))
        assert got == (up, down, none)
    # a base re-used by another study counts once, and every entry is one base with 3 or more reset layers
    assert len({(s["study"], s["base"]) for s in found}) == len(found) and min(s["layers"] for s in found) >= 3


def test_analyze_plateau_reads_where_the_unrecovered_runs_of_a_published_study_ended(capsys, tmp_path):
    """``hf-relearn analyze plateau STUDY``: the numbers docs/results/README.md quotes for the N=8 last layer (1.11 to
    1.53% above the intact loss, every slope's 95% interval including 0), and one clear error for a missing file."""
    study = ROOT / "docs" / "results" / "wiped-layer-long-n8"
    out = tmp_path / "plateau.json"
    assert cli(["analyze", "plateau", str(study), "--json", str(out)]) == 0
    assert "| n_layer=8-seed1 | decoder.7 | 17100 (150%) | +1.11% |" in capsys.readouterr().out
    (runs,) = json.loads(out.read_text()).values()
    last = [r for r in runs["runs"] if r["block"] == "decoder.7"]
    assert sorted(round(r["end_above_baseline_pct"], 2) for r in last) == [1.11, 1.33, 1.53]
    assert all(low < 0 < high for low, high in (r["slope_ci_pct_per_1k"] for r in last))
    assert cli(["analyze", "plateau", str(tmp_path / "missing.csv")]) == 2
    assert "no such results file" in capsys.readouterr().err
