"""Frozen-prefix cache: exact losses and gradients, refusals, on-disk stores, sharing, and a relearn run with it;
when `auto` turns it on, its size logged first and sized for the rows a run can meet, its memory budget."""

import json
import logging
import re
import tempfile
from pathlib import Path

import pytest
import torch
from test_relearn import FEW, base_run, relearn_run
from test_swap import _pair
from tiny import TINY
from transformers import TrainerCallback

import hf_relearn.relearn.runner as runner_module
import hf_relearn.relearn.trainer_prefix as trainer_prefix
from hf_relearn.errors import RelearnError
from hf_relearn.model.blocks import BlockMap
from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import freeze_except
from hf_relearn.relearn import prefix_cache as prefix_cache_module
from hf_relearn.relearn.prefix_cache import PrefixCache, default_memory_budget
from hf_relearn.relearn.prefix_plan import active_dropout, plan_prefix
from hf_relearn.relearn.trainer import RelearnTrainer
from hf_relearn.storage import RUN_FILE

ENC_DEC = dict(decoder_start_token_id=0, pad_token_id=0)


def _model(kind: str):
    if kind == "bert-gpt2":
        return _pair(32)  # EncoderDecoderModel: a 32-wide BERT encoder, a 64-wide GPT-2 decoder (enc_to_dec_proj)
    return load_model(kind, {**TINY[kind], **(ENC_DEC if kind in ("t5", "bart") else {})})


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch(seed: int = 0, rows: int = 4, length: int = 16):
    ids = torch.randint(3, 200, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize(
    "kind, block, skipped",
    [
        ("gpt2", "decoder.2", "decoder layers 0-1"),  # a decoder
        ("llama", "decoder.-1", "decoder layers 0-2"),  # rotary position embeddings recomputed live
        ("bert", "encoder.2.mlp", "encoder layers 0-1"),  # an encoder, one part of a layer
        ("t5", "decoder.2", "the encoder (encoder) and decoder layers 0-1"),  # enc-dec, decoder layer
        ("t5", "encoder.3", "encoder layers 0-2"),  # enc-dec, encoder layer (position bias passed between layers)
        ("bart", "decoder.1.cross_attention", "the encoder (model.encoder) and decoder layer 0"),
        ("bert-gpt2", "decoder.3", "the encoder (encoder) and decoder layers 0-2"),
    ],
)
def test_loss_and_gradients_with_the_cache_equal_those_without(kind, block, skipped):
    model = _model(kind).eval()  # eval-mode semantics: the cache runs frozen layers without dropout
    trainable = freeze_except(model, BlockMap(model).resolve(block))
    inputs = _batch()
    loss, grads = _loss_and_grads(model, inputs)
    plan, why = plan_prefix(model, trainable)
    assert why == "" and plan.describe() == skipped
    cache = PrefixCache()
    cache.attach(model, plan)
    rows = torch.tensor([5, 1, 7, 2])
    for _ in range(2):  # the first serving fills the rows, the second reads them back
        with cache.serving(inputs, rows, "train", n_rows=10):
            cached_loss, cached_grads = _loss_and_grads(model, inputs)
        assert cached_loss == loss.item()  # bit-identical, not merely close
        assert grads.keys() == cached_grads.keys() and grads
        for name in grads:
            assert torch.equal(cached_grads[name], grads[name]), name
    assert cache.filled_rows == 4  # computed once
    # outside `serving` the model runs its own forward; after close() nothing of the cache is left on it
    assert _loss_and_grads(model, inputs)[0] == loss
    cache.close()
    assert not any("forward" in vars(m) for m in model.modules())
    assert _loss_and_grads(model, inputs)[0] == loss


def test_the_cache_actually_skips_the_prefix():
    model = _model("gpt2").eval()
    trainable = freeze_except(model, BlockMap(model).resolve("decoder.3"))
    calls = {i: 0 for i in range(4)}
    for i, layer in enumerate(model.transformer.h):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    cache = PrefixCache()
    cache.attach(model, plan_prefix(model, trainable)[0])
    inputs, rows = _batch(), torch.arange(4)
    with cache.serving(inputs, rows, "eval", n_rows=4):  # fills: layers 0-2 run once, in eval mode
        model(**inputs)
    with cache.serving(inputs, rows, "eval", n_rows=4):
        model(**inputs)
    assert calls == {0: 1, 1: 1, 2: 1, 3: 2}


@pytest.mark.parametrize(
    "kind, block, reason",
    [
        ("gpt2", "decoder.0", "nothing below it"),
        ("bert", "embeddings", "embeddings"),
        ("albert", "encoder.0", "share weights"),
    ],
)
def test_plans_that_cannot_skip_anything_say_why(kind, block, reason):
    overrides = dict(TINY.get(kind, {}))
    if kind == "albert":
        overrides = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                         embedding_size=32, vocab_size=256)  # fmt: skip
    model = load_model(kind, overrides)
    names = freeze_except(model, block)
    plan, why = plan_prefix(model, names)
    assert plan is None and reason in why


