"""A study that trains every run for a fixed budget (``stop_at_recovery: false``, as recipes/minilm-distill.yaml)
answers with the share of the damage each layer's runs repaired in that budget, read off its own results.csv."""

from __future__ import annotations

import csv
import re

from hf_relearn.report.build import build_report
from hf_relearn.storage import read_results
from hf_relearn.study.recipe import Recipe
from hf_relearn.study.run import run_study

FIXED = {
    "name": "fixed",
    "base": {"model": "gpt2", "config_overrides": {"n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 32},
             "objective": "clm"},
    "data": {"block_size": 32, "generated_chars": 40000, "max_eval_samples": 32},
    "pretrain": {"max_steps": 120, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 20},
    "sweep": {"blocks": "all_layers", "trainable": ["block"], "seeds": [0, 1]},
    "relearn": {"max_steps": 20, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 5,
                "stop_at_recovery": False, "tolerance": 0.01},
}  # fmt: skip


def test_a_fixed_budget_study_reports_the_damage_repaired_per_layer(tmp_path):
    run_study(Recipe.from_dict(FIXED), tmp_path, progress=False)
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == 6 and all(r["steps_trained"] == 20 for r in rows)
    words = build_report(tmp_path)["answer"]
    line = next(w for w in words if w.startswith("Damage repaired in the fixed budget of 20 steps"))
    for layer in range(3):
        shares = [
            (r["after_reset_eval_loss"] - r["final_eval_loss"])
            / (r["after_reset_eval_loss"] - r["baseline_eval_loss"])
            for r in rows
            if r["layer"] == layer
        ]
        mean = 100 * sum(shares) / len(shares)
        cell = re.search(rf"\b{layer}: (-?[0-9.]+) ± ", line)
        assert cell and abs(float(cell.group(1)) - mean) < 0.051, (layer, mean, line)
    assert "Within a base, a later layer was repaired more in " in line and "bases (too few to test)" in line
    # every cost is the same budget: the plot draws the damage repaired, not a flat cost per layer
    plots = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert "repaired.png" in plots and "cost_vs_layer.png" not in plots
    # a reset that did not raise the loss (as on a barely trained base) has no damage to repair: that layer is
    # n/a and the run said to be left out; the report builds (statistics.stdev raised on the nan share)
    with (tmp_path / "results.csv").open(newline="") as f:
        raw = list(csv.DictReader(f))
    for r in raw:
        if r["layer"] == "1":
            r["after_reset_eval_loss"] = str(float(r["baseline_eval_loss"]) - 0.01)
    with (tmp_path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(raw[0]))
        writer.writeheader()
        writer.writerows(raw)
    line = next(w for w in build_report(tmp_path)["answer"] if w.startswith("Damage repaired in the fixed budget"))
    assert ", 1: n/a, " in line and "Left out: 2 run(s) whose reset did not raise the loss" in line
    assert (tmp_path / "plots" / "repaired.png").exists()


def test_a_study_that_stops_at_recovery_does_not_claim_a_fixed_budget(tmp_path):
    recipe = {**FIXED, "relearn": {**FIXED["relearn"], "stop_at_recovery": True}}
    run_study(Recipe.from_dict(recipe), tmp_path, progress=False)
    assert any(r["stopped"] == "recovered" for r in read_results(tmp_path / "results.csv"))
    assert not any("Damage repaired" in w for w in build_report(tmp_path)["answer"])


def test_a_ready_trained_base_gets_the_recipes_config_overrides(tmp_path):
    """A recipe without pretrain (as minilm-distill, which turns dropout off) loads its base in each run: the base's
    config_overrides must reach that model (they were dropped, and the runs trained with the checkpoint's dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "ready"
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=259, resid_pdrop=0.1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    recipe = {
        "name": "ready",
        "base": {"model": str(folder), "config_overrides": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                 "objective": "clm"},
        "data": {"block_size": 32, "generated_chars": 20000, "max_eval_samples": 16},
        "pretrain": None,
        "sweep": {"blocks": ["decoder.1"], "trainable": ["block"], "seeds": [0]},
        "relearn": {"max_steps": 2, "eval_steps": 1, "per_device_train_batch_size": 4, "stop_at_recovery": False,
                    "original_steps": 100, "save_final_model": True},
    }  # fmt: skip
    run_study(Recipe.from_dict(recipe), tmp_path / "study", progress=False)
    (row,) = read_results(tmp_path / "study" / "results.csv")
    saved = GPT2Config.from_pretrained(tmp_path / "study" / "runs" / row["run_id"])
    assert (saved.resid_pdrop, saved.embd_pdrop, saved.attn_pdrop) == (0.0, 0.0, 0.0)
    # with no dropout left in the frozen layer below, the prefix cache serves training rows too
    assert "train" in row["prefix_cache"]["splits"]


def test_a_distill_study_reports_absolute_jumps_and_the_damage_its_tolerance_is_a_share_of(tmp_path):
    """Distill (as minilm-distill): the intact model's loss is 0, so a relative jump is undefined and the tolerance is
    a share of the reset's damage; with every run at the same budget the jump is related to the share repaired."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "ready"
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=32, vocab_size=259)).save_pretrained(folder)
    recipe = {
        "name": "distill",
        "base": {"model": str(folder), "objective": "distill"},
        "data": {"block_size": 32, "generated_chars": 20000, "max_eval_samples": 16},
        "pretrain": None,
        "sweep": {"blocks": "all_layers", "trainable": ["block"], "seeds": [0]},
        "relearn": {"objective": "distill", "max_steps": 3, "eval_steps": 1, "per_device_train_batch_size": 4,
                    "stop_at_recovery": False, "tolerance": 0.001, "original_steps": 3, "learning_rate": 1e-4},
    }  # fmt: skip
    run_study(Recipe.from_dict(recipe), tmp_path / "study", progress=False)
    rows = read_results(tmp_path / "study" / "results.csv")
    assert all(r["baseline_eval_loss"] == 0 and not r["recovered"] for r in rows)
    out = build_report(tmp_path / "study")
    report = (tmp_path / "study" / "report.md").read_text()
    assert "nan" not in report.lower() and "rho n/a" not in report
    first = next(r for r in rows if r["layer"] == 0)
    assert f"| +{first['after_reset_eval_loss']:.4f} (abs.) |" in report
    assert "back within 0.1% of the damage the reset did" in report
    assert any("back within 0.1% of the reset's damage" in w for w in out["answer"])
    assert any("vs the share of the damage repaired in 3 steps" in w for w in out["answer"])
