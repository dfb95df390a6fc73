"""README claims backed here, on rows and results built by hand so the answer is known: the report's answer in words
about depth N, width D and the arms (with the 2% / 5% fallback and ``sweep.arms_at``), its warnings at the top, the
under-trained base's 1%-over-the-last-quarter rule, and the figures, tags and source data a run's model card carries."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_relearn.cards import relearn_card
from hf_relearn.caveats import RESET_BARELY_MATTERED, UNDER_TRAINED
from hf_relearn.findings import answer_in_words, summarise
from hf_relearn.grid_findings import depth_width_words, grid_table
from hf_relearn.recipe import Recipe
from hf_relearn.report import build_report
from hf_relearn.result import RelearnResult, base_run_warnings
from hf_relearn.storage import DATA_FILE, RESULT_FILE, RESULTS, read_results, write_results

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


# 1 ------------------------------------------------------------------------------- depth N, width D, the arms
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


ARMS_AT = {"all": {"n_layer": 4, "n_embd": 64}}  # README's example


def test_arms_at_limits_an_arm_to_its_grid_point_in_the_plan():
    recipe = Recipe(
        name="arms-at",
        base={"model": "gpt2", "config_overrides": {"n_head": 2, "n_positions": 32}},
        sweep={
            "blocks": "all_layers",
            "trainable": ["block", "all"],
            "arms_at": ARMS_AT,
            "seeds": [0],
            "grid": {"n_layer": [2, 4], "n_embd": [32, 64]},
        },
    )
    plan = {base.id: sorted({run.trainable for run in recipe.runs_for(base)}) for base in recipe.bases()}
    assert plan == {
        "n_layer=2_n_embd=32-seed0": ["block"],
        "n_layer=2_n_embd=64-seed0": ["block"],
        "n_layer=4_n_embd=32-seed0": ["block"],
        "n_layer=4_n_embd=64-seed0": ["all", "block"],
    }


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


# 2 ------------------------------------------------------------------------------- warnings at the top
TOTAL = 1000  # the base run's steps in the under-trained curves below
UNDER_TRAINED_CURVE = [(250, 2.6), (500, 2.2), (750, 2.0), (1000, 1.979)]  # fell 1.05% over the last quarter


def _encoded(row: dict) -> dict:
    """A row as the study writes it to results.csv (lists and dicts as JSON)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}


def _report(tmp_path, rows: list[dict]) -> str:
    write_results(tmp_path / RESULTS, [_encoded(r) for r in rows], list(TEMPLATE))
    return build_report(tmp_path)["report"].read_text()


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


# 3 ------------------------------------------------------------------------------- the under-trained rule
@pytest.mark.parametrize(
    "final, fires",
    [(1.979, True), (1.981, False)],  # 2.0 -> 1.979 fell 1.05% over the last quarter; 2.0 -> 1.981 fell 0.95%
)
def test_the_under_trained_warning_fires_above_a_1_percent_fall_over_the_last_quarter(final, fires):
    curve = [(250, 2.6), (500, 2.2), (750, 2.0), (1000, final)]
    codes = [w.code for w in base_run_warnings(curve, TOTAL)]
    assert codes == ([UNDER_TRAINED] if fires else [])


def test_the_under_trained_window_is_the_last_quarter():
    # a 20% fall in the third quarter and 0.25% in the last: trained enough
    assert base_run_warnings([(250, 3.0), (500, 2.5), (750, 2.0), (1000, 1.995)], TOTAL) == []
    # 0.5% then 0.6% within the last quarter: each step under 1%, the quarter over it
    (warning,) = base_run_warnings([(500, 2.2), (750, 2.0), (875, 1.99), (1000, 1.978)], TOTAL)
    assert warning.code == UNDER_TRAINED and "from 2.0000 (step 750) to 1.9780 in the last quarter" in warning


# 4 ------------------------------------------------------------------------------- the model card
def _card(tmp_path, **changes) -> ModelCard:
    """The card of a run folder written by hand: a real result's fields with distinctive numbers, its data settings,
    and a base folder whose own card names a license and a dataset."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ndatasets:\n- tiny_shakespeare\n---\n\n# base\n")
    result = {f.name: TEMPLATE.get(f.name) for f in dataclasses.fields(RelearnResult)}
    result |= dict(
        model=str(base),
        architecture="gpt2",
        block="decoder.1",
        recovered=True,
        baseline_eval_loss=2.0,
        after_reset_eval_loss=3.5,
        final_eval_loss=2.015,
        steps_to_recover=250,
        examples_to_recover=12345,
        tokens_to_recover=987654,
        original_steps=2000,
        fraction_of_original=0.125,
        original_steps_to_same_loss=678,
    )
    result |= changes
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULT_FILE).write_text(json.dumps(result))
    (run / DATA_FILE).write_text(json.dumps({"train_file": "../shared/data/tinyshakespeare.txt"}))
    relearn_card(run, "me/gpt2-relearn-d1").save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_the_card_states_every_recovery_figure_in_prose_and_in_model_index(tmp_path):
    card = _card(tmp_path)
    (results,) = {(e.task_type, e.dataset_name, e.dataset_split) for e in card.data.eval_results}
    assert results == ("text-generation", "tinyshakespeare.txt", "validation")
    metrics = {e.metric_type: (e.metric_name, e.metric_value) for e in card.data.eval_results}
    assert metrics == {
        "eval_loss": ("eval loss after re-learning", 2.015),
        "baseline_eval_loss": ("eval loss of the intact model", 2.0),
        "after_reset_eval_loss": ("eval loss right after the reset", 3.5),
        "perplexity": ("perplexity after re-learning", pytest.approx(7.500727381202963, rel=1e-12)),
        "baseline_perplexity": ("perplexity of the intact model", pytest.approx(7.38905609893065, rel=1e-12)),
        "after_reset_perplexity": ("perplexity right after the reset", pytest.approx(33.11545195869231, rel=1e-12)),
        "steps_to_recover": ("optimizer steps to recover", 250),
        "examples_to_recover": ("training examples to recover", 12345),
        "tokens_to_recover": ("tokens to recover", 987654),
        "fraction_of_original": ("fraction of the original training budget", 0.125),
        "original_steps_to_same_loss": ("the original run's steps to the same loss (from scratch)", 678),
    }
    text = card.text
    assert "| intact model (baseline) | 2.0000 | 7.389 |" in text  # perplexity = exp(loss), to 3 decimals
    assert "| right after the reset | 3.5000 | 33.115 |" in text
    assert "| after re-learning | 2.0150 | 7.501 |" in text
    assert "**Recovered** at step 250 = 12.5% of the original 2000 steps." in text
    assert "- steps / examples / tokens to recover: 250 / 12345 / 987654\n" in text
    assert "- fraction of the original training budget: 12.5%\n" in text
    assert "- the original run first reached the same loss at step 678 (learning from scratch)" in text


def test_the_card_carries_the_tags_and_the_source_cards_license_and_datasets(tmp_path):
    data = _card(tmp_path, architecture="bert", objective="mlm").data
    assert data.tags == ["hf-relearn", "relearn", "bert"] and data.pipeline_tag == "fill-mask"
    assert data.license == "apache-2.0" and data.datasets == ["tiny_shakespeare"]
    assert yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])["license"] == "apache-2.0"


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
