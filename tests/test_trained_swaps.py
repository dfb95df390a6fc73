"""Encoder swaps with a *trained* encoder: a study trains a donor base (another width, its own seed) and swaps its
encoder into each base, instead of a freshly initialised one."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_study import SWAP_RECIPE

from hf_relearn.errors import RelearnError
from hf_relearn.io import read_results
from hf_relearn.recipe import Recipe
from hf_relearn.study import run_study

WIDER = {"num_layers": 2, "d_model": 48, "d_ff": 96, "num_heads": 2, "d_kv": 24}


def _recipe() -> dict:
    recipe = copy.deepcopy(SWAP_RECIPE)
    recipe["name"] = "trained-swap"
    recipe["sweep"]["blocks"] = []
    recipe["sweep"]["swaps"] = [{"name": "trained-wider", "trained": True, "overrides": WIDER}]
    recipe["relearn"] = {**recipe["relearn"], "max_steps": 10, "save_final_model": True}
    return recipe


def test_a_trained_swap_installs_the_donor_bases_encoder(tmp_path):
    recipe = Recipe.from_dict(_recipe())
    (donor,) = recipe.donors()
    assert donor.id == "donor-trained-wider-seed1000" and donor.seed == 1000 and dict(donor.overrides)["d_model"] == 48
    (run,) = recipe.runs_for(recipe.bases()[0])
    assert run.swap_encoder == "study-base:donor-trained-wider-seed1000"
    run_study(recipe, tmp_path, progress=False)
    donor_dir = tmp_path / "bases" / donor.id
    assert (donor_dir / "hf_relearn_run.json").exists()  # trained like a base: same data and pretrain settings
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
