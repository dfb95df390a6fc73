"""The study report's answer in words, its tables, its warnings at the top and its plots (hf_relearn.report.findings,
grid_findings, report, study_plots), on rows built by hand so the answer is known: depth N, width D and the arms
(with the 2% / 5% fallback where runs miss the tolerance), the position of the reset layer, the stacks of an
encoder-decoder, an under-trained base and a reset that barely mattered flagged above the first section."""

import json
from pathlib import Path

from test_convergence import TOTAL

import hf_relearn
import hf_relearn.report.plots
from hf_relearn.relearn.result import base_run_warnings
from hf_relearn.report.build import build_report
from hf_relearn.report.findings import answer_in_words, summarise
from hf_relearn.report.grid_findings import depth_width_words, grid_table
from hf_relearn.stats.caveats import RESET_BARELY_MATTERED, UNDER_TRAINED
from hf_relearn.storage import RESULTS, read_results, write_results

# ------------------------------------------------------------------------------------------------ rows built by hand
ROOT = Path(__file__).resolve().parents[1]
# a real row of a published study: every column a results.csv has; each test overrides what it is about
TEMPLATE = read_results(ROOT / "docs" / "results" / "demo-stdlib-gpt2" / "results.csv")[0]
SEED_SPREAD = (0.9, 1.0, 1.1)  # seeds 0, 1, 2 cost 0.9x, 1x and 1.1x their grid point's cost
BUDGET = 1000  # every base's budget (original_steps)


def _run(n_layer, n_embd, layer, seed, steps, *, trainable="block", trained=None, curve=None) -> dict:
    """One relearn row (baseline loss 2.0, 3.0 after the reset): recovered at ``steps`` to within 1%, or, with
    ``trained``, never within 1% in its ``trained`` steps."""
    grid = {"n_layer": n_layer, "n_embd": n_embd}
    base_id = f"n_layer={n_layer}_n_embd={n_embd}-seed{seed}"
    recovered = trained is None
    return {
        **TEMPLATE,
        "grid": grid,
        "base_id": base_id,
        "base_seed": seed,
        "seed": seed,
        "run_id": f"{base_id}/decoder.{layer}-scratch-{trainable}-r{seed}",
        "n_layers": n_layer,
        "layer": layer,
        "relative_depth": layer / (n_layer - 1),
        "block": f"decoder.{layer}",
        "trainable": trainable,
        "original_steps": BUDGET,
        "recovered": recovered,
        "steps_to_recover": steps if recovered else None,
        "steps_trained": steps if recovered else trained,
        "fraction_of_original": steps / BUDGET if recovered else None,
        "baseline_eval_loss": 2.0,
        "baseline_metric": 2.0,
        "after_reset_eval_loss": 3.0,
        "after_reset_metric": 3.0,
        "curve": curve or [[0, 3.0], [steps, 2.0]],
    }


