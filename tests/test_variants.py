"""``sweep.variants``: named relearn settings run beside the recipe's own, on the same bases and layers, each
compared in the report with the same arm under the recipe's settings (e.g. "is this cost an artefact of the
learning rate?")."""

import json
import re
import shutil

import pytest

from hf_relearn.errors import RelearnError
from hf_relearn.report.build import build_report
from hf_relearn.study.recipe import Recipe
from hf_relearn.study.run import run_study

RECIPE = {
    "name": "variants",
    "base": {
        "model": "gpt2",
        "config_overrides": {"n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 32},
        "objective": "clm",
    },
    "data": {"block_size": 32, "generated_chars": 40000, "max_eval_samples": 32},
    "pretrain": {"max_steps": 150, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 25},
    "sweep": {
        "blocks": "all_layers",
        "trainable": ["block", "all"],
        "seeds": [0],
        # a learning rate of 0 leaves the reset block as drawn: the settings provably reached the run
        "variants": {
            "frozen-lr": {"learning_rate": 0.0, "max_steps": 10},
            # another recovery metric: the intact model's numbers are measured for it, not taken from another variant
            "accuracy": {"metrics": ["accuracy"], "recovery_metric": "accuracy", "max_steps": 10},
        },
    },
    "relearn": {
        "max_steps": 20,
        "per_device_train_batch_size": 16,
        "learning_rate": 3e-3,
        "eval_steps": 5,
        "stop_at_recovery": False,
    },
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    rows = run_study(Recipe.from_dict(RECIPE), out, progress=False)
    return out, rows, build_report(out)


def test_each_variant_runs_its_own_settings_on_the_same_base(study):
    _, rows, _ = study
    assert len(rows) == 3 * 2 * 3  # layers x arms x (own settings + two variants)
    own = [r for r in rows if r["variant"] is None]
    variant = [r for r in rows if r["variant"] == "frozen-lr"]
    accuracy = [r for r in rows if r["variant"] == "accuracy"]
    assert len(own) == len(variant) == len(accuracy) == 6
    assert {r["steps_trained"] for r in own} == {20} and {r["steps_trained"] for r in variant} == {10}
    for r in variant:  # learning rate 0: the loss never moved from where the reset left it
        assert r["final_eval_loss"] == r["after_reset_eval_loss"]
        assert json.loads(r["variant_settings"]) == {"learning_rate": 0.0, "max_steps": 10}
    for r in own:
        assert r["final_eval_loss"] < r["after_reset_eval_loss"]
    assert len({r["baseline_eval_loss"] for r in rows}) == 1  # one base, one validation set: one intact loss
    assert {r["recovery_metric"] for r in accuracy} == {"eval_accuracy"}
    assert len({r["baseline_metric"] for r in accuracy}) == 1 and 0 < accuracy[0]["baseline_metric"] < 1
    by_id = {r["run_id"]: r for r in rows}
    for r in variant:  # the same reset (same block, seed) as its twin under the recipe's own settings
        twin = by_id[r["run_id"].replace("@frozen-lr", "")]
        assert r["after_reset_eval_loss"] == twin["after_reset_eval_loss"]


def test_the_report_compares_each_variant_with_its_own_arm(study):
    _, _, report = study
    text = report["report"].read_text()
    for arm in ("block", "block@frozen-lr", "all", "all@frozen-lr"):
        assert f"| base | {arm} | 150 ± 0 |" in text
    assert re.search(r"Arms \(base, to within 2%\): 'all@frozen-lr' .* vs 'all' ", text)
    assert re.search(r"Arms \(base, to within 2%\): 'block@frozen-lr' .* vs 'block' ", text)
    # the position findings of the block arm are over its own 3 runs, not the variant's too
    assert re.search(r"Position \(base, arm block\): first: \d/1 back \(1 base\)", text)  # the own settings only
    assert "`frozen-lr` = learning_rate=0.0, max_steps=10" in text


def test_variants_leave_the_plan_of_the_recipe_s_own_settings_unchanged():
    without = {**RECIPE, "sweep": {k: v for k, v in RECIPE["sweep"].items() if k != "variants"}}
    plain = Recipe.from_dict(without)
    plain_ids = [run.id for base in plain.bases() for run in plain.runs_for(base)]
    recipe = Recipe.from_dict(RECIPE)
    ids = [run.id for base in recipe.bases() for run in recipe.runs_for(base)]
    assert [i for i in ids if "@" not in i] == plain_ids  # a study started before keeps its finished runs
    assert len(ids) == 3 * len(plain_ids) == len(set(ids))


@pytest.mark.parametrize(
    "variants, message",
    [
        ([{"learning_rate": 1e-3}], "sweep.variants must map a name"),
        ({"1e-3": {"learning_rate": 1e-3}}, "name '1e-3' must be a short folder name"),
        ({"null": {"learning_rate": 1e-3}}, "name 'null' must be a short folder name"),
        ({"lr/low": {"learning_rate": 1e-3}}, "name 'lr/low' must be a short folder name"),
        ({"low": {}}, "sweep.variants.low: give relearn settings"),
        ({"low": {"block": "decoder.0"}}, "sweep.variants.low: ['block'] are set per run by the sweep"),
        ({"low": {"learning_rat": 1e-3}}, "recipe section 'sweep.variants.low': unknown field(s) ['learning_rat']"),
        ({"low": {"tolerance": 0}}, "tolerance must be > 0"),
    ],
)
def test_bad_variants_fail_before_any_training(variants, message):
    with pytest.raises(RelearnError, match=re.escape(message)):
        Recipe.from_dict({**RECIPE, "sweep": {**RECIPE["sweep"], "variants": variants}})


def test_a_study_grows_by_a_variant_and_keeps_its_finished_runs(study, tmp_path):
    done, rows, _ = study
    out = tmp_path / "grown"
    shutil.copytree(done, out)
    results = sorted(out.glob("runs/*/*/relearn_result.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    variants = {**RECIPE["sweep"]["variants"], "short": {"max_steps": 5}}
    grown = run_study(
        Recipe.from_dict({**RECIPE, "sweep": {**RECIPE["sweep"], "variants": variants}}), out, progress=False
    )
    assert len(grown) == len(rows) + 6  # one new run per layer and arm; none of the old ones redone
    assert {p: p.stat().st_mtime_ns for p in results} == before
    assert {r["steps_trained"] for r in grown if r["variant"] == "short"} == {5}
    assert "short" in (out / "recipe.yaml").read_text()
    # anything else that differs from the study's recipe is still refused: it would mix settings in one table
    for changed in (
        {**RECIPE, "relearn": {**RECIPE["relearn"], "learning_rate": 1e-3}},
        {**RECIPE, "sweep": {**RECIPE["sweep"], "variants": {"short": {"max_steps": 5}}}},  # a variant dropped
        {**RECIPE, "sweep": {**RECIPE["sweep"], "variants": {**variants, "short": {"max_steps": 6}}}},  # changed
    ):
        with pytest.raises(RelearnError, match="holds a study of a different recipe"):
            run_study(Recipe.from_dict(changed), out, progress=False)