def test_changed_inputs_and_lengths_are_refused():
    model = _model("gpt2").eval()
    cache = PrefixCache()
    cache.attach(model, plan_prefix(model, freeze_except(model, "decoder.2"))[0])
    rows = torch.arange(4)
    with cache.serving(_batch(0), rows, "train", n_rows=8):
        pass
    with pytest.raises(RelearnError, match="random masking, crops or augmentation"):
        with cache.serving(_batch(1), rows, "train", n_rows=8):  # same rows, other tokens (a random collator)
            pass
    with pytest.raises(RelearnError, match="one length"):
        with cache.serving(_batch(0, length=12), torch.arange(4, 8), "train", n_rows=8):
            pass
    with pytest.raises(RelearnError, match="built for 8"):
        with cache.serving(_batch(0), rows, "train", n_rows=9):
            pass


def test_over_the_memory_budget_the_cache_is_memory_mapped_on_disk(tmp_path):
    model = _model("t5").eval()
    trainable = freeze_except(model, BlockMap(model).resolve("decoder.3"))
    inputs = _batch()
    loss, grads = _loss_and_grads(model, inputs)
    cache = PrefixCache(max_memory_bytes=0, directory=tmp_path / "cache")
    cache.attach(model, plan_prefix(model, trainable)[0])
    for _ in range(2):
        with cache.serving(inputs, torch.arange(4), "train", n_rows=4):
            cached_loss, cached_grads = _loss_and_grads(model, inputs)
        assert cached_loss.item() == loss.item()  # bit-identical, not merely close
        for name in grads:
            assert torch.equal(cached_grads[name], grads[name]), name
    files = list((tmp_path / "cache").iterdir())
    # the encoder output and the decoder's hidden states per row on disk; T5's position biases (shaped [1, ...],
    # the same for every example) are stored once, in memory
    assert len(files) == 2 and cache.disk_bytes == sum(f.stat().st_size for f in files)
    # in memory: two [1, 2, 16, 16] float biases and the inputs each row was computed from (ids, labels: 4 x 16 int64)
    assert cache.summary()["disk_bytes"] > 0 and cache.memory_bytes == 2 * 2 * 16 * 16 * 4 + 2 * 4 * 16 * 8


def test_one_fill_serves_every_lower_boundary_when_shared():
    model = _model("gpt2").eval()
    inputs, rows = _batch(), torch.arange(4)
    shared = PrefixCache(capture_all=True)
    shared.attach(model, plan_prefix(model, freeze_except(model, "decoder.3"))[0])
    with shared.serving(inputs, rows, "train", n_rows=4):
        model(**inputs)
    assert shared.filled_rows == 4
    for block in ("decoder.2", "decoder.1"):  # other runs over the same base: no prefix forward at all
        trainable = freeze_except(model, block)
        loss, grads = _loss_and_grads(model, inputs)
        shared.attach(model, plan_prefix(model, trainable)[0])
        with shared.serving(inputs, rows, "train", n_rows=4):
            cached_loss, cached_grads = _loss_and_grads(model, inputs)
        shared.detach()
        assert cached_loss.item() == loss.item()  # bit-identical, not merely close
        for name in grads:
            assert torch.equal(cached_grads[name], grads[name]), name
    assert shared.filled_rows == 4