def _encoded(row: dict) -> dict:
    """A row as the study writes it to results.csv (lists and dicts as JSON)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}


def _report(tmp_path, rows: list[dict]) -> str:
    write_results(tmp_path / RESULTS, [_encoded(r) for r in rows], list(TEMPLATE))
    return build_report(tmp_path)["report"].read_text()


# -------------------------------------------------------------------------------------------------- depth N, width D
def _grid_rows() -> list[dict]:
    """N in {2, 4} x D in {32, 64}, every layer, 3 seeds: a reset layer costs 5% of the budget per layer of depth
    (10% at N=2, 20% at N=4), whatever the width."""
    return [
        _run(n, d, layer, seed, round(50 * n * spread))
        for n in (2, 4)
        for d in (32, 64)
        for layer in range(n)
        for seed, spread in enumerate(SEED_SPREAD)
    ]


def test_the_report_says_depth_doubles_the_cost_at_each_width_and_width_changes_nothing():
    words = depth_width_words(_grid_rows())
    depth = [w for w in words if w.startswith("Depth N")]
    width = [w for w in words if w.startswith("Width D")]
    # per position class (the middle one exists at N=4 only, so depth compares first and last layers): 3 bases a
    # depth, costs 9/10/11% at N=2 and 18/20/22% at N=4, so the medians are 10% and 20%
    assert [w.split(" (arm")[0] for w in depth] == [
        f"Depth N at n_embd={d}, {where} layer" for d in (32, 64) for where in ("first", "last")
    ]
    for w in depth:
        assert (
            "n_layer=2: 3/3 back (3 bases); median 10.0%" in w and "n_layer=4: 3/3 back (3 bases); median 20.0%" in w
        )
        # perfectly separated, but 3 bases against 3 cannot reach p < 0.05: the words say so, and give the ratio
        assert (
            "no effect detected (yet every base was as far apart as this design can show: more bases are needed" in w
        )
        assert "a Weibull fit on the per-base costs (a model, not the test) gives 2.00x (95% CI 1.79x to 2.24x" in w
        assert "p = 0.100" in w and "3 vs 3 bases; the smallest p this design allows is 0.1)" in w
    assert len(width) == 5  # first and last at N=2; first, middle and last at N=4
    assert all("no effect detected; a Weibull fit on the per-base costs (a model, not the test) gives 1.00x" in w and "p = 1.000" in w for w in width)  # fmt: skip
    assert "does not matter" not in " ".join(words)
    assert not any("to within" in w for w in words)  # every run reached 1%: no looser tolerance is stated


def _looser_rows() -> list[dict]:
    """N in {2, 4} at D=32: no run gets back within 1% (2.025 > 2.02 at the end of its 500 steps), but every run's
    curve passes 5% (2.10) at 2.5% of the budget per layer of depth and 2% (2.04) at 5% per layer; the `all` arm
    gets there in 0.4x the steps of the block arm."""
    rows = []
    for n in (2, 4):
        for layer in range(n):
            for seed, spread in enumerate(SEED_SPREAD):
                for arm, share in (("block", 1.0), ("all", 0.4)):
                    to5, to2 = round(25 * n * spread * share), round(50 * n * spread * share)
                    curve = [[0, 3.0], [to5, 2.09], [to2, 2.03], [500, 2.025]]
                    rows.append(_run(n, 32, layer, seed, None, trained=500, curve=curve, trainable=arm))
    return rows


def test_where_runs_never_reach_the_tolerance_the_report_also_answers_at_2_and_5_percent():
    rows = _looser_rows()
    depth = [w for w in depth_width_words(rows) if w.startswith("Depth N")]
    # at 1% every run is censored at the 500 steps it trained: no cost is a value, nothing is compared
    assert [w.split(": n_layer=2")[0] for w in depth] == [
        f"Depth N at n_embd=32, {where} layer (arm block{within})"
        for within in ("", ", to within 2%", ", to within 5%")
        for where in ("first", "last")
    ]
    assert all(
        w.endswith("no run came back: nothing to compare, only that every cost is above its cap.") for w in depth[:2]
    )
    assert all("0/3 back (3 bases); median not reached within 50.0%" in w for w in depth[:2])
    for w, (two, four) in zip(depth[2:], [("10.0", "20.0")] * 2 + [("5.0", "10.0")] * 2, strict=True):
        assert (
            f"n_layer=2: 3/3 back (3 bases); median {two}%" in w
            and f"n_layer=4: 3/3 back (3 bases); median {four}%" in w
        )
        assert "gives 2.00x" in w
    # the table: per position class, the Kaplan-Meier median and runs back, at 1% and at the looser tolerances
    table = grid_table(rows).splitlines()
    assert "| first to its tolerance | middle to its tolerance | last to its tolerance | first to 2% |" in table[0]
    cells = {
        tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[5:16]]
        for line in table[2:]
    }
    never = "not reached (≥50.0%) (0/3)"
    assert cells[("n_embd=32, n_layer=2", "block")] == [
        "6",
        "0",
        never,
        "—",
        never,
        "10.0% (3/3)",
        "—",
        "10.0% (3/3)",
        "5.0% (3/3)",
        "—",
        "5.0% (3/3)",
    ]
    assert cells[("n_embd=32, n_layer=4", "all")] == ["12", "0", never, "not reached (≥50.0%) (0/6)", never, "8.0% (3/3)", "8.0% (6/6)", "8.0% (3/3)", "4.0% (3/3)", "4.0% (6/6)", "4.0% (3/3)"]  # fmt: skip


def test_a_grid_reports_its_grid_points_and_names_the_grid_point_of_each_unrecovered_block(tmp_path):
    """A grid's header names the grid, not only the first grid point; the unrecovered blocks say where they ran."""
    rows = [{**r, "base_model": f"gpt2 (n_layer={r['grid']['n_layer']},n_embd=32)"} for r in _looser_rows()]
    report = _report(tmp_path, rows)
    assert report.splitlines()[2] == (
        "Base models: 2 grid points, n_layer in {2, 4} x n_embd in {32}; the first is gpt2 (n_layer=2,n_embd=32)."
    )
    unrecovered = next(line for line in report.splitlines() if "Not every run recovered" in line)
    assert "decoder.0 [block] at (n_embd=32, n_layer=2) 3 of 3 unrecovered; " in unrecovered
    assert "decoder.3 [all] at (n_embd=32, n_layer=4) 3 of 3 unrecovered" in unrecovered


