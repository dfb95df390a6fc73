"""The swap study's causes in words (hf_relearn.report.swap_findings): which arm is cheaper, and the report built from the
published swap study's real results.csv saying what separates the arms."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from hf_relearn.report.build import build_report
from hf_relearn.report.swap_findings import compare, mismatch_words, noise_words

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results" / "swap-encoder-t5"


def arm(cost, recovered=3, runs=3, final=1.0, baseline=1.0, trained=None, block="swap:x", name_arm="a"):
    """A summary as findings.summarise makes it, with only the fields the comparison reads: ``recovered`` runs back
    at ``cost`` steps, the others not back after ``trained`` (default ``cost``) steps."""
    stopped = cost if trained is None else trained
    return {
        "run_costs": [(cost, True, 10_000)] * recovered + [(stopped, False, 10_000)] * (runs - recovered),
        "recovered": recovered,
        "runs": runs,
        "censored": recovered < runs,
        "steps_trained": stopped,
        "final_loss": final,
        "baseline": baseline,
        "block": block,
        "arm": name_arm,
        "swap": block.removeprefix("swap:") if block.startswith("swap:") else None,
        "old_width": 32,
        "swap_width": 32,
    }


def test_recovered_beats_a_run_that_had_not_after_more_steps():
    assert compare(arm(500), arm(3000, recovered=0, final=1.2)) == -1
    assert compare(arm(3000, recovered=0, final=1.2), arm(500)) == 1


def test_a_lower_bound_below_the_other_cost_decides_nothing():
    # stopped unrecovered at 400 steps: it might still need fewer or more than 500
    assert compare(arm(400, recovered=0, final=1.2), arm(500)) == 0


def test_an_arm_is_its_median_never_an_average_with_its_caps():
    # 2 of 3 back at 500 steps, one not back at its 3000-step cap: the median is 500. Averaging the cap in (1,333
    # steps, "at least") made it dearer than an arm that came back at 1,000 every time.
    mostly = arm(500, recovered=2, trained=3000)
    assert compare(mostly, arm(1000)) == -1
    # 1 of 3 back: the median is not reached within 3000 steps, a lower bound that is past 1000
    assert compare(arm(500, recovered=1, trained=3000), arm(1000)) == 1


def test_two_arms_not_back_are_not_a_ratio(published):
    """The trained-donor swap study: every swap arm and the one-layer wipe stopped at the cap. Neither median was
    reached, so no ratio between them is stated (a cap divided by a cap said "at least 1.0x")."""
    from hf_relearn.report.findings import summarise
    from hf_relearn.report.swap_findings import swap_answer
    from hf_relearn.storage import read_results

    words = " ".join(swap_answer(summarise(read_results(PUBLISHED.parent / "swap-encoder-trained" / "results.csv"))))
    assert "x the steps of the one-layer wipe" not in words
    assert words.count("undecided against the steps of the one-layer wipe (neither median reached)") == 3
    assert "had not recovered when it stopped at 3000 steps" in words


def test_costs_within_ten_percent_are_undecided():
    assert compare(arm(950), arm(1000)) == 0
    assert compare(arm(800), arm(1000)) == -1


def test_two_unrecovered_arms_compare_by_where_they_ended():
    a = arm(3000, recovered=0, final=1.05)
    b = arm(3000, recovered=0, final=1.20)
    assert compare(a, b) == -1 and compare(b, a) == 1
    # 1.20 vs 1.19: within 10% of the larger excess (0.2)
    assert compare(arm(3000, recovered=0, final=1.19), b) == 0
    # different step counts: not comparable by the end loss
    assert compare(arm(2000, recovered=0, final=1.05), b) == 0


def test_mismatch_words_blame_the_encoder_only_when_every_swap_is_dearer():
    own = arm(300, block="decoder.*.cross_attention", name_arm="block")
    dear = arm(3000, recovered=0, final=1.1, block="swap:same", name_arm="reset, decoder-except-cross")
    cheap = arm(250, block="swap:wide", name_arm="reset, decoder-except-cross")
    assert "the extra cost is the encoder's" in mismatch_words([own, dear])[0]
    assert "no mismatch shows" in mismatch_words([own, cheap])[0]
    mixed = mismatch_words([own, dear, cheap])[0]
    assert "Own encoder cheaper than 1 of 2 swaps" in mixed and "extra cost" not in mixed


def test_noise_words_count_zero_against_reset_per_encoder():
    rows = [
        arm(3000, recovered=0, final=1.30, block="swap:a", name_arm="reset, all-trainable"),
        arm(3000, recovered=0, final=1.10, block="swap:a", name_arm="zero, all-trainable"),
        arm(3000, recovered=0, final=1.05, block="swap:a", name_arm="reset, decoder-except-cross"),
    ]
    words = noise_words(rows)
    assert any(
        "everything trainable): the zeroed one was cheaper for 1 of 1 encoders, the reset one for 0" in w
        for w in words
    )
    assert any("frozen was cheaper for 1 of 1" in w and "costs extra" in w for w in words)


@pytest.fixture
def published(tmp_path):
    if not (PUBLISHED / "results.csv").exists():
        pytest.skip("the published swap study is not in this checkout")
    study = tmp_path / "swap"
    shutil.copytree(PUBLISHED, study)
    return study


def test_the_published_swap_study_reports_the_mismatch_its_numbers_show(published):
    """Real rows (docs/results/swap-encoder-t5): the base's own cross-attention wipe recovered in 300 and 320 steps
    (Kaplan-Meier median 300); every swapped encoder with only the cross-attention trainable stopped unrecovered at 500."""
    out = build_report(published)
    line = next(w for w in out["answer"] if "Representation mismatch" in w)
    assert "with the base's own encoder, recovered in a median 300 steps (2/2 seeds)" in line
    assert line.count("not recovered in 500 steps") == 3
    assert "the extra cost is the encoder's" in line
    report = (published / "report.md").read_text()
    assert "a new encoder built from config (fresh weights)" in report
    assert "trained encoder taken from a donor" not in report


def test_a_study_of_trained_donors_says_where_its_encoders_came_from(published):
    path = published / "results.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["swap"]:
            r["swap_encoder"] = f"study-base:donor-{r['swap']}-seed1000"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_report(published)
    report = (published / "report.md").read_text()
    assert "a trained encoder taken from a donor model the study trained" in report
    assert "fresh weights" not in report


def test_the_arms_plot_draws_the_loss_left_when_nothing_recovered(published):
    """Every bar at the cap says nothing: where no run recovered, the arms plot draws how far above the intact
    loss each arm ended; where some did, steps to recover with lower bounds marked."""
    from hf_relearn.report.findings import summarise
    from hf_relearn.report.plots import arm_bars
    from hf_relearn.storage import read_results

    summary = summarise(read_results(published / "results.csv"))
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    blocks, values, bounds, label = arm_bars(summary, arms, "{}")
    # some runs of the published swap study recovered (the cross-attention wipes): steps, lower bounds hatched
    assert label.startswith("steps to recover") and any(any(b) for b in bounds)
    none = [s for s in summary if s["recovered"] == 0]
    blocks, values, bounds, label = arm_bars(none, arms, "{}")
    assert label.startswith("% above the intact loss") and not any(any(b) for b in bounds)
    first = next(s for s in none if s["block"] == blocks[0])
    j = arms.index(first["arm"])
    assert values[j][0] == pytest.approx(100 * (first["final_loss"] / first["baseline"] - 1))


def test_the_arms_plot_compares_the_arms_where_they_ran():
    """The decoder grid ran `all` and `lora-rest` only at N=4, D=64: that is the grid point its arms plot shows."""
    from hf_relearn.report.findings import summarise
    from hf_relearn.report.plots import arms_grid
    from hf_relearn.storage import read_results
    from hf_relearn.study.grid import grid_of

    path = PUBLISHED.parent / "decoder-grid" / "results.csv"
    if not path.exists():
        pytest.skip("the published decoder grid is not in this checkout")
    rows = read_results(path)
    grids = list(dict.fromkeys(grid_of(r) for r in rows))
    assert arms_grid(summarise(rows), grids) == {"n_embd": 64, "n_layer": 4}


def test_the_arms_plot_of_a_distill_study_draws_the_damage_left():
    """A distill run's intact loss is 0 (the teacher is the model itself): "% above" it is undefined (the arms plot
    of minilm-lr-check divided by it), so the plot draws the share of the reset's damage each arm left."""
    from hf_relearn.report.findings import summarise
    from hf_relearn.report.plots import arm_bars
    from hf_relearn.storage import read_results

    rows = read_results(Path(__file__).resolve().parents[1] / "docs" / "results" / "minilm-distill" / "results.csv")
    twin = [{**r, "run_id": r["run_id"] + "-twin", "trainable": "all"} for r in rows]  # a second arm: the same runs
    summary = summarise(rows + twin)
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    assert len(arms) == 2
    blocks, values, bounds, label = arm_bars(summary, arms, "{}")
    assert label.startswith("% of the reset's damage left")
    last = next(s for s in summary if s["block"] == "encoder.5")
    expected = 100 * last["final_loss"] / last["after"]  # the intact loss is 0
    assert values[0][blocks.index("encoder.5")] == pytest.approx(expected)
    assert 75 < expected < 85  # 300 steps repaired about 20% of the last layer's damage (docs/results/README.md)
