"""``hf-relearn probe``: the loss right after each reset, with no training."""

import csv
import json

import pytest
from documented import says
from pngs import assert_plot
from test_objectives import _CountingTeachers
from test_relearn import QUIET_GPT2, relearn_run
from test_surgery import OVERRIDES, VERSIONS

import hf_relearn.relearn.probe as probe_module
from hf_relearn.cli.main import main
from hf_relearn.data.datasets import DataArguments, build_datasets
from hf_relearn.data.tokenization import get_tokenizer
from hf_relearn.errors import RelearnError
from hf_relearn.relearn.arguments import ModelArguments
from hf_relearn.relearn.prefix_cache import PrefixCache
from hf_relearn.relearn.probe import ProbeArguments, probe

BASE_DATA = dict(block_size=64, generated_chars=150_000)  # what the gpt2_base fixture trained on


def _probe(base, out, **kw):
    args = ProbeArguments(output_dir=str(out), per_device_eval_batch_size=8, **kw)
    return probe(ModelArguments(model=str(base)), DataArguments(**BASE_DATA), args, progress=False)


def test_probe_equals_what_relearn_measures_right_after_the_reset(gpt2_base, tmp_path):
    rows = _probe(gpt2_base, tmp_path / "probe", blocks="layers,decoder.1.mlp", inits="scratch,zero", seeds="0,1")
    # 4 layers and one part, scratch with 2 seeds and zero with 1, in the model's order
    assert [(r["block"], r["init"], r["seed"]) for r in rows[:3]] == [
        ("decoder.0", "scratch", 0), ("decoder.0", "scratch", 1), ("decoder.0", "zero", None),
    ]  # fmt: skip
    blocks = list(dict.fromkeys(r["block"] for r in rows))  # each layer followed by its parts
    assert len(rows) == 5 * 3 and blocks == ["decoder.0", "decoder.1", "decoder.1.mlp", "decoder.2", "decoder.3"]
    for block, init, seed in [("decoder.2", "scratch", 1), ("decoder.3", "zero", 0), ("decoder.1.mlp", "scratch", 0)]:
        run = relearn_run(tmp_path / f"{block}-{init}", gpt2_base, block, init=init, reset_seed=seed, max_steps=1)
        row = next(r for r in rows if r["block"] == block and r["init"] == init and r["seed"] in (seed, None))
        assert row["loss"] == run.after_reset_eval_loss and row["baseline_loss"] == run.baseline_eval_loss
    # seeds draw different weights; every reset of a trained layer hurts
    losses = {(r["block"], r["init"], r["seed"]): r["loss"] for r in rows}
    assert losses[("decoder.2", "scratch", 0)] != losses[("decoder.2", "scratch", 1)]
    assert all(r["loss"] > r["baseline_loss"] and r["increase"] == r["loss"] - r["baseline_loss"] for r in rows)
    # the cache changes no number
    uncached = _probe(gpt2_base, tmp_path / "off", blocks="layers,decoder.1.mlp", inits="scratch,zero", seeds="0,1",
                      prefix_cache="false")  # fmt: skip
    assert [r["loss"] for r in uncached] == [r["loss"] for r in rows]
    # the files hold the same rows; the table names every block once
    with (tmp_path / "probe" / "probe.csv").open() as f:
        saved = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in saved] == [r["loss"] for r in rows]
    table = (tmp_path / "probe" / "probe.md").read_text()
    assert sum(line.startswith("| decoder.") for line in table.splitlines()) == 5
    info = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert info["objective"] == "clm" and info["rows"] == 15 and info["baseline_loss"] == rows[0]["baseline_loss"]


def test_probe_refuses_bad_input_before_any_work(gpt2_base, tmp_path):
    with pytest.raises(RelearnError, match="inits must be"):
        ProbeArguments(output_dir=str(tmp_path), inits="scratch,ones")
    with pytest.raises(RelearnError, match="seeds must be"):
        ProbeArguments(output_dir=str(tmp_path), seeds="0,x")
    with pytest.raises(RelearnError, match="decoder.9"):
        _probe(gpt2_base, tmp_path / "bad", blocks="decoder.9")
    assert not (tmp_path / "bad").exists()
    # zero only where a block has output projections to zero: none for a norms part
    rows = _probe(gpt2_base, tmp_path / "once", blocks="decoder.3,decoder.0.norms", inits="scratch,zero")
    assert [(r["block"], r["init"]) for r in rows] == [
        ("decoder.0.norms", "scratch"), ("decoder.3", "scratch"), ("decoder.3", "zero"),
    ]  # fmt: skip
    with pytest.raises(RelearnError, match="already holds a probe"):
        _probe(gpt2_base, tmp_path / "once", blocks="decoder.3", inits="zero")


