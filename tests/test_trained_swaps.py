"""Encoder swaps with a *trained* encoder: a study trains a donor base (another width, its own seed) and swaps its
encoder into each base, instead of a freshly initialised one."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from test_study import SWAP_RECIPE

from hf_relearn.errors import RelearnError
from hf_relearn.storage import RUN_FILE, read_results
from hf_relearn.study.recipe import Recipe
from hf_relearn.study.run import run_study

WIDER = {"num_layers": 2, "d_model": 48, "d_ff": 96, "num_heads": 2, "d_kv": 24}


def _recipe() -> dict:
    recipe = copy.deepcopy(SWAP_RECIPE)
    recipe["name"] = "trained-swap"
    recipe["sweep"]["blocks"] = []
    recipe["sweep"]["swaps"] = [{"name": "trained-wider", "trained": True, "overrides": WIDER}]
    # as the trained-swap recipe does (a cap of 60 steps: 3 evaluations, too few for the rule to stop either run)
    recipe["pretrain"] = {**recipe["pretrain"], "until_converged": True}
    recipe["relearn"] = {**recipe["relearn"], "max_steps": 10, "save_final_model": True}
    return recipe


def _pretrain_settings(folder) -> dict:
    """The pretrain run's TrainingArguments as it saved them (training_args.bin)."""
    args = torch.load(folder / "training_args.bin", weights_only=False)
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}


def test_a_trained_swap_installs_the_donor_bases_encoder(tmp_path):
    recipe = Recipe.from_dict(_recipe())
    (donor,) = recipe.donors()
    assert donor.id == "donor-trained-wider-seed1000" and donor.seed == 1000 and dict(donor.overrides)["d_model"] == 48
    (run,) = recipe.runs_for(recipe.bases()[0])
    assert run.swap_encoder == "study-base:donor-trained-wider-seed1000"
    run_study(recipe, tmp_path, progress=False)
    donor_dir, base_dir = tmp_path / "bases" / donor.id, tmp_path / "bases" / recipe.bases()[0].id
    # the donor is trained like the base: the same data, the same pretrain settings (until converged, as the bases
    # are), its own seed (seed + 1000) and the entry's overrides on top of the base's
    donor_info, base_info = (json.loads((d / RUN_FILE).read_text()) for d in (donor_dir, base_dir))
    assert donor_info["data_args"] == base_info["data_args"] and donor_info["objective"] == base_info["objective"]
    assert donor_info["train_examples"] == base_info["train_examples"] > 0
    assert donor_info["eval_examples"] == base_info["eval_examples"] > 0
    assert donor_info["until_converged"] is base_info["until_converged"] is True
    assert donor_info["convergence_rule"] == base_info["convergence_rule"] is not None
    assert {k: v for k, v in donor_info["model_args"].items() if k not in ("config_overrides", "model_seed")} == {
        k: v for k, v in base_info["model_args"].items() if k not in ("config_overrides", "model_seed")
    }
    assert (donor_info["model_args"]["model_seed"], base_info["model_args"]["model_seed"]) == (1000, 0)
    assert donor_info["model_args"]["config_overrides"] == {**base_info["model_args"]["config_overrides"], **WIDER}
    donor_args, base_args = _pretrain_settings(donor_dir), _pretrain_settings(base_dir)
    differ = {k for k in base_args if donor_args[k] != base_args[k]}
    assert differ == {"seed", "output_dir"}, {k: (donor_args[k], base_args[k]) for k in differ}
    assert (donor_args["seed"], base_args["seed"]) == (1000, 0) and base_args["until_converged"]
    (row,) = read_results(tmp_path / "results.csv")
    assert row["swap"] == "trained-wider" and row["surgery"]["new_width"] == 48 and row["frozen_unchanged"]
    # the encoder in the re-learned model (frozen in this arm) is the donor's trained encoder, tensor for tensor
    trained = load_file(donor_dir / "model.safetensors")
    swapped = load_file(tmp_path / "runs" / run.id / "model.safetensors")
    encoder = [n for n in trained if n.startswith("encoder.block.")]
    assert encoder and all(torch.equal(swapped[n], trained[n]) for n in encoder)


def test_a_trained_swap_needs_a_pretrain_section():
    recipe = _recipe()
    recipe["pretrain"] = None
    recipe["relearn"]["original_steps"] = 60
    with pytest.raises(RelearnError, match="trained: true needs a pretrain section"):
        Recipe.from_dict(recipe)