def test_dropout_in_the_prefix_is_found():
    model = _model("gpt2")
    assert any("attn_dropout" in d for d in active_dropout(model, ["transformer.h.0"]))
    quiet = load_model("gpt2", {**TINY["gpt2"], "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0})
    assert active_dropout(quiet, ["transformer.h.0", "transformer.h.1"]) == []


NO_DROPOUT = "n_layer=4,n_embd=64,n_head=2,n_positions=128,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"


@pytest.fixture(scope="module")
def quiet_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2-no-dropout")
    base_run(out, "gpt2", NO_DROPOUT, steps=150, generated_chars=60_000)
    return out


def test_a_relearn_with_the_cache_gives_the_same_curve(quiet_base, tmp_path):
    runs = {}
    for mode in ("false", "auto"):
        # 60 steps x 16 rows is more than the ~800 training rows: the second epoch is served from the cache
        runs[mode] = relearn_run(
            tmp_path / mode, quiet_base, "decoder.2", prefix_cache=mode, max_steps=60, stop_at_recovery=False
        )
    off, on = runs["false"], runs["auto"]
    assert off.prefix_cache == {"enabled": False, "reason": "prefix_cache=false"}
    info = on.prefix_cache
    assert info["enabled"] and info["skipped"] == "decoder layers 0-1" and info["splits"] == ["eval", "train"]
    n_train = info["rows_filled"]["train"]
    assert 0 < n_train < 60 * 16 and info["prefix_forwards"] == n_train + info["rows_filled"]["eval"]
    assert len(on.curve) == len(off.curve) == 7
    for (s1, v1), (s2, v2) in zip(on.curve, off.curve, strict=True):
        assert s1 == s2 and v1 == v2  # bit-identical: the cached rows are the very tensors the prefix computes
    assert on.train_curve == off.train_curve and on.frozen_unchanged and on.steps_to_recover == off.steps_to_recover
    saved = json.loads((tmp_path / "auto" / "relearn_result.json").read_text())
    assert saved["prefix_cache"]["enabled"] is True


def test_auto_stays_off_where_it_would_not_be_exact_and_true_refuses(gpt2_base, tmp_path):
    # the default GPT-2 has dropout 0.1 in its layers: auto caches evaluation rows only (eval mode has no dropout
    # anyway), says why training rows are not cached, and every number equals a run without the cache
    result = relearn_run(tmp_path / "auto", gpt2_base, "decoder.2", max_steps=10, eval_steps=5)
    info = result.prefix_cache
    assert info["enabled"] and info["splits"] == ["eval"] and "dropout" in info["train_rows"]
    off = relearn_run(tmp_path / "off", gpt2_base, "decoder.2", max_steps=10, eval_steps=5, prefix_cache="false")
    assert result.curve == off.curve and result.train_curve == off.train_curve and len(off.curve) == 3
    # true accepts eval-mode frozen layers
    result = relearn_run(tmp_path / "true", gpt2_base, "decoder.2", max_steps=10, prefix_cache="true")
    assert result.prefix_cache["enabled"] and result.prefix_cache["splits"] == ["eval", "train"]  # through dropout
    with pytest.raises(RelearnError, match="cannot be exact here: trainable=all"):
        relearn_run(tmp_path / "all", gpt2_base, "decoder.2", max_steps=10, prefix_cache="true", trainable="all")
    with pytest.raises(RelearnError, match="nothing below it to cache"):
        relearn_run(tmp_path / "first", gpt2_base, "decoder.0", max_steps=10, prefix_cache="true")
    assert not (tmp_path / "all").exists() and not (tmp_path / "first").exists()  # refused: nothing written
    with pytest.raises(RelearnError, match="prefix_cache must be one of"):
        relearn_run(tmp_path / "bad", gpt2_base, "decoder.2", max_steps=10, prefix_cache="yes please")


def test_a_study_shares_one_cache_per_base_and_fills_it_once(tmp_path):
    from test_study import TINY_RECIPE

    from hf_relearn.storage import read_results
    from hf_relearn.study.recipe import Recipe
    from hf_relearn.study.run import run_study

    recipe = {**TINY_RECIPE, "name": "cached"}
    recipe["base"] = {**recipe["base"], "config_overrides": {**recipe["base"]["config_overrides"], "n_layer": 3,
                      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}  # fmt: skip
    recipe["sweep"] = {"blocks": "all_layers", "trainable": ["block"], "seeds": [0]}
    # every run trains the full 40 steps (no early stop) on the same rows, so later runs meet only cached rows
    recipe["relearn"] = {**recipe["relearn"], "max_steps": 40, "stop_at_recovery": False}
    run_study(Recipe.from_dict(recipe), tmp_path, progress=False)
    rows = {r["block"]: r for r in read_results(tmp_path / "results.csv")}
    info = {block: r["prefix_cache"] for block, r in rows.items()}
    assert not info["decoder.0"]["enabled"] and "nothing below it" in info["decoder.0"]["reason"]
    top, middle = info["decoder.2"], info["decoder.1"]
    assert top["enabled"] and middle["enabled"] and top["skipped"] == "decoder layers 0-1"
    # the top layer ran first and its fills also stored layer 0's output: the middle run computed no prefix at all
    assert top["prefix_forwards"] > 0 and middle["prefix_forwards"] == 0
    assert all(r["frozen_unchanged"] for r in rows.values())


def test_the_cli_states_the_cache_size_first_and_reports_what_it_did(quiet_base, tmp_path, capsys, caplog):
    import logging

    from hf_relearn.cli.main import main

    caplog.set_level(logging.INFO, logger="hf_relearn")
    argv = ["relearn", "--model", str(quiet_base), "--original_run", str(quiet_base), "--block", "decoder.3",
            "--max_steps", "10", "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"]  # fmt: skip
    assert main(argv) == 0
    sizes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefix cache: output of")]
    # one line per stored output and split, before any row is stored: hidden states of 64 tokens x 64 wide, float32
    assert sizes and all("transformer.h.2 for " in m and "x 16.0 KiB = " in m and "in memory" in m for m in sizes)
    out = capsys.readouterr().out
    assert "prefix cache: skipped decoder layers 0-2 for training and evaluation rows; computed it for " in out
    assert main([*argv[:-4], "--output_dir", str(tmp_path / "off"), "--prefix_cache", "false"]) == 0
    assert "prefix cache: off (prefix_cache=false)" in capsys.readouterr().out


def test_row_indices_reach_the_batch_for_hf_and_torch_datasets():
    import datasets
    from transformers import default_data_collator

    from hf_relearn.relearn.prefix_plan import ROW_COLUMN, RowCollator, with_row_index

    rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(5)]
    collate = RowCollator(default_data_collator)
    for dataset in (datasets.Dataset.from_list(rows), rows):  # a 🤗 dataset and a plain sequence of dicts
        indexed = with_row_index(dataset)
        batch = collate([indexed[i] for i in (3, 0, 4)])
        assert batch[ROW_COLUMN].tolist() == [3, 0, 4]
        assert batch["input_ids"].tolist() == [[3, 4], [0, 1], [4, 5]]
    assert with_row_index(None) is None


@pytest.mark.parametrize("budget", [None, 0])  # in memory, and memory-mapped on disk
def test_storage_is_sized_for_the_rows_a_run_can_meet_and_grows_if_more_come(budget, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="hf_relearn")
    model = _model("gpt2").eval()
    trainable = freeze_except(model, "decoder.3")
    cache = PrefixCache(max_memory_bytes=budget)
    cache.attach(model, plan_prefix(model, trainable)[0])
    batches = [(_batch(seed, rows=2), torch.tensor([7 * seed, 7 * seed + 1])) for seed in range(4)]  # rows of 1000
    expected = [_loss_and_grads(model, inputs) for inputs, _ in batches]
    for _ in range(2):
        for (inputs, rows), (loss, grads) in zip(batches, expected, strict=True):
            with cache.serving(inputs, rows, "train", n_rows=1000, capacity=2):
                cached_loss, cached_grads = _loss_and_grads(model, inputs)
            assert cached_loss.item() == loss.item()  # bit-identical, not merely close
            for name in grads:
                assert torch.equal(cached_grads[name], grads[name]), name
    messages = [r.getMessage() for r in caplog.records]
    assert any("for 2 rows x 4.0 KiB = 8.0 KiB" in m for m in messages)  # 16 tokens x 64 wide x 4 bytes per row
    assert any("growing from 2 to 4 rows" in m for m in messages) and any("from 4 to 8 rows" in m for m in messages)
    assert cache.summary()["rows_filled"] == {"train": 8} and cache.filled_rows == 8
    cache.close()


# ------------------------------------------------------------------------------------ when `auto` turns the cache on
QUIET_BERT = (
    "num_hidden_layers=3,hidden_size=32,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64,"
    "hidden_dropout_prob=0,attention_probs_dropout_prob=0"
)


def test_auto_prefix_cache_is_off_with_trainable_all(quiet_gpt2_base, tmp_path):
    # the same base and block with trainable=block gets the cache: trainable=all alone turns it off
    on = relearn_run(tmp_path / "block", quiet_gpt2_base, "decoder.2", **FEW)
    assert on.prefix_cache["enabled"] and on.prefix_cache["splits"] == ["eval", "train"]
    off = relearn_run(tmp_path / "all", quiet_gpt2_base, "decoder.2", trainable="all", **FEW)
    assert off.prefix_cache == {"enabled": False, "reason": "trainable=all: layers below the block train too"}


def test_auto_prefix_cache_is_off_with_gradient_checkpointing(quiet_gpt2_base, tmp_path):
    off = relearn_run(tmp_path / "gc", quiet_gpt2_base, "decoder.2", gradient_checkpointing=True, **FEW)
    assert off.prefix_cache["enabled"] is False
    assert off.prefix_cache["reason"].startswith("gradient checkpointing")


def test_auto_prefix_cache_keeps_only_evaluation_rows_for_mlm(tmp_path):
    # no dropout anywhere: the only reason to leave training rows out is the mlm objective's fresh masking
    base_run(
        tmp_path / "base", "bert", QUIET_BERT, objective="mlm", steps=3, generated_chars=20_000, max_eval_samples=8
    )
    result = relearn_run(tmp_path / "rl", tmp_path / "base", "encoder.2", objective="mlm", **FEW)
    info = result.prefix_cache
    assert info["enabled"] and info["splits"] == ["eval"] and "train_rows" not in info
    assert set(info["rows_filled"]) == {"eval"} and info["rows_filled"]["eval"] > 0


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_auto_prefix_cache_is_off_under_fsdp_or_deepspeed(quiet_gpt2_base, tmp_path, monkeypatch, flag):
    class Sharded(RelearnTrainer):
        """The trainer as an FSDP / DeepSpeed launch sets it up, while it plans the cache (after surgery); the
        measurements and the training around that run unsharded, as this one process can."""

        def _setup_prefix_cache(self):
            setattr(self, flag, True)
            try:
                super()._setup_prefix_cache()
            finally:
                setattr(self, flag, False)

    monkeypatch.setattr(runner_module, "RelearnTrainer", Sharded)
    result = relearn_run(tmp_path / flag, quiet_gpt2_base, "decoder.2", max_steps=2, eval_steps=1,
                         stop_at_recovery=False, per_device_train_batch_size=4)  # fmt: skip
    assert result.prefix_cache == {
        "enabled": False,
        "reason": "FSDP / DeepSpeed shard the frozen layers, so they cannot be run alone to fill the cache",
    }
    # the same run unsharded gets the cache: the sharding alone turned it off
    monkeypatch.setattr(runner_module, "RelearnTrainer", RelearnTrainer)
    plain = relearn_run(tmp_path / "plain", quiet_gpt2_base, "decoder.2", max_steps=2, eval_steps=1,
                        stop_at_recovery=False, per_device_train_batch_size=4)  # fmt: skip
    assert plain.prefix_cache["enabled"] is True


# -------------------------------------------------------------------- the size logged first, the rows a run can meet
def test_prefix_cache_size_is_logged_before_the_first_row_is_stored(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="hf_relearn")
    model = load_model("gpt2", TINY["gpt2"]).eval()
    cache = PrefixCache()
    cache.attach(model, plan_prefix(model, freeze_except(model, "decoder.3"))[0])
    events = []

    class Spy(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("prefix cache: output of"):
                path = msg.split()[4]
                data = cache.splits["train"]
                # at the moment of the message no row of that output is stored (its store does not exist yet)
                events.append(("log", path, path in data.captures, cache.filled_rows))

    own_store = PrefixCache._store

    def store(self, data, path, out, slots, rows):
        own_store(self, data, path, out, slots, rows)
        events.append(("stored", path, bool(data.captures[path].filled[rows].all()), None))

    monkeypatch.setattr(PrefixCache, "_store", store)
    spy = Spy()
    logging.getLogger("hf_relearn").addHandler(spy)
    try:
        for seed in range(2):
            with cache.serving(_batch(seed, rows=2), torch.tensor([2 * seed, 2 * seed + 1]), "train", n_rows=4):
                model(**_batch(seed, rows=2))
    finally:
        logging.getLogger("hf_relearn").removeHandler(spy)
        cache.close()
    assert events[0] == ("log", "transformer.h.2", False, 0)
    assert events[1] == ("stored", "transformer.h.2", True, None)
    assert [e[0] for e in events] == ["log", "stored", "stored"]  # stated once, before the first row
    assert any("for 4 rows x 4.0 KiB = 16.0 KiB in memory" in r.getMessage() for r in caplog.records)


class StopAfter(TrainerCallback):
    """End training after ``steps`` optimizer steps (enough to size and fill the training store)."""

    def __init__(self, steps: int = 1):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True


ROWS_LOGGED = re.compile(r"^prefix cache: output of (\S+) for (\d+) rows x ")


@pytest.mark.parametrize(
    "max_steps, accumulation, expected",
    [(20, 1, 80), (20, 2, 160), (10_000, 1, None)],  # None: the whole training set (fewer than 10,000 x 4 rows)
    ids=["steps-x-batch", "x-accumulation", "whole-set"],
)
def test_training_storage_is_sized_for_the_rows_the_run_can_meet(quiet_gpt2_base, tmp_path, caplog, max_steps,
                                                                 accumulation, expected):  # fmt: skip
    train_rows = json.loads((quiet_gpt2_base / RUN_FILE).read_text())["train_examples"]
    assert 160 < train_rows < 10_000 * 4  # so each case tells the formula's terms apart
    caplog.set_level(logging.INFO, logger="hf_relearn")
    result = relearn_run(
        tmp_path / "rl", quiet_gpt2_base, "decoder.2", max_steps=max_steps, gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=4, eval_steps=1000, stop_at_recovery=False, callbacks=[StopAfter()],
    )  # fmt: skip
    assert result.prefix_cache["enabled"] and result.prefix_cache["splits"] == ["eval", "train"]
    logged = [ROWS_LOGGED.match(r.getMessage()) for r in caplog.records if r.name.startswith("hf_relearn")]
    sizes = [int(m.group(2)) for m in logged if m]
    # the evaluation rows are stored first (the after-reset measurement): all 8; then the training rows
    assert sizes == [8, expected or train_rows]
    assert result.prefix_cache["rows_filled"] == {"eval": 8, "train": 4 * accumulation}


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc (Linux)")
def test_memory_is_committed_only_for_rows_met():
    """Storage sized for 16,000 rows (256 MiB) holds, after 4 rows are met, about 4 rows' worth of resident memory."""
    model = load_model("gpt2", TINY["gpt2"]).eval()
    cache = PrefixCache(max_memory_bytes=2**31)
    cache.attach(model, plan_prefix(model, freeze_except(model, "decoder.3"))[0])
    with torch.no_grad():
        model(**_batch(9, rows=2, length=64))  # the forward's own buffers, before measuring
        before = _rss_bytes()
        for seed in range(2):
            with cache.serving(
                _batch(seed, rows=2, length=64), torch.tensor([2 * seed, 2 * seed + 1]), "train", 16_000
            ):
                model(**_batch(seed, rows=2, length=64))
        grown = _rss_bytes() - before
    store = cache.splits["train"].captures["transformer.h.2"]
    allocated = sum(t.numel() * t.element_size() for t in store.tensors)
    cache.close()
    assert allocated >= 16_000 * 64 * 64 * 4  # 16,000 rows x 64 tokens x 64 wide x float32 = 250 MiB
    assert grown < 16 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB for 4 rows"


# ---------------------------------------------------------------------------------- memory budget and on-disk stores
def test_default_memory_budget_is_a_quarter_of_the_free_memory(monkeypatch):
    values = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(prefix_cache_module.os, "sysconf", lambda name: values[name])
    assert default_memory_budget() == 1000 * 4096 // 4
    assert PrefixCache().max_memory_bytes == 1000 * 4096 // 4
    assert PrefixCache(max_memory_bytes=5).max_memory_bytes == 5


def test_a_cache_over_budget_goes_to_temporary_files_that_close_removes():
    model = load_model("gpt2", TINY["gpt2"]).eval()
    trainable = freeze_except(model, "decoder.3")
    inputs, rows = _batch(0, rows=2), torch.tensor([0, 1])
    with torch.no_grad():
        expected = model(**inputs).logits
    cache = PrefixCache(max_memory_bytes=1)
    cache.attach(model, plan_prefix(model, trainable)[0])
    for _ in range(2):  # fill, then serve from the files
        with cache.serving(inputs, rows, "train", n_rows=2), torch.no_grad():
            assert torch.equal(model(**inputs).logits, expected)
    folder = Path(cache._tmp.name)
    files = list(folder.iterdir())
    assert cache.disk_bytes == 2 * 16 * 64 * 4 > 0  # 2 rows x 16 tokens x 64 wide x float32
    assert files and sum(f.stat().st_size for f in files) == cache.disk_bytes
    assert folder.name.startswith("hf-relearn-prefix-")
    cache.close()
    assert not folder.exists() and not any(f.exists() for f in files)


class FilesDuringTraining(TrainerCallback):
    """The files under ``folder`` matching ``pattern`` at the end of each training step."""

    def __init__(self, folder: Path, pattern: str):
        self.folder, self.pattern, self.seen = folder, pattern, set()

    def on_step_end(self, args, state, control, **kwargs):
        self.seen |= {p for p in self.folder.glob(self.pattern) if p.is_file()}


def test_a_zero_memory_budget_puts_the_cache_on_disk_and_the_run_removes_it(quiet_gpt2_base, tmp_path, monkeypatch):
    # every cache the runs make is kept alive here, so what removes its files is the run, not the garbage collector
    # (a TemporaryDirectory left behind is removed when it is collected)
    caches: list[PrefixCache] = []

    class Kept(PrefixCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(trainer_prefix, "PrefixCache", Kept)
    run = dict(max_steps=4, eval_steps=2, logging_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)
    plain = relearn_run(tmp_path / "plain", quiet_gpt2_base, "decoder.2", prefix_cache="false", **run)
    assert plain.prefix_cache == {"enabled": False, "reason": "prefix_cache=false"}

    # --prefix_cache_dir: the stores are files in that folder while the run lasts, none after it
    folder = tmp_path / "cache-dir"
    watch = FilesDuringTraining(folder, "*")
    given = relearn_run(tmp_path / "given", quiet_gpt2_base, "decoder.2", callbacks=[watch], prefix_cache_memory_gb=0,
                        prefix_cache_dir=str(folder), **run)  # fmt: skip
    info = given.prefix_cache
    assert info["enabled"] and info["splits"] == ["eval", "train"] and info["disk_bytes"] > 0
    assert len(watch.seen) >= 2  # one store of evaluation rows, one of training rows
    assert list(folder.iterdir()) == []  # the folder itself stays (it is the user's)

    # no folder given: a temporary one (hf-relearn-prefix-*), removed at the end
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    watch = FilesDuringTraining(temp, "hf-relearn-prefix-*/*")
    default = relearn_run(
        tmp_path / "default", quiet_gpt2_base, "decoder.2", callbacks=[watch], prefix_cache_memory_gb=0, **run
    )
    assert default.prefix_cache["disk_bytes"] == info["disk_bytes"] and len(watch.seen) >= 2
    assert list(temp.iterdir()) == []
    assert len(caches) == 2 and caches[1].max_memory_bytes == 0

    # served from disk, the run is the run without the cache
    for cached in (given, default):
        assert cached.curve == plain.curve and len(plain.curve) == 3
        assert cached.train_curve == plain.train_curve and len(plain.train_curve) == 4
        assert cached.after_reset_eval_loss == plain.after_reset_eval_loss
