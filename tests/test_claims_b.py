"""README claims backed here: the prefix cache's `auto` conditions, its size log, memory budget and on-disk stores;
the distill teacher's cached outputs; encoder-swap details (zeroed cross-attention, refused encoders, a dropped
projection); a push with a rejected token."""

import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub, fake_hub_endpoint
from test_relearn import base_run, relearn_run
from test_swap import _native, _pair
from tiny import TINY
from transformers import AutoConfig, BertForMaskedLM, BertModel, GPT2LMHeadModel, GPT2Model

from hf_relearn import RelearnError
from hf_relearn import prefix_cache as prefix_cache_module
from hf_relearn.metrics import Teacher
from hf_relearn.modeling import load_model
from hf_relearn.prefix_cache import PrefixCache, default_memory_budget
from hf_relearn.prefix_plan import plan_prefix
from hf_relearn.surgery import freeze_except
from hf_relearn.swap import check_forward_backward, swap_encoder

QUIET_GPT2 = "n_layer=3,n_embd=32,n_head=2,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"
QUIET_BERT = (
    "num_hidden_layers=3,hidden_size=32,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64,"
    "hidden_dropout_prob=0,attention_probs_dropout_prob=0"
)
FEW = dict(max_steps=2, eval_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)


def _batch(seed: int = 0, rows: int = 2, length: int = 16) -> dict:
    ids = torch.randint(3, 200, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------ 1. prefix cache `auto`
@pytest.fixture(scope="module")
def quiet_gpt2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quiet-gpt2")
    base_run(out, "gpt2", QUIET_GPT2, steps=3, generated_chars=20_000, max_eval_samples=8)
    return out


def test_auto_prefix_cache_is_off_with_trainable_all(quiet_gpt2, tmp_path):
    # the same base and block with trainable=block gets the cache: trainable=all alone turns it off
    on = relearn_run(tmp_path / "block", quiet_gpt2, "decoder.2", **FEW)
    assert on.prefix_cache["enabled"] and on.prefix_cache["splits"] == ["eval", "train"]
    off = relearn_run(tmp_path / "all", quiet_gpt2, "decoder.2", trainable="all", **FEW)
    assert off.prefix_cache == {"enabled": False, "reason": "trainable=all: layers below the block train too"}


def test_auto_prefix_cache_is_off_with_gradient_checkpointing(quiet_gpt2, tmp_path):
    off = relearn_run(tmp_path / "gc", quiet_gpt2, "decoder.2", gradient_checkpointing=True, **FEW)
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


# ------------------------------------------------------------------------------------ 2. distill teacher
def test_teacher_computes_evaluation_rows_once_within_its_budget():
    model = load_model("gpt2", TINY["gpt2"])
    calls = []
    own = model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return own(*args, **kwargs)

    model.forward = counted
    inputs = {"input_ids": _batch(0)["input_ids"]}
    rows = torch.tensor([4, 9])
    one_batch = 2 * 16 * 256 * 4  # logits: 2 rows x 16 tokens x 256 vocab x float32
    assert Teacher(model).max_bytes == 1 << 30  # README: "up to 1 GiB"
    teacher = Teacher(model, max_bytes=10 * one_batch)
    first = teacher.outputs(inputs, rows)
    second = teacher.outputs(inputs, rows)
    assert len(calls) == 1 and torch.equal(first.logits, second.logits)
    assert teacher.bytes == one_batch
    # the same rows at another length are computed again
    short = {"input_ids": inputs["input_ids"][:, :8]}
    teacher.outputs(short, rows)
    assert len(calls) == 2 and calls[-1] == (2, 8)
    assert teacher.bytes == one_batch // 2  # the shorter outputs replace the longer ones in the count too
    # no rows given: always computed
    teacher.outputs(inputs)
    assert len(calls) == 3
    # beyond max_bytes nothing more is stored: those rows are computed every time
    small = Teacher(model, max_bytes=one_batch)
    calls.clear()
    small.outputs(inputs, rows)  # fits exactly
    other = {"input_ids": _batch(1)["input_ids"]}
    for _ in range(2):
        small.outputs(other, torch.tensor([1, 2]))
    assert len(calls) == 3 and small.bytes == one_batch <= small.max_bytes and sorted(small.rows) == [4, 9]
    small.outputs(inputs, rows)
    assert len(calls) == 3  # the stored rows are still served


# ------------------------------------------------------------------------------------ 3. size logged first
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
            with cache.serving(_batch(seed), torch.tensor([2 * seed, 2 * seed + 1]), "train", n_rows=4):
                model(**_batch(seed))
    finally:
        logging.getLogger("hf_relearn").removeHandler(spy)
        cache.close()
    assert events[0] == ("log", "transformer.h.2", False, 0)
    assert events[1] == ("stored", "transformer.h.2", True, None)
    assert [e[0] for e in events] == ["log", "stored", "stored"]  # stated once, before the first row
    assert any("for 4 rows x 4.0 KiB = 16.0 KiB in memory" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ 4. budget, disk
def test_default_memory_budget_is_a_quarter_of_the_free_memory(monkeypatch):
    values = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(prefix_cache_module.os, "sysconf", lambda name: values[name])
    assert default_memory_budget() == 1000 * 4096 // 4
    assert PrefixCache().max_memory_bytes == 1000 * 4096 // 4
    assert PrefixCache(max_memory_bytes=5).max_memory_bytes == 5


def test_a_cache_over_budget_goes_to_temporary_files_that_close_removes():
    model = load_model("gpt2", TINY["gpt2"]).eval()
    trainable = freeze_except(model, "decoder.3")
    inputs, rows = _batch(0), torch.tensor([0, 1])
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


# ------------------------------------------------------------------------------------ 5-7. encoder swaps
def test_zeroed_cross_attention_makes_the_decoder_ignore_the_encoder_input():
    model = _native("t5", 64)
    report = swap_encoder(model, _native("t5", 64, seed=1).get_encoder(), cross_attention="zero")
    assert report.cross_attention == "zero"
    model.eval()
    dec = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(5))
    a = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(6))
    b = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        la = model(input_ids=a, decoder_input_ids=dec).logits
        lb = model(input_ids=b, decoder_input_ids=dec).logits
        enc_a = model.get_encoder()(input_ids=a).last_hidden_state
        enc_b = model.get_encoder()(input_ids=b).last_hidden_state
    assert not torch.equal(enc_a, enc_b)  # the encoder does see the difference
    assert torch.equal(la, lb)  # bit-identical: the decoder does not
    # with the default reset the decoder does read the encoder
    reset = _native("t5", 64)
    swap_encoder(reset, _native("t5", 64, seed=1).get_encoder())
    reset.eval()
    with torch.no_grad():
        assert not torch.equal(
            reset(input_ids=a, decoder_input_ids=dec).logits, reset(input_ids=b, decoder_input_ids=dec).logits
        )


