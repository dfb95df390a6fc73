"""A study that trains every run for a fixed budget (``stop_at_recovery: false``, as recipes/minilm-distill.yaml)
answers with the share of the damage each layer's runs repaired in that budget, read off its own results.csv."""

from __future__ import annotations

import re

from hf_relearn.report import build_report
from hf_relearn.study import Recipe, read_results, run_study

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
    assert "Layer index vs share repaired rho" in line


def test_a_study_that_stops_at_recovery_does_not_claim_a_fixed_budget(tmp_path):
    recipe = {**FIXED, "relearn": {**FIXED["relearn"], "stop_at_recovery": True}}
    run_study(Recipe.from_dict(recipe), tmp_path, progress=False)
    assert any(r["stopped"] == "recovered" for r in read_results(tmp_path / "results.csv"))
    assert not any("Damage repaired" in w for w in build_report(tmp_path)["answer"])