def test_an_encoder_decoders_stacks_are_compared_apart():
    """Layer 0 of an encoder is not layer 0 of the decoder: the position table has a line per stack."""
    rows = []
    for stack, steps in (("encoder", 100), ("decoder", 300)):
        for layer in range(2):
            for seed in range(3):
                row = _run(2, 32, layer, seed, steps * (1 + layer))
                rows.append({**row, "stack": stack, "block": f"{stack}.{layer}", "grid": {}})
    table = grid_table(rows).splitlines()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[7:10]] for line in table[2:]}
    assert cells == {
        "stack=encoder": ["10.0% (3/3)", "—", "20.0% (3/3)"],
        "stack=decoder": ["30.0% (3/3)", "—", "60.0% (3/3)"],
    }


# ---------------------------------------------------------------------------------------------------------- the arms
def test_the_arms_are_compared_where_both_ran():
    """The `all` arm ran only at N=4, D=64 (arms_at) and needed half the block's steps there; the block runs at N=2,
    which have no `all` run beside them, stay out of the comparison."""
    rows = [_run(n, 64, layer, 0, 50 * n) for n in (4, 2) for layer in range(n)]
    rows += [_run(4, 64, layer, 0, 100, trainable="all") for layer in range(4)]
    arms = [w for w in answer_in_words(rows, summarise(rows)) if w.startswith("Arm ")]
    assert arms == [
        "Arm 'all' (everything trainable) needed 0.50x the steps of training only the block (median steps summed "
        "over 4 blocks; <1 = faster)."
    ]


def test_the_arms_are_compared_at_2_and_5_percent_where_runs_miss_the_tolerance():
    """No run reaches 1%, so the arms are also compared at 2% and 5%, base by base: `all` takes 0.4x the block's
    steps to each, certainly cheaper in every base, which 3 bases cannot make significant."""
    rows = _looser_rows()
    words = [w for w in answer_in_words(rows, summarise(rows)) if w.startswith("Arms (")]
    assert [w.split(":")[0] for w in words] == [
        f"Arms (n_embd=32, n_layer={n}{within})" for n in (2, 4) for within in ("", ", to within 2%", ", to within 5%")
    ]
    assert words[0].endswith(
        "'all' certainly cheaper in 0 of 3 bases, dearer in 0, undecided in 3 (too few decided bases to test)."
    )
    assert (
        "'all' 6/6 back (3 bases); median 4.0%" in words[1] and "'block' 6/6 back (3 bases); median 10.0%" in words[1]
    )
    tail = "'all' certainly cheaper in 3 of 3 bases, dearer in 0, undecided in 0 (p = 0.250, sign test over bases, 3 bases; the smallest p this design allows is 0.25)."
    assert all(w.endswith(tail) for i, w in enumerate(words) if i % 3)
    # where every run of both arms reached the study's own tolerance, nothing is restated at looser ones
    rows = [_run(4, 64, layer, 0, 50 * 4, trainable=arm) for layer in range(4) for arm in ("block", "all")]
    assert [w.split(":")[0] for w in answer_in_words(rows, summarise(rows)) if w.startswith("Arms (")] == [
        "Arms (n_embd=64, n_layer=4)"
    ]  # fmt: skip