def _bert(cls=BertModel, **kw):
    return cls(AutoConfig.for_model("bert", **TINY["bert"], **kw))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GPT2Model(AutoConfig.for_model("gpt2", **TINY["gpt2"], is_decoder=True)), "is a decoder"),
        (lambda: _bert(is_decoder=True), "is a decoder"),
        (lambda: _bert(BertForMaskedLM), "has an LM head"),
        (
            lambda: GPT2LMHeadModel(AutoConfig.for_model("gpt2", **TINY["gpt2"])),
            "is not an encoder",
        ),  # a causal-only architecture, head or not
    ],
    ids=["gpt2-is_decoder", "bert-is_decoder", "bert-mlm-head", "gpt2-lm-head"],
)
@pytest.mark.parametrize("target", ["pair", "t5"])
def test_a_decoder_or_a_model_with_an_lm_head_is_refused_as_encoder(make, match, target):
    model = _pair(64) if target == "pair" else _native("t5", 64)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    new = make()
    with pytest.raises(RelearnError, match=match) as err:
        swap_encoder(model, new)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"new encoder {type(new).__name__} ")
    after = model.state_dict()  # refused before touching the model
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_a_plain_gpt2_model_is_refused_as_encoder():
    model = _pair(64)
    try:
        swap_encoder(model, GPT2Model(AutoConfig.for_model("gpt2", **TINY["gpt2"])))
    except RelearnError as err:
        assert "is not an encoder" in str(err)
    else:
        raise AssertionError("GPT2Model, a causal decoder stack, was accepted as a new encoder")


