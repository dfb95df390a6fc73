"""Reset exactly, freeze the rest, prove it: on nine architectures and a real pretrained checkpoint."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from tiny import TINY, tiny

import hf_relearn
from hf_relearn import BlockMap, RelearnError
from hf_relearn.cli.main import main
from hf_relearn.data.tokenization import get_tokenizer
from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import changed_tensors, check_frozen_unchanged, fingerprint, freeze_except, reset


def _trained(model):
    """Stand-in for training: move every tensor away from its init distribution."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7).add_(0.05)
    return model


def _roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    return type(model).from_pretrained(tmp_path / "ckpt")


def assert_same_distribution(model, reference, names):
    """Per-tensor mean/std of ``model`` match ``reference`` (a model freshly built from the same config)."""
    ours, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for n in names:
        if n not in ours:
            continue  # a tied alias
        a, b = ours[n].double(), ref[n].double()
        sd = b.std().item() if b.numel() > 1 else 0.0
        tol = 0.08 * sd + 1e-7
        assert abs(a.mean().item() - b.mean().item()) <= tol + 4 * sd / math.sqrt(a.numel()), n
        assert abs((a.std().item() if a.numel() > 1 else 0.0) - sd) <= tol, n


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_reset_changes_exactly_the_block_to_the_from_scratch_distribution(model_type, tmp_path):
    model = _roundtrip(_trained(tiny(model_type, seed=0)), tmp_path)  # loaded: every tensor flagged initialised
    stack = list(BlockMap(model).stacks)[-1]
    before = fingerprint(model)
    report = reset(model, f"{stack}.1", seed=7)
    assert set(changed_tensors(before, fingerprint(model))) == set(report.tensors)
    assert report.num_tensors == len(BlockMap(model).resolve(f"{stack}.1").params)
    assert_same_distribution(model, tiny(model_type, seed=1), report.tensors)


@pytest.mark.parametrize("model_type", ["gpt2", "t5", "bert"])
def test_reset_of_a_part_in_memory(model_type):
    model = _trained(tiny(model_type, seed=0))
    stack = list(BlockMap(model).stacks)[-1]
    before = fingerprint(model)
    report = reset(model, f"{stack}.-1.mlp", seed=3)
    assert set(changed_tensors(before, fingerprint(model))) == set(report.tensors)
    assert all(
        ".mlp." in n or ".intermediate." in n or ".output." in n or "DenseReluDense" in n for n in report.tensors
    )
    assert_same_distribution(model, tiny(model_type, seed=1), report.tensors)


def test_parent_set_scaled_inits_are_applied(tmp_path):
    gpt2 = _roundtrip(_trained(tiny("gpt2", n_embd=128)), tmp_path)
    reset(gpt2, "decoder.2")
    std = gpt2.transformer.h[2].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)  # not 0.02: GPT2MLP scales its c_proj
    assert gpt2.transformer.h[2].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)

    t5 = _roundtrip(_trained(tiny("t5")), tmp_path / "t5")
    reset(t5, "decoder.1")
    q = t5.decoder.block[1].layer[0].SelfAttention.q.weight
    assert q.std().item() == pytest.approx((64 * 32) ** -0.5, rel=0.05)  # T5Attention sets it, not 1.0
    wo = t5.decoder.block[1].layer[2].DenseReluDense.wo.weight
    assert wo.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert torch.equal(t5.decoder.block[1].layer[0].layer_norm.weight, torch.ones(64))


def test_the_naive_reset_silently_does_nothing_in_transformers_v5(tmp_path):
    """The trap our reset exists for; if this starts failing, transformers changed its init flags."""
    model = _roundtrip(_trained(tiny("gpt2")), tmp_path)
    before = fingerprint(model)
    model.transformer.h[1].apply(model._init_weights)
    assert changed_tensors(before, fingerprint(model)) == []