# --------------------------------------------------------------------------------------- position of the reset layer
def _position(rows: list[dict]) -> str:
    """The report's one sentence on position (grid point n_layer=4, n_embd=32, arm block)."""
    (words,) = [w for w in answer_in_words(rows, summarise(rows)) if w.startswith("Position (")]
    return words


def test_costs_rising_with_the_layer_index_read_later_layers_cost_more():
    """N=4, 3 bases: layer L costs 5% x (L + 1) of the budget (x 0.9, 1, 1.1 by base). Per position class: first 5%,
    middle (9, 10, 11, 13.5, 15, 16.5%) a median of 11%, last 20%; in every base a later layer costs more, which 3
    bases cannot make significant (a sign test's smallest p is 0.25)."""
    rows = [
        _run(4, 32, layer, seed, round(50 * (layer + 1) * s))
        for layer in range(4)
        for seed, s in enumerate(SEED_SPREAD)
    ]
    words = _position(rows)
    assert words.startswith("Position (n_embd=32, n_layer=4, arm block): first: 3/3 back (3 bases); median 5.0%")
    assert "middle: 6/6 back (3 bases); median 11.0%" in words and "last: 3/3 back (3 bases); median 20.0%" in words
    assert words.endswith(
        "Within a base, a later layer cost more in 3 of 3 bases, less in 0 (sign test over bases, p = 0.250; the "
        "smallest p this design allows is 0.25)."
    )
    # a base's edges (its first and last layer: 5% and 20% x its spread, a median of the first) are cheaper
    assert "first and last layers cost more than its middle ones in 0 of 3 bases, cheaper in 3" in words


def test_a_u_shape_is_caught_by_the_edges_test_not_by_a_trend():
    """First and last layer cost 20% (x 0.9, 1, 1.1 by base), the two between them 5%: symmetric, so no base shows
    a trend with the layer index, while every base's edges cost more than its middle."""
    rows = [
        _run(4, 32, layer, seed, round((200 if layer in (0, 3) else 50) * s))
        for layer in range(4)
        for seed, s in enumerate(SEED_SPREAD)
    ]
    words = _position(rows)
    assert "first: 3/3 back (3 bases); median 20.0%" in words and "middle: 6/6 back (3 bases); median 5.0%" in words
    assert (
        "A base's first and last layers cost more than its middle ones in 3 of 3 bases, cheaper in 0, undecided "
        "(censored) in 0 (p = 0.250, sign test over bases, 3 bases; the smallest p this design allows is 0.25)."
    ) in words
    assert words.endswith("Within a base, a later layer cost more in 0 of 3 bases (too few to test).")


# ----------------------------------------------------------------------------------------------- warnings at the top
UNDER_TRAINED_CURVE = [(250, 2.6), (500, 2.2), (750, 2.0), (1000, 1.979)]  # fell 1.05% over the last quarter


def _above_the_first_section(report: str, text: str) -> None:
    first_section = report.index("\n## ")
    assert report.index("## The answer") == first_section + 1  # the answer is the first section, tables follow
    assert 0 <= report.index(text) < first_section, f"{text!r} is not above the first section"
    assert f"> - {text}" in report.split("> **Read this first")[1].split("\n\n")[0]