def test_same_width_swap_drops_an_existing_enc_to_dec_proj(tmp_path):
    model = _pair(32)  # 32-wide BERT encoder, 64-wide GPT-2 decoder: the pair has enc_to_dec_proj
    assert model.enc_to_dec_proj.in_features == 32
    report = swap_encoder(model, BertModel(AutoConfig.for_model("bert", **TINY["bert"]), add_pooling_layer=False))
    assert report.adapter == "none" and not hasattr(model, "enc_to_dec_proj")
    assert not any(n.startswith("enc_to_dec_proj") for n in model.state_dict())
    assert not any("enc_to_dec_proj" in n for n in report.reset_tensors + report.trainable)
    assert torch.isfinite(check_forward_backward(model, 256))
    # and it saves and reloads as it is
    from transformers import EncoderDecoderModel

    model.save_pretrained(tmp_path)
    reloaded = EncoderDecoderModel.from_pretrained(tmp_path)
    assert not hasattr(reloaded, "enc_to_dec_proj")


# ------------------------------------------------------------------------------------ 9. push with a bad token
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    base_run(root / "base", "gpt2", QUIET_GPT2, steps=3, generated_chars=20_000, max_eval_samples=8)
    relearn_run(root / "run", root / "base", "decoder.1", **FEW)
    return root / "run"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_a_push_with_a_rejected_token_gives_one_error_and_keeps_everything_local(tiny_run, tmp_path):
    from hf_relearn.hub import push

    before = _digest(tiny_run)
    # the fake Hub accepts any bearer token, so the Hub's answer to a bad one (401 on the first call) is injected
    with FakeHub() as server, fake_hub_endpoint(server, token="hf_bad", cache_dir=tmp_path / "cache"):
        server.fail_status, server.fail_next, server.fail_match = 401, 100, "/api/"
        with pytest.raises(RelearnError) as err:
            push(tiny_run, "me/denied", token="hf_bad")
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("push to me/denied failed (the Hub answered with an error): HfHubHTTPError: ")
        assert "401" in message and "Nothing local was lost" in message and "run the same command again" in message
        assert "me/denied" not in server.meta  # nothing reached the Hub: not even the repo was made
        staged = tiny_run / "hub" / "full"
        assert str(staged) in message and (staged / "model.safetensors").exists() and (staged / "README.md").exists()
        after = _digest(tiny_run)
        assert {k: v for k, v in after.items() if not k.startswith("hub/")} == {
            k: v for k, v in before.items() if not k.startswith("hub/")
        }
        # a good token: the same command completes
        server.fail_next = 0
        push(tiny_run, "me/denied", token="hf_good")
        assert set(server.files("me/denied")) == set(_digest(staged))
    assert os.environ.get("HF_TOKEN") != "hf_bad"


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
        model(**_batch(9, length=64))  # the forward's own buffers, before measuring
        before = _rss_bytes()
        for seed in range(2):
            with cache.serving(_batch(seed, length=64), torch.tensor([2 * seed, 2 * seed + 1]), "train", 16_000):
                model(**_batch(seed, length=64))
        grown = _rss_bytes() - before
    store = cache.splits["train"].captures["transformer.h.2"]
    allocated = sum(t.numel() * t.element_size() for t in store.tensors)
    cache.close()
    assert allocated >= 16_000 * 64 * 64 * 4  # 16,000 rows x 64 tokens x 64 wide x float32 = 250 MiB
    assert grown < 16 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB for 4 rows"