def test_probe_on_the_real_minilm_checkpoint(minilm_dir, shared_data, tmp_path, capsys):
    code = main([
        "probe", str(minilm_dir), "--train_file", str(shared_data / "wikitext-2-valid.txt"), "--validation_file",
        str(shared_data / "wikitext-2-test.txt"), "--block_size", "64", "--max_train_samples", "8",
        "--max_eval_samples", "8", "--blocks", "layers,encoder.5.norms", "--output_dir", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "probe.csv").open()))
    # a model without a head is probed with the distill objective: distance to the intact model's outputs
    assert json.loads((tmp_path / "probe.json").read_text())["objective"] == "distill"
    assert [r["block"] for r in rows] == [f"encoder.{i}" for i in range(6)] + ["encoder.5.norms"]
    assert all(float(r["baseline_loss"]) == 0 and float(r["loss"]) > 0 for r in rows)
    assert all(f"| {r['block']} |" in printed for r in rows)
    assert_plot(tmp_path / "probe.png", (6, 3.8))  # 7 bars, one init: the 6-inch minimum width
    # the teacher's outputs and the prefix, computed once and served from then on, change no number
    uncached = probe(
        ModelArguments(model=str(minilm_dir)),
        DataArguments(train_file=str(shared_data / "wikitext-2-valid.txt"), block_size=64, max_train_samples=8,
                      validation_file=str(shared_data / "wikitext-2-test.txt"), max_eval_samples=8),
        ProbeArguments(output_dir=str(tmp_path / "off"), blocks="layers,encoder.5.norms", prefix_cache="false"),
        progress=False,
    )  # fmt: skip
    assert [r["loss"] for r in uncached] == [float(r["loss"]) for r in rows]


# --------------------------------------------------------------- one prefix cache and one teacher for all the resets
NO_DROPOUT = "n_layer=4,n_embd=32,n_head=2,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"


def test_probe_computes_each_layer_boundary_once(tmp_path, monkeypatch):
    caches: list[PrefixCache] = []

    class Recording(PrefixCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(probe_module, "PrefixCache", Recording)
    data = DataArguments(block_size=32, generated_chars=20_000, max_eval_samples=12, tokenizer="bytes")
    args = ProbeArguments(output_dir=str(tmp_path), blocks="layers", seeds="0,1", per_device_eval_batch_size=4)
    rows = probe(ModelArguments(model="gpt2", config_overrides=NO_DROPOUT), data, args, progress=False)
    assert len(rows) == 4 * 2  # 4 layers x 2 seeds = 8 resets
    _, evals, _ = build_datasets(data, get_tokenizer("bytes"), "clm")
    assert len(evals) == 12
    (cache,) = caches
    # the first reset (decoder.3, deepest) computes every boundary below it for each evaluation row; the other 5
    # resets with a prefix (decoder.3 seed 1, decoder.2 and decoder.1 twice) are served; decoder.0 has no prefix
    assert cache.filled_rows == len(evals)  # not 6 x 12 = 72: one fill per evaluation row, not one per reset


def test_probe_distill_computes_the_teachers_outputs_once_across_its_resets(tmp_path, monkeypatch):
    assert says("The runs share the frozen-prefix cache (deepest block first, so every layer boundary is "
                        "computed once) and, for `distill`, the teacher's outputs.")  # fmt: skip
    teachers = _CountingTeachers(monkeypatch)
    data = DataArguments(block_size=32, generated_chars=20_000, max_eval_samples=12, tokenizer="bytes")
    args = ProbeArguments(output_dir=str(tmp_path), blocks="layers", seeds="0,1", objective="distill",
                          per_device_eval_batch_size=4)  # fmt: skip
    rows = probe(ModelArguments(model="gpt2", config_overrides=QUIET_GPT2), data, args, progress=False)
    assert len(rows) == 3 * 2  # 6 resets, each measured against the intact model's outputs
    assert all(r["baseline_loss"] == 0 and r["loss"] > 0 for r in rows)
    _, evals, _ = build_datasets(data, get_tokenizer("bytes"), "distill")
    assert len(evals) == 12  # 3 evaluation batches of 4
    # one teacher for the whole probe, run once per evaluation batch: 3 calls, not 6 resets x 3 = 18
    assert len(teachers) == 1 and teachers.calls == 3


# -------------------------------------------------------------------------------------------------------- probe.json
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
