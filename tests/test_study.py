"""Study: recipes, resumable sweeps (SIGKILL and restart), the report, the demo's wiring."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pngs import assert_plot
from test_findings import TEMPLATE, _encoded, _run

from hf_relearn.cli.main import main
from hf_relearn.errors import RelearnError
from hf_relearn.report.build import build_report
from hf_relearn.storage import RESULTS, read_results, write_results
from hf_relearn.study.recipe import Recipe
from hf_relearn.study.run import run_study

TINY_RECIPE = {
    "name": "tiny",
    "base": {"model": "gpt2", "config_overrides": {"n_embd": 32, "n_head": 2, "n_positions": 32}, "objective": "clm"},
    "data": {"block_size": 32, "generated_chars": 40000, "max_eval_samples": 32},
    "pretrain": {"max_steps": 150, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 25},
    "sweep": {"blocks": "all_layers", "trainable": ["block"], "seeds": [0], "grid": {"n_layer": [2, 3]}},
    "relearn": {"max_steps": 150, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 5},
}
COMPARED = ["run_id", "block", "baseline_eval_loss", "after_reset_eval_loss", "steps_to_recover", "recovered", "curve"]


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _table(study: Path) -> list[tuple]:
    return [tuple(str(r[c]) for c in COMPARED) for r in read_results(study / "results.csv")]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "whole"
    run_study(Recipe.from_dict(TINY_RECIPE), out, progress=False)
    build_report(out)
    return out


def test_study_runs_every_layer_of_every_grid_point_and_reports(tiny_study):
    rows = read_results(tiny_study / "results.csv")
    assert [r["block"] for r in rows] == ["decoder.0", "decoder.1", "decoder.0", "decoder.1", "decoder.2"]
    assert [r["n_layers"] for r in rows] == [2, 2, 3, 3, 3]
    assert all(r["frozen_unchanged"] and r["original_steps"] == 150 for r in rows)
    assert [r["relative_depth"] for r in rows] == [0.0, 1.0, 0.0, 0.5, 1.0]
    report = (tiny_study / "report.md").read_text()
    assert "## The answer" in report
    # depth N per position class: each depth's cost (one base each: described, never tested), from the rows
    for where, depth in (("first", 0.0), ("last", 1.0)):
        line = next(w for w in report.splitlines() if w.startswith(f"- Depth N, {where} layer (arm block)"))
        for r in (r for r in rows if r["relative_depth"] == depth):
            cost = r["steps_to_recover"] / r["original_steps"]
            assert f"n_layer={r['n_layers']}: 1/1 back (1 base); median {100 * cost:.1f}%" in line
        assert line.endswith("fewer than 3 bases at a value: described, not tested.")
    assert "## Position, depth and width" in report and "p = " not in report  # one base a grid point: no test
    # the numbers behind the recovery curves: per grid point and position class, the share back at each cost
    points = (tiny_study / "plots" / "recovery_by_position.csv").read_text().splitlines()[1:]
    where = {0.0: "first", 0.5: "middle", 1.0: "last"}
    expected = []
    for r in rows:
        label, cost = (
            f'"n_layer={r["n_layers"]}",{where[r["relative_depth"]]}',
            r["steps_to_recover"] / r["original_steps"],
        )
        expected += [f"{label},0,0", f"{label},{cost:.6g},1"]
    assert sorted(points) == sorted(expected)
    # each plot at its figure size (curves: a panel per grid point), with its data drawn in colour across it
    sizes = {"curves.png": (13, 4.5), "cost_vs_layer.png": (7, 4.5), "recovery_by_position.png": (8.4, 3.4)}
    for png, inches in sizes.items():
        assert_plot(tiny_study / "plots" / png, inches)
        assert f"plots/{png}" in report


def test_report_rebuilds_from_results_csv_alone(tiny_study, tmp_path):
    shutil.copy(tiny_study / "results.csv", tmp_path / "results.csv")
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == (tiny_study / "report.md").read_text()
    assert (tmp_path / "plots" / "cost_vs_layer.png").exists()


def test_a_study_killed_at_any_moment_resumes_to_the_same_table(tiny_study, tmp_path):
    recipe = _write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hf_relearn", "study", str(recipe), "--output-dir", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "results.csv").exists():
        time.sleep(0.2)
    time.sleep(1.5)  # kill somewhere inside the second run or the second base's training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _table(out)
    assert 1 <= len(partial) < 5, "the kill should land mid-study"
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    assert _table(out) == _table(tiny_study)  # same runs, same numbers, no duplicates
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def test_an_overfit_base_is_flagged_at_the_top_of_the_report(tmp_path):
    recipe = {
        **TINY_RECIPE,
        "data": {**TINY_RECIPE["data"], "max_train_samples": 4},  # 4 blocks of text: memorised quickly
        "pretrain": {**TINY_RECIPE["pretrain"], "max_steps": 300, "learning_rate": 5e-3},
        "sweep": {"blocks": ["decoder.1"], "seeds": [0]},
        "base": {
            **TINY_RECIPE["base"],
            "config_overrides": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 32},
        },
    }
    run_study(Recipe.from_dict(recipe), tmp_path, progress=False)
    report = (build_report(tmp_path))["report"].read_text()
    top = report.split("## The answer")[0]
    assert "base model overfit: its best validation loss" in top


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sweeps": {}}, "unknown section(s) ['sweeps']"),
        ({"pretrain": {"max_stepz": 3}}, "recipe section 'pretrain': unknown field(s) ['max_stepz']"),
        ({"sweep": {"blocks": ["decoder.99"]}}, "layer 99 out of range"),
        ({"sweep": {"blocks": ["decoder.0.cross_attention"]}}, "has no 'cross_attention'"),
        ({"sweep": {"grid": {"n_layer": []}}}, "sweep.grid.n_layer must be a non-empty list"),
        ({"relearn": {"tolerance": 0}}, "tolerance must be > 0"),
        ({"base": {}}, "needs base.model"),
        ({"data": {"train_file": "/no/such/file.txt"}}, "no such file"),
        ({"pretrain": None}, "needs relearn.original_steps"),
        (
            {"base": {**TINY_RECIPE["base"], "config_overrides": {"n_embd": 32, "n_head": 3, "n_positions": 32}}},
            "base n_layer=2-seed0: the model cannot be built: `embed_dim` must be divisible by num_heads",
        ),
    ],
)
def test_bad_recipes_fail_before_any_training(tmp_path, change, message):
    recipe = {**TINY_RECIPE, **change}
    with pytest.raises(
        RelearnError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        Recipe.from_dict(recipe)


def test_cli_study_errors_and_overrides(tmp_path, capsys):
    assert main(["study", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    assert main(["study", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    recipe = _write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)
    assert main(["study", str(recipe), "--set", "pretrain.max_stepz=3"]) == 2
    assert "unknown field(s) ['max_stepz']" in capsys.readouterr().err
    # another recipe into the same folder is refused, not mixed
    out = tmp_path / "s"
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump({"name": "other"}))
    assert main(["study", str(recipe), "--output-dir", str(out), "--no-progress"]) == 2
    assert "holds a study of a different recipe" in capsys.readouterr().err


def test_demo_is_wired_to_its_recipe_and_the_stdlib_corpus(tmp_path, capsys):
    small = [
        "--set", "pretrain.max_steps=40", "--set", "relearn.max_steps=10", "--set", "sweep.seeds=[0]",
        "--set", "sweep.trainable=[block]", "--set", "sweep.blocks=[decoder.3]", "--set", "data.generated_chars=30000",
    ]  # fmt: skip
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--no-progress", *small]) == 0
    out = capsys.readouterr().out
    assert "study demo:" in out and "decoder.3" in out and "report: " in out and "plot:   " in out
    recipe = yaml.safe_load((tmp_path / "demo" / "recipe.yaml").read_text())
    assert recipe["data"]["builtin_corpus"] == "stdlib" and recipe["pretrain"]["max_steps"] == 40


SWAP_RECIPE = {
    "name": "tiny-swap",
    "base": {
        "model": "t5",
        "config_overrides": {
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_model": 32,
            "d_ff": 64,
            "num_heads": 2,
            "d_kv": 16,
        },
        "objective": "seq2seq",
    },
    "data": {"block_size": 32, "generated_chars": 40000, "max_eval_samples": 16, "seq2seq_task": "denoise"},
    "pretrain": {"max_steps": 60, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 20},
    "sweep": {
        "blocks": ["decoder.-1.cross_attention", "decoder.*.cross_attention"],
        "swaps": [
            {
                "name": "same-width",
                "encoder": "t5",
                "overrides": {"num_layers": 2, "d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16},
                "swap_freeze": ["decoder-except-cross", "encoder-trainable"],
                "swap_warmup_steps": [0, 5],
            },
            {
                "name": "narrower",
                "encoder": "t5",
                "overrides": {"num_layers": 2, "d_model": 16, "d_ff": 32, "num_heads": 2, "d_kv": 8},
            },
        ],
        "swap_cross_attention": ["reset"],
        "seeds": [0],
    },
    "relearn": {"max_steps": 20, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_steps": 5},
}


def test_study_sweeps_encoder_swaps_and_reports_them(tmp_path):
    recipe = Recipe.from_dict(SWAP_RECIPE)
    rows = run_study(recipe, tmp_path, progress=False)
    labels = [(r["block"], r["swap"], r["swap_freeze"], r["swap_warmup_steps"]) for r in rows]
    assert labels == [
        ("decoder.1.cross_attention", None, None, None),
        ("decoder.*.cross_attention", None, None, None),
        ("encoder-swap:t5", "same-width", "decoder-except-cross", 0),
        ("encoder-swap:t5", "same-width", "encoder-trainable", 0),
        ("encoder-swap:t5", "same-width", "encoder-trainable", 5),
        ("encoder-swap:t5", "narrower", "decoder-except-cross", 0),
    ]
    csv_rows = read_results(tmp_path / "results.csv")
    assert [r["swap_width"] for r in csv_rows] == [None, None, 32, 32, 32, 16]
    assert [r["swap_cross_attention"] for r in csv_rows][2:] == ["reset"] * 4
    assert all(r["frozen_unchanged"] and r["original_steps"] == 60 for r in csv_rows)
    assert csv_rows[5]["surgery"]["adapter"] == "resized-kv" and csv_rows[2]["surgery"]["adapter"] == "none"
    assert all(r["base_curve"] and "original_steps_to_same_loss" in r for r in csv_rows)
    report = build_report(tmp_path)
    text = report["report"].read_text()
    assert "**Encoder swaps** (original budget 60 steps" in text
    assert "swap:same-width (encoder width 32 → 32; reset, encoder-trainable, warm-up 5): loss" in text
    assert "swap:narrower (encoder width 32 → 16; reset, decoder-except-cross)" in text
    assert "one decoder layer's cross-attention wiped (decoder.1.cross_attention, same encoder)" in text
    assert "all cross-attention wiped (decoder.*.cross_attention, same encoder)" in text
    assert "Verdict, against the" in text and "From scratch = the base run's own validation curve" in text
    assert "| swap:narrower | reset, decoder-except-cross |" in text
    assert_plot(tmp_path / "plots" / "swap_recovery.png", (13, 4.8))
    assert "plots/swap_recovery.png" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"base": TINY_RECIPE["base"], "sweep": {"swaps": [{"name": "x", "encoder": "t5"}]}},
            "is not an encoder-decoder model",
        ),
        ({"sweep": {"swaps": [{"name": "x"}]}}, "needs name and encoder"),
        ({"sweep": {"swaps": [{"name": "x", "encoder": "t5", "widht": 3}]}}, "unknown key(s) ['widht']"),
        ({"sweep": {"swaps": [{"name": "x", "encoder": "t5"}] * 2}}, "the name 'x' is used twice"),
        ({"sweep": {"swaps": [{"name": "x", "encoder": "t5"}], "swap_freeze": ["nothing"]}}, "is not one of"),
        (
            {"sweep": {"swaps": [{"name": "x", "encoder": "t5"}], "swap_cross_attention": ["gated"]}},
            "is not one of reset, zero, keep",
        ),
    ],
)
def test_bad_swap_sweeps_fail_before_any_training(change, message):
    recipe = {**SWAP_RECIPE, **change}
    with pytest.raises(RelearnError, match=re.escape(message)):
        Recipe.from_dict(recipe)


def test_a_study_measures_each_base_once(tmp_path, monkeypatch):
    from hf_relearn.relearn.trainer import RelearnTrainer

    measured = []
    own = RelearnTrainer._measure

    def counting(self, description):
        measured.append(description)
        return own(self, description)

    monkeypatch.setattr(RelearnTrainer, "_measure", counting)
    rows = run_study(Recipe.from_dict(TINY_RECIPE), tmp_path, progress=False)
    # 2 bases (n_layer 2 and 3), 5 runs: the intact model is measured once per base, the reset model once per run
    assert sum(d.startswith("relearn: baseline") for d in measured) == 2
    assert sum(d.startswith("relearn: after reset") for d in measured) == len(rows) == 5
    for base in ("n_layer=2-seed0", "n_layer=3-seed0"):
        mine = [r for r in rows if r["base_id"] == base]
        assert len({r["baseline_eval_loss"] for r in mine}) == 1 and mine[0]["baseline_eval_loss"] > 0


def test_two_workers_end_with_the_table_of_one_process_and_redo_a_killed_run(tiny_study, tmp_path):
    """``--workers 2``: each base and run done once, by whichever worker claimed it, with the numbers of one
    process of the same threads (a run's numbers do not depend on the process that ran it). A run killed mid-way
    leaves its claim behind; the next start redoes it."""
    import shutil
    import subprocess
    import sys

    recipe, two = _write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE), tmp_path / "two"
    argv = ["study", str(recipe), "--output-dir", str(two), "--workers", "2", "--threads-per-worker", "1"]
    proc = subprocess.run([sys.executable, "-m", "hf_relearn", *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-> " + str(two) + " (2 workers)" in proc.stdout
    runs = [r["run_id"] for r in read_results(tiny_study / "results.csv")]
    assert [proc.stdout.count(f"{run}: ") for run in runs] == [1] * len(runs)  # each run once, over both workers
    assert _table(two) == _table(tiny_study)
    assert not (two / ".claims").exists()  # removed once the study is done
    victim = two / "runs" / runs[2]
    shutil.rmtree(victim)
    victim.mkdir(parents=True)  # what a kill mid-run leaves: the folder without its result, and the claim
    (two / ".claims").mkdir()
    (two / ".claims" / ("run-" + runs[2].replace("/", "__"))).write_text("a-host-that-is-gone 1\n")
    run_study(Recipe.from_dict(TINY_RECIPE), two, progress=False, workers=2, threads_per_worker=1)
    assert _table(two) == _table(tiny_study)


# ----------------------------------------------------------------------------------- what the demo prints at its end
def test_the_demo_ends_by_printing_the_table_the_answer_in_words_and_the_report(tmp_path, monkeypatch, capsys):
    """The demo's study is replaced by hand-built results (the tests above run the real, tiny one): what it
    prints after the study is the table, the answer in words and the paths of report.md and its plots."""
    import hf_relearn.study.run

    def study(recipe, out, progress=True, parallel=None, workers=1, threads_per_worker=None):  # leaves results.csv
        assert (recipe.name, recipe.sweep["trainable"]) == ("demo", ["block", "all"])  # recipes/demo.yaml
        assert (workers, threads_per_worker) == (2, 1)  # the published numbers depend on 1 thread per run
        rows = [{**_run(4, 32, layer, 0, 100 * (layer + 1)), "grid": {}, "base_id": "seed0"} for layer in range(4)]
        write_results(out / RESULTS, [_encoded(r) for r in rows], list(TEMPLATE))
        return rows

    monkeypatch.setattr(hf_relearn.study.run, "run_study", study)
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