def test_reset_is_seeded_and_leaves_global_rng_alone():
    a, b, c = (_trained(tiny("llama")) for _ in range(3))
    state = torch.random.get_rng_state()
    reset(a, "decoder.2", seed=11)
    assert torch.equal(state, torch.random.get_rng_state())
    reset(b, "decoder.2", seed=11)
    reset(c, "decoder.2", seed=12)
    wa, wb, wc = (m.model.layers[2].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_zero_init_makes_a_pre_ln_layer_the_identity(model_type):
    model = _trained(tiny(model_type)).eval()
    report = reset(model, "decoder.1", init="zero")
    assert report.zeroed and all(("c_proj" in n) or ("o_proj" in n) or ("down_proj" in n) for n in report.zeroed)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[2], hidden[1], rtol=0, atol=0)
    assert not torch.equal(hidden[3], hidden[2])
    with pytest.raises(RelearnError, match="init='zero' needs a block with attention or MLP output projections"):
        reset(model, "decoder.1.norms", init="zero")


def test_checkpoint_init_copies_the_block_from_another_checkpoint(tmp_path):
    donor = tiny("gpt2", seed=5)
    donor.save_pretrained(tmp_path / "step0")
    model = _trained(tiny("gpt2", seed=0))
    before = fingerprint(model)
    report = reset(model, "decoder.2", init=f"checkpoint:{tmp_path / 'step0'}")
    assert set(changed_tensors(before, fingerprint(model))) == set(report.tensors)
    for n, p in model.transformer.h[2].named_parameters():
        assert torch.equal(p, dict(donor.transformer.h[2].named_parameters())[n])

    tiny("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(RelearnError, match="is a 'llama' checkpoint; the model is 'gpt2'"):
        reset(model, "decoder.2", init=f"checkpoint:{tmp_path / 'llama'}")
    with pytest.raises(RelearnError, match="no config.json"):
        reset(model, "decoder.2", init=f"checkpoint:{tmp_path / 'nothing'}")
    tiny("gpt2", n_embd=32).save_pretrained(tmp_path / "narrow")
    with pytest.raises(RelearnError, match="has shape"):
        reset(model, "decoder.2", init=f"checkpoint:{tmp_path / 'narrow'}")


def test_shared_weights_are_refused_unless_allowed():
    gpt2 = _trained(tiny("gpt2"))
    before = fingerprint(gpt2)
    with pytest.raises(RelearnError, match="transformer.wte.weight is the same tensor"):
        reset(gpt2, "head")
    assert changed_tensors(before, fingerprint(gpt2)) == []
    report = reset(gpt2, "head", allow_shared=True)
    assert report.shared_with == ["transformer.wte.weight"] and "tied tensors reset too" in report.notes[0]

    from hf_relearn.model.modeling import load_model

    albert = load_model(
        "albert",
        dict(
            num_hidden_layers=4,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            embedding_size=16,
        ),
    )
    with pytest.raises(RelearnError, match="applied 4 times"):
        reset(albert, "encoder.0")
    assert "applied 4 times" in reset(albert, "encoder.0", allow_shared=True).notes[0]


def test_meta_device_and_bad_init_are_refused():
    from transformers import AutoConfig, GPT2LMHeadModel

    with torch.device("meta"):
        meta = GPT2LMHeadModel(AutoConfig.for_model("gpt2", **TINY["gpt2"]))
    with pytest.raises(RelearnError, match="meta device"):
        reset(meta, "decoder.1")
    with pytest.raises(RelearnError, match="unknown init 'gaussian'"):
        reset(tiny("gpt2"), "decoder.1", init="gaussian")


def _nan_init(self, module):
    """A model's ``_init_weights`` that writes NaN into every tensor it is allowed to initialise."""
    for p in module.parameters(recurse=False):
        if not getattr(p, "_is_hf_initialized", False):
            p.data.fill_(float("nan"))


def _give_nan_init(model, monkeypatch):
    """``_nan_init`` for the model and its sub-models (each initialises its own modules: GPT2Model, BertModel)."""
    from transformers import PreTrainedModel

    for cls in {type(m) for m in model.modules() if isinstance(m, PreTrainedModel)}:
        monkeypatch.setattr(cls, "_init_weights", _nan_init)


def test_a_reset_left_nan_by_the_model_init_is_refused_and_the_block_restored(monkeypatch):
    """The reset fills the block with NaN before the model's own init; what is still NaN after it and after the
    modules' reset_parameters() (GPT-2's Conv1D has none) is refused, never trained."""
    model = _trained(tiny("gpt2"))
    before = fingerprint(model)
    _give_nan_init(model, monkeypatch)
    still = ["attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.bias", "attn.c_proj.weight", "mlp.c_fc.bias"]
    message = "GPT2LMHeadModel's own initialisation does not cover "
    message += ", ".join(f"transformer.h.1.{n}" for n in still) + " ..., and no reset_parameters() is available"
    with pytest.raises(RelearnError, match=f"^{re.escape(message)}"):
        reset(model, "decoder.1")
    assert changed_tensors(before, fingerprint(model)) == []  # restored bit for bit, NaN nowhere
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_reset_left_nan_by_the_model_init_falls_back_on_reset_parameters(monkeypatch):
    model = _trained(tiny("bert"))
    before = fingerprint(model)
    _give_nan_init(model, monkeypatch)
    report = reset(model, "encoder.1", seed=3)
    layer = "bert.encoder.layer.1"
    parts = ["attention.output.LayerNorm", "attention.output.dense", "attention.self.key", "attention.self.query"]
    parts += ["attention.self.value", "intermediate.dense", "output.LayerNorm", "output.dense"]
    assert report.fallback_reset_parameters == [f"{layer}.{p}" for p in parts]
    assert set(changed_tensors(before, fingerprint(model))) == set(report.tensors)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.bert.encoder.layer[1].output.LayerNorm.weight, torch.ones(64))  # its constructor init