def test_an_under_trained_base_is_flagged_above_the_first_section_of_the_report(tmp_path):
    warnings = base_run_warnings(UNDER_TRAINED_CURVE, TOTAL)
    assert [w.code for w in warnings] == [UNDER_TRAINED]
    rows = [
        {**_run(2, 32, layer, 0, 100), "grid": {}, "base_id": "seed0", "base_curve": UNDER_TRAINED_CURVE,
         "base_warnings": [str(w) for w in warnings], "base_warning_codes": [UNDER_TRAINED]}
        for layer in range(2)
    ]  # fmt: skip
    report = _report(tmp_path, rows)
    _above_the_first_section(
        report,
        "base seed0: base model under-trained: its validation loss still fell from 2.0000 (step 750) to 1.9790 in "
        "the last quarter of training; recovery numbers measured against it mislead",
    )


def test_a_reset_that_barely_mattered_is_flagged_above_the_first_section_of_the_report(tmp_path):
    rows = [{**_run(2, 32, 0, 0, 100), "grid": {}, "base_id": "seed0"}]
    # decoder.1: right after the reset the loss (2.01) was already within 1% of the baseline (2.0)
    barely = (
        "the reset barely mattered: right after it eval_loss was 2.0100, already within the tolerance of the "
        "baseline 2.0000; this block did little, so its cheap 'recovery' says nothing"
    )
    rows.append(
        {**_run(2, 32, 1, 0, 0), "grid": {}, "base_id": "seed0", "after_reset_eval_loss": 2.01,
         "after_reset_metric": 2.01, "curve": [[0, 2.01]], "warnings": [barely],
         "warning_codes": [RESET_BARELY_MATTERED]}
    )  # fmt: skip
    report = _report(tmp_path, rows)
    _above_the_first_section(
        report,
        "resets that barely raised the loss (already within the tolerance right after the reset; these layers did "
        "little, their 'recovery' is cheap by construction): decoder.1 (seed0)",  # decoder.0 is not named
    )


# ------------------------------------------------------------------------------------------------ the report's plots
BASE_CURVE = [[100, 3.4], [250, 2.6], [500, 2.2], [1000, 2.0]]


def test_the_report_draws_each_layer_against_the_bases_own_curve_and_the_arms_side_by_side(tmp_path, monkeypatch):
    figures = {}
    save = hf_relearn.report.plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(hf_relearn.report.plots, "_save", keep)
    rows = [  # one grid point, N=3, seeds 0 and 1; the `all` arm takes half the block's steps
        {
            **_run(3, 32, layer, seed, round(100 * (layer + 1) * s * share), trainable=arm),
            **{"grid": {}, "base_id": f"seed{seed}", "base_curve": BASE_CURVE},
        }
        for arm, share in (("block", 1.0), ("all", 0.5))
        for layer in range(3)
        for seed, s in enumerate(SEED_SPREAD[:2])
    ]
    report = _report(tmp_path, rows)
    assert {"curves.png", "arms.png"} <= set(figures)
    assert "![curves](plots/curves.png)" in report and "![arms](plots/arms.png)" in report
    (curves,) = figures["curves.png"].axes
    lines = {line.get_label(): line for line in curves.get_lines()}
    assert list(lines) == [
        "base model's own training", "relearn decoder.0", "relearn decoder.1", "relearn decoder.2", "baseline + 1%",
    ]  # fmt: skip
    assert [list(p) for p in zip(*lines["base model's own training"].get_data(), strict=True)] == BASE_CURVE
    # seed 0 of the block arm: layer L took 100 (L + 1) x 0.9 steps
    assert [line.get_data()[0][-1] for k, line in lines.items() if k.startswith("relearn")] == [90, 180, 270]
    (arms,) = figures["arms.png"].axes
    assert arms.get_legend_handles_labels()[1] == ["only the block", "everything trainable"]
    # Kaplan-Meier median steps over the two seeds per block (the lower of the two): block 90 x (L + 1), all half
    heights = [[round(bar.get_height(), 2) for bar in bars] for bars in arms.containers]
    assert heights == [[90, 180, 270], [45, 90, 135]]
