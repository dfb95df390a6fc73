"""Documented claims backed here, on rows, results and recipes built by hand or shipped: the report's answer on the
position of the reset layer (a rank correlation, and the first and last layers against the rest for a U shape), the
re-learn curve drawn against the original run's, the surgery a card names, the report's plots (each layer against
the base's own curve, the arms side by side), what the demo prints at its end, what surgery.json and probe.json hold,
and the CPU overrides in the header of each GPU recipe."""

import json
import shlex
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import transformers
from documented import says
from test_claims_c import SEED_SPREAD, TEMPLATE, _card, _encoded, _report, _run

import hf_relearn
import hf_relearn.study_plots
from hf_relearn.cli import main
from hf_relearn.findings import answer_in_words, summarise
from hf_relearn.plots import plot_curve
from hf_relearn.recipe import Recipe, _meta_model
from hf_relearn.storage import RESULTS, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "hf_relearn" / "recipes"
VERSIONS = {"hf_relearn": hf_relearn.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


# 1 ------------------------------------------------------------------------------- position of the reset layer
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


# 2 ------------------------------------------------------------------------------- the original run's curve
ORANGE = (1.0, 0.498, 0.055)  # tab:orange, the original run's colour (the re-learn is tab:blue)


def _orange_columns(png: Path) -> np.ndarray:
    rgb = mpimg.imread(png)[..., :3]
    near = np.abs(rgb - np.array(ORANGE)).max(axis=-1) < 0.03
    return np.flatnonzero(near.any(axis=0))


def test_relearn_curve_png_draws_the_original_runs_curve_when_the_result_has_one(tmp_path):
    result = {
        "block": "layers.3", "curve": [[0, 3.0], [100, 2.4], [200, 2.1], [300, 2.0]], "baseline_metric": 2.0,
        "recovery_threshold": 2.02, "recovered": True, "steps_to_recover": 300, "recovery_metric": "eval_loss",
    }  # fmt: skip
    plain = _orange_columns(plot_curve(result, tmp_path / "plain.png"))
    assert plain.size == 0  # no original curve, nothing orange
    original = [[20, 3.2], [80, 2.6], [160, 2.3], [300, 2.05]]
    width = mpimg.imread(plot_curve({**result, "original_curve": original}, tmp_path / "both.png")).shape[1]
    drawn = _orange_columns(tmp_path / "both.png")
    # the original run's checkpoints span steps 20..300 of 0..315: its line crosses half the figure and more, far
    # wider than its legend sample
    assert drawn.size and drawn[-1] - drawn[0] > width / 2


# 3 ------------------------------------------------------------------------------- the surgery on the card
@pytest.mark.parametrize(
    "init, seed, arm, words",
    [
        ("zero", 7, "all", "every parameter trainable"),
        ("scratch", 3, "lora-rest", "the block frozen at random and LoRA adapters on every other layer"),
    ],
)
def test_the_card_names_the_block_init_seed_and_arm(tmp_path, init, seed, arm, words):
    text = " ".join(_card(tmp_path, block="decoder.2", init=init, seed=seed, trainable=arm).text.split())
    assert (
        f"block `decoder.2` (12 tensors, 12,704 parameters) was reset ({init}, seed {seed}) and re-learned with "
        f"{words} on tinyshakespeare.txt (clm objective)"
    ) in text


# 6 ------------------------------------------------------------------------------- the report's plots
BASE_CURVE = [[100, 3.4], [250, 2.6], [500, 2.2], [1000, 2.0]]


def test_the_report_draws_each_layer_against_the_bases_own_curve_and_the_arms_side_by_side(tmp_path, monkeypatch):
    figures = {}
    save = hf_relearn.study_plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(hf_relearn.study_plots, "_save", keep)
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


# 7 ------------------------------------------------------------------------------- what the demo prints at its end
def test_the_demo_ends_by_printing_the_table_the_answer_in_words_and_the_report(tmp_path, monkeypatch, capsys):
    """The demo's study is replaced by hand-built results (tests/test_study.py runs the real, tiny one): what it
    prints after the study is the table, the answer in words and the paths of report.md and its plots."""
    import hf_relearn.study

    def study(recipe, out, progress=True, parallel=None, workers=1, threads_per_worker=None):  # leaves results.csv
        assert (recipe.name, recipe.sweep["trainable"]) == ("demo", ["block", "all"])  # recipes/demo.yaml
        assert (workers, threads_per_worker) == (2, 1)  # the published numbers depend on 1 thread per run
        rows = [{**_run(4, 32, layer, 0, 100 * (layer + 1)), "grid": {}, "base_id": "seed0"} for layer in range(4)]
        write_results(out / RESULTS, [_encoded(r) for r in rows], list(TEMPLATE))
        return rows

    monkeypatch.setattr(hf_relearn.study, "run_study", study)
    assert main(["demo", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    # each layer: the reset raised the loss 2.0 -> 3.0 (50%), recovered at 100 (L + 1) steps of the base's 1000
    rows = [
        f"{'base':<18} {f'decoder.{k}':<22} {'block':<42}  50.00% {100 * (k + 1):>12} "
        f"{f'{10.0 * (k + 1):.1f}%':>12}  1/1 "
        for k in range(4)
    ]
    table = out.index(rows[0]) - 2
    assert out[table].split() == ["base", "block", "arm", "jump", "steps", "%", "orig", "rec"]
    assert out[table + 2 : table + 6] == rows and out[table + 6] == ""
    assert out[table + 7].startswith(
        "**base** (original budget 1000 steps): re-learning one reset layer with the rest frozen brought the validation "
        "loss back within 1% in 4 of 4 runs. Cost as a share of the budget, per layer (Kaplan-Meier; a run not back is "
        "censored at the share it trained): decoder.0 1/1 back (1 base); median 10.0%"
    )
    assert "decoder.3 1/1 back (1 base); median 40.0%" in out[table + 7]
    assert any(line.startswith("Position (base, arm block): first: 1/1 back (1 base); median 10.0%") for line in out)
    assert f"report: {tmp_path / 'report.md'}" in out and f"plot:   {tmp_path / 'plots' / 'curves.png'}" in out


# 8 ------------------------------------------------------------------------------- surgery.json and probe.json
OVERRIDES = "n_layer=2,n_embd=32,n_head=2,vocab_size=256,n_positions=64"


def test_surgery_json_names_block_init_seed_tensors_and_versions(tmp_path):
    out = tmp_path / "reset"
    assert main(["reset", "gpt2", "decoder.1", "--config-overrides", OVERRIDES, "--init", "zero", "--seed", "5",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    info = json.loads((out / "surgery.json").read_text())
    assert (info["block"], info["init"], info["seed"]) == ("decoder.1", "zero", 5)
    assert info["tensors"] and all(t.startswith("transformer.h.1.") for t in info["tensors"])
    assert info["versions"] == VERSIONS


def test_probe_json_holds_the_arguments_the_baseline_and_the_versions(tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "gpt2", "--config_overrides", OVERRIDES, "--generated_chars", "20000", "--block_size", "32",
                 "--max_eval_samples", "8", "--blocks", "decoder.1", "--output_dir", str(out)]) == 0  # fmt: skip
    info = json.loads((out / "probe.json").read_text())
    rows = (out / "probe.csv").read_text().splitlines()
    assert info["versions"] == VERSIONS
    assert info["model"]["config_overrides"] == OVERRIDES and info["probe"]["blocks"] == "decoder.1"
    assert info["data"]["block_size"] == 32 and info["rows"] == len(rows) - 1 == 1
    assert f",{info['baseline_loss']!r}," in rows[1]  # the baseline of the table's one row


# 9 ------------------------------------------------------------------------------- the GPU recipes' CPU overrides
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