def test_freeze_except_and_fingerprint_prove_the_frozen_weights_did_not_move():
    model = _trained(tiny("bert"))
    reset(model, "encoder.2")
    trainable = freeze_except(model, "encoder.2")
    assert set(trainable) == set(BlockMap(model).resolve("encoder.2").params)
    assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())
    before = fingerprint(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 256, (4, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert check_frozen_unchanged(before, model, trainable) == []
    assert set(changed_tensors(before, fingerprint(model))) <= set(trainable)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias[3] += 1e-6
    with pytest.raises(RelearnError, match=r"1 frozen tensor\(s\) changed: bert.encoder.layer.0.output.dense.bias"):
        check_frozen_unchanged(before, model, trainable)


def test_real_pretrained_minilm(minilm_dir, tmp_path):
    from transformers import AutoConfig, BertModel

    from hf_relearn.model.modeling import load_model

    model = load_model(str(minilm_dir))
    assert type(model).__name__ == "BertModel"
    bmap = BlockMap(model)
    assert len(bmap.stacks["encoder"].layers) == 6 and not bmap.head
    before = fingerprint(model)
    report = reset(model, "encoder.3", seed=0)
    assert set(changed_tensors(before, fingerprint(model))) == set(report.tensors) and report.num_tensors == 16
    fresh = BertModel(AutoConfig.from_pretrained(minilm_dir))
    assert_same_distribution(model, fresh, report.tensors)
    trainable = freeze_except(model, "encoder.3")
    assert check_frozen_unchanged(before, model, trainable) == []


def test_cli_reset_saves_model_and_surgery_json(tmp_path, capsys):
    out = tmp_path / "surgered"
    overrides = "n_layer=4,n_embd=64,n_head=2,vocab_size=256,n_positions=128"
    assert (
        main(
            [
                "reset",
                "gpt2",
                "decoder.-1.attention",
                "--config-overrides",
                overrides,
                "--output-dir",
                str(out),
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert "reset decoder.3.attention (scratch, seed 3): 4 tensors" in capsys.readouterr().out
    assert (out / "model.safetensors").exists()
    info = json.loads((out / "surgery.json").read_text())
    assert info["block"] == "decoder.3.attention" and info["num_tensors"] == 4 and info["seed"] == 3
    assert "transformers" in info["versions"]
    reloaded = tiny("gpt2")
    from hf_relearn.model.modeling import load_model

    again = load_model(str(out))
    moved = changed_tensors(fingerprint(reloaded), fingerprint(again))  # biases were zero before and after
    assert set(moved) <= set(info["tensors"]) and {n for n in info["tensors"] if n.endswith("weight")} <= set(moved)

    # bad input: one clear error, exit 2, nothing written
    bad = tmp_path / "bad"
    for argv, msg in [
        (["reset", "gpt2", "decoder.9", "--config-overrides", overrides], "layer 9 out of range"),
        (["reset", "gpt2", "decoder.1.cross_attention", "--config-overrides", overrides], "has no 'cross_attention'"),
        (["reset", "gpt2", "head", "--config-overrides", overrides], "tied weights"),
        (["reset", "gpt2", "decoder.1", "--config-overrides", "n_layr=2"], "has no such field"),
        (
            ["reset", "gpt2", "decoder.1", "--init", "checkpoint:/nonexistent", "--config-overrides", overrides],
            "no config.json",
        ),
        (["reset", str(tmp_path / "nope"), "decoder.1"], "no such folder"),
    ]:
        assert main([*argv, "--output-dir", str(bad)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("error:") == 1
        assert not bad.exists()
    assert main(["reset", "gpt2", "decoder.1", "--config-overrides", overrides, "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_blocks_json(capsys):
    assert (
        main(["blocks", "t5", "--config-overrides", "num_layers=2,d_model=32,d_ff=64,num_heads=2,d_kv=16", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    names = {b["name"] for b in data["blocks"]}
    assert {"encoder.0", "decoder.1.cross_attention", "decoder.final_norm", "embeddings", "head"} <= names
    assert data["stacks"] == {
        "encoder": {"path": "encoder.block", "layers": 2},
        "decoder": {"path": "decoder.block", "layers": 2},
    }


# ------------------------------------------------------------------------- reset saves the source folder's tokenizer
GPT2_OVERRIDES = "n_layer=4,n_embd=32,n_head=2,n_positions=64"


def _tiny_folder(path: Path, tokenizer: bool) -> Path:
    load_model("gpt2", GPT2_OVERRIDES, seed=0).save_pretrained(path)
    if tokenizer:
        get_tokenizer("bytes").save_pretrained(path)
    assert (path / "tokenizer.json").exists() == tokenizer
    return path


def test_reset_saves_the_tokenizer_of_a_source_folder_that_has_one(tmp_path, capsys):
    source = _tiny_folder(tmp_path / "with", tokenizer=True)
    assert main(["reset", str(source), "decoder.1", "--output-dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert saved["model"]["vocab"] == json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    assert (
        get_tokenizer("auto", str(tmp_path / "out"))("abc")["input_ids"] == get_tokenizer("bytes")("abc")["input_ids"]
    )


def test_reset_saves_no_tokenizer_when_the_source_folder_has_none(tmp_path, capsys):
    source = _tiny_folder(tmp_path / "without", tokenizer=False)
    assert main(["reset", str(source), "decoder.1", "--output-dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "surgery.json").exists()
    assert not list((tmp_path / "out").glob("tokenizer*"))


# -------------------------------------------------------------------------- reset --allow-shared on the command line
def test_cli_reset_of_a_tied_head_needs_allow_shared_and_records_what_shares_it(tmp_path, capsys):
    argv = ["reset", "gpt2", "head", "--config-overrides", "n_layer=2,n_embd=32,n_head=2,n_positions=64"]
    assert main([*argv, "--output-dir", str(tmp_path / "refused")]) == 2
    assert "transformer.wte.weight is the same tensor" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*argv, "--output-dir", str(tmp_path / "out"), "--allow-shared"]) == 0
    capsys.readouterr()
    surgery = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert surgery["block"] == "head" and surgery["shared_with"] == ["transformer.wte.weight"]
    assert any("tied tensors reset too" in note for note in surgery["notes"])


# ------------------------------------------------------------------------------------------------------ surgery.json
OVERRIDES = "n_layer=2,n_embd=32,n_head=2,vocab_size=256,n_positions=64"
VERSIONS = {"hf_relearn": hf_relearn.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def test_surgery_json_names_block_init_seed_tensors_and_versions(tmp_path):
    out = tmp_path / "reset"
    assert main(["reset", "gpt2", "decoder.1", "--config-overrides", OVERRIDES, "--init", "zero", "--seed", "5",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    info = json.loads((out / "surgery.json").read_text())
    assert (info["block"], info["init"], info["seed"]) == ("decoder.1", "zero", 5)
    assert info["tensors"] and all(t.startswith("transformer.h.1.") for t in info["tensors"])
    assert info["versions"] == VERSIONS
