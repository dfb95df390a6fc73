"""Encoder swap: new encoders of other widths in T5, BART and a BERT->GPT-2 EncoderDecoderModel."""

import json

import pytest
import torch
from tiny import TINY
from transformers import AutoConfig, BertForMaskedLM, BertModel, EncoderDecoderModel, GPT2LMHeadModel, GPT2Model

from hf_relearn import RelearnError
from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import changed_tensors, fingerprint
from hf_relearn.model.swap import check_forward_backward, swap_encoder


def _native(model_type: str, width: int, seed: int = 0):
    overrides = dict(TINY[model_type])
    key = "d_model"
    overrides[key] = width
    overrides.update(decoder_start_token_id=0, pad_token_id=0)
    if model_type == "bart":
        overrides.update(encoder_ffn_dim=4 * width, decoder_ffn_dim=4 * width)
    return load_model(model_type, overrides, seed=seed)


def _pair(enc_width: int = 64):
    enc = BertModel(
        AutoConfig.for_model("bert", **{**TINY["bert"], "hidden_size": enc_width}), add_pooling_layer=False
    )
    dec_cfg = AutoConfig.for_model("gpt2", **TINY["gpt2"], is_decoder=True, add_cross_attention=True)
    model = EncoderDecoderModel(encoder=enc, decoder=GPT2LMHeadModel(dec_cfg))
    model.config.decoder_start_token_id, model.config.pad_token_id = 0, 0
    return model


@pytest.mark.parametrize("model_type", ["t5", "bart"])
@pytest.mark.parametrize("new_width", [32, 64, 128])
def test_native_swap_resizes_kv_resets_cross_attention_and_freezes_the_rest(model_type, new_width):
    model = _native(model_type, 64)
    new_encoder = _native(model_type, new_width, seed=3).get_encoder()
    decoder_before = {
        n: h for n, h in fingerprint(model).items() if "decoder" in n and "encoder" not in n.split(".")[:2]
    }
    report = swap_encoder(model, new_encoder)
    assert report.adapter == ("none" if new_width == 64 else "resized-kv")
    if new_width != 64:
        assert len(report.resized) == 2 * 4  # key and value of 4 decoder layers
        for path in report.resized:
            assert model.get_submodule(path).in_features == new_width
    after = fingerprint(model)
    moved = [n for n in changed_tensors(decoder_before, {n: after[n] for n in decoder_before if n in after})]
    assert moved and all(n in report.reset_tensors for n in moved)  # only cross-attention moved in the decoder
    assert set(report.trainable) == set(report.reset_tensors)
    assert model.get_encoder() is new_encoder and not any(p.requires_grad for p in new_encoder.parameters())
    loss = check_forward_backward(model, 256)
    assert torch.isfinite(loss)
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(n in report.trainable for n in grads)


@pytest.mark.parametrize("enc_width", [32, 128])
def test_encoder_decoder_model_swap_uses_enc_to_dec_proj(enc_width):
    model = _pair(64)
    before = fingerprint(model)
    new = BertModel(
        AutoConfig.for_model("bert", **{**TINY["bert"], "hidden_size": enc_width}), add_pooling_layer=False
    )
    report = swap_encoder(model, new, freeze="encoder-trainable")
    assert report.adapter == "enc_to_dec_proj" and model.enc_to_dec_proj.in_features == enc_width
    assert "enc_to_dec_proj.weight" in report.reset_tensors
    decoder_moved = [n for n in changed_tensors(before, fingerprint(model)) if n.startswith("decoder.")]
    assert decoder_moved and all("crossattention" in n or "ln_cross_attn" in n for n in decoder_moved)
    assert all(p.requires_grad for p in new.parameters())
    assert torch.isfinite(check_forward_backward(model, 256))


def test_zero_cross_attention_starts_as_if_absent():
    model = _native("bart", 64)
    report = swap_encoder(model, _native("bart", 32, seed=1).get_encoder(), cross_attention="zero")
    assert report.cross_attention == "zero"
    for layer in model.model.decoder.layers:
        assert torch.count_nonzero(layer.encoder_attn.out_proj.weight) == 0


def test_bad_swaps_get_one_clear_error():
    with pytest.raises(RelearnError, match="not an encoder-decoder"):
        swap_encoder(load_model("gpt2", TINY["gpt2"]), BertModel(AutoConfig.for_model("bert", **TINY["bert"])))
    with pytest.raises(RelearnError, match="is not an encoder"):
        swap_encoder(_native("t5", 64), _native("t5", 64))  # a whole encoder-decoder, not an encoder
    with pytest.raises(RelearnError, match="vocabularies differ"):
        swap_encoder(_native("t5", 64), load_model("t5", {**TINY["t5"], "vocab_size": 300}).get_encoder())
    with pytest.raises(RelearnError, match="needs an encoder of its own kind"):
        swap_encoder(_native("t5", 64), BertModel(AutoConfig.for_model("bert", **TINY["bert"])))
    enc = BertModel(AutoConfig.for_model("bert", **TINY["bert"]), add_pooling_layer=False)
    no_cross = EncoderDecoderModel(
        encoder=enc, decoder=GPT2LMHeadModel(AutoConfig.for_model("gpt2", **TINY["gpt2"], is_decoder=True))
    )
    with pytest.raises(RelearnError, match="has no cross-attention"):
        swap_encoder(no_cross, BertModel(AutoConfig.for_model("bert", **TINY["bert"]), add_pooling_layer=False))


def test_relearn_after_an_encoder_swap(tmp_path):
    from test_relearn import T5, base_run, relearn_run

    from hf_relearn.hub.cards import relearn_card

    base_run(tmp_path / "base", "t5", T5, objective="seq2seq", steps=150)
    narrow = "num_layers=2,d_model=32,d_ff=128,num_heads=2,d_kv=16,vocab_size=259"
    result = relearn_run(
        tmp_path / "rl", tmp_path / "base", "decoder.0", objective="seq2seq", swap_encoder="t5",
        swap_encoder_overrides=narrow, max_steps=30, stop_at_recovery=False, learning_rate=3e-3,
    )  # fmt: skip
    assert result.block == "encoder-swap:t5" and result.surgery["adapter"] == "resized-kv"
    assert result.surgery["new_width"] == 32 and result.surgery["old_width"] == 64
    # a fresh encoder raises the loss, but (measured) only ~2% here: after 150 steps this continuation model's
    # decoder leans on its own context more than on the encoder
    assert result.after_reset_eval_loss > result.baseline_eval_loss
    assert result.final_eval_loss < result.after_reset_eval_loss  # and re-learning the cross-attention helps
    assert result.frozen_unchanged and result.trainable_parameters == result.surgery["num_parameters"]
    assert "encoder-swap:t5" in relearn_card(tmp_path / "rl").text
    with pytest.raises(RelearnError, match="vocabularies differ"):
        relearn_run(tmp_path / "bad", tmp_path / "base", "decoder.0", objective="seq2seq", swap_encoder="t5",
                    swap_encoder_overrides="num_layers=2,d_model=32,vocab_size=300", max_steps=1)  # fmt: skip


# ------------------------------------------------------------------------------------- real text: swap, relearn
TINY_T5 = "num_layers=2,num_decoder_layers=2,d_model=32,d_ff=128,num_heads=2,d_kv=16"


def _real_data(shared_data, **kw):
    from hf_relearn.data.datasets import DataArguments

    return DataArguments(
        train_file=str(shared_data / "tinyshakespeare.txt"), block_size=32, max_eval_samples=32,
        seq2seq_task="denoise", **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def t5_real_base(tmp_path_factory):
    """A tiny T5 trained briefly (120 steps) on Tiny Shakespeare, denoise task (needs ../shared/data)."""
    from conftest import SHARED_DATA, missing_fixture

    from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments
    from hf_relearn.relearn.runner import pretrain

    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        missing_fixture("../shared/data")
    out = tmp_path_factory.mktemp("t5-real")
    args = PretrainArguments(
        output_dir=str(out), max_steps=120, per_device_train_batch_size=16, learning_rate=5e-3, eval_steps=40,
        objective="seq2seq", disable_tqdm=True, seed=0,
    )  # fmt: skip
    pretrain(ModelArguments(model="t5", config_overrides=TINY_T5), _real_data(SHARED_DATA), args)
    return out


def _relearn(out, base, data, **kw):
    from hf_relearn.relearn.arguments import ModelArguments, RelearnArguments
    from hf_relearn.relearn.runner import relearn

    callbacks = kw.pop("callbacks", None)
    defaults = dict(
        max_steps=200, per_device_train_batch_size=16, learning_rate=5e-3, eval_steps=10, disable_tqdm=True, seed=0,
        objective="seq2seq", save_final_model=False, block="decoder.0",
    )  # fmt: skip
    args = RelearnArguments(output_dir=str(out), original_run=str(base), **{**defaults, **kw})
    return relearn(ModelArguments(model=str(base)), data, args, callbacks=callbacks)


@pytest.mark.parametrize("width", [16, 64])
def test_t5_swap_recovers_on_real_text(t5_real_base, shared_data, tmp_path, width):
    enc = f"num_layers=2,d_model={width},d_ff={4 * width},num_heads=2,d_kv=16,vocab_size=259"
    result = _relearn(tmp_path, t5_real_base, _real_data(shared_data), swap_encoder="t5", swap_encoder_overrides=enc)
    assert result.surgery["adapter"] == "resized-kv" and result.surgery["new_width"] == width
    assert result.after_reset_eval_loss > result.recovery_threshold  # the swap hurt beyond the tolerance
    assert result.recovered and 0 < result.steps_to_recover <= 200
    assert result.frozen_unchanged and result.frozen_changed == []
    assert result.trainable_parameters == result.surgery["num_parameters"]  # only cross-attention trained
    assert result.original_steps == 120
    curve = json.loads((t5_real_base / "hf_relearn_run.json").read_text())["curve"]
    reached = [step for step, loss in curve if loss <= result.recovery_threshold]
    assert result.original_steps_to_same_loss == (reached[0] if reached else None)


@pytest.mark.parametrize("width", [16, 64])
def test_encoder_decoder_model_swap_recovers_on_real_text(shared_data, tmp_path, width):
    """BERT encoder + GPT-2 decoder (32 wide) built from configs, trained briefly, then a BERT of another width."""
    from hf_relearn.data.tokenization import byte_tokenizer
    from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments
    from hf_relearn.relearn.runner import pretrain

    bert = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=128, vocab_size=259)
    gpt2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=259, n_positions=64)
    enc = BertModel(AutoConfig.for_model("bert", **bert), add_pooling_layer=False)
    dec = GPT2LMHeadModel(AutoConfig.for_model("gpt2", **gpt2, is_decoder=True, add_cross_attention=True))
    pair = EncoderDecoderModel(encoder=enc, decoder=dec)
    pair.config.decoder_start_token_id, pair.config.pad_token_id = 258, 256
    folder = tmp_path / "pair"
    pair.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    base = tmp_path / "base"
    args = PretrainArguments(
        output_dir=str(base), max_steps=120, per_device_train_batch_size=16, learning_rate=5e-3, eval_steps=40,
        objective="seq2seq", disable_tqdm=True, seed=0,
    )  # fmt: skip
    pretrain(ModelArguments(model=str(folder)), _real_data(shared_data), args)
    new = f"num_hidden_layers=2,hidden_size={width},num_attention_heads=2,intermediate_size={4 * width},vocab_size=259"
    result = _relearn(tmp_path / "rl", base, _real_data(shared_data), swap_encoder="bert", swap_encoder_overrides=new)
    assert result.surgery["adapter"] == "enc_to_dec_proj" and result.surgery["new_width"] == width
    assert "enc_to_dec_proj.weight" in result.surgery["reset_tensors"]
    assert result.after_reset_eval_loss > result.recovery_threshold
    assert result.recovered and result.frozen_unchanged


def test_an_all_trainable_swap_trains_the_tied_embedding_under_all_its_names(t5_real_base, shared_data, tmp_path):
    """A T5 ties lm_head and decoder.embed_tokens to its shared embedding: with everything trainable they move (as
    the one tensor they are) and the frozen-tensor proof must not call them frozen tensors that changed."""
    enc = "num_layers=2,d_model=32,d_ff=128,num_heads=2,d_kv=16,vocab_size=259"
    result = _relearn(
        tmp_path, t5_real_base, _real_data(shared_data), swap_encoder="t5", swap_encoder_overrides=enc,
        swap_freeze="all-trainable", max_steps=3, eval_steps=3, stop_at_recovery=False,
    )  # fmt: skip
    assert result.frozen_unchanged and not result.frozen_changed
    assert {"shared.weight", "lm_head.weight", "decoder.embed_tokens.weight"} <= set(result.surgery["trainable"])


def test_swap_warmup_trains_only_cross_attention_first(t5_real_base, shared_data, tmp_path):
    from transformers import TrainerCallback

    from hf_relearn.relearn.arguments import RelearnArguments

    snaps = {}

    class Snap(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            snaps[0] = fingerprint(model)

        def on_step_end(self, args, state, control, model=None, **kw):
            snaps[state.global_step] = fingerprint(model)

    enc = "num_layers=2,d_model=32,d_ff=128,num_heads=2,d_kv=16,vocab_size=259"
    result = _relearn(
        tmp_path, t5_real_base, _real_data(shared_data), swap_encoder="t5", swap_encoder_overrides=enc,
        swap_freeze="encoder-trainable", swap_warmup_steps=3, max_steps=6, stop_at_recovery=False,
        callbacks=[Snap()],
    )  # fmt: skip
    cross = set(result.surgery["reset_tensors"])
    for step in (1, 3):
        moved = changed_tensors(snaps[0], snaps[step])
        assert moved and set(moved) <= cross, step  # the warm-up: only cross-attention moves
    moved = changed_tensors(snaps[3], snaps[6])
    assert any(n.startswith("encoder.") for n in moved) and cross & set(moved)  # then the new encoder trains too
    assert not [n for n in changed_tensors(snaps[0], snaps[6]) if n.startswith("decoder.") and n not in cross]
    assert result.frozen_unchanged and result.steps_trained == 6
    assert result.trainable_parameters > result.surgery["num_parameters"]  # the encoder counts as trainable
    for bad, message in (
        (dict(swap_freeze="decoder-except-cross"), "changes nothing"),
        (dict(swap_encoder=None), "needs swap_encoder"),
        (dict(swap_warmup_steps=-1), "must be >= 0"),
    ):
        kw = dict(swap_encoder="t5", swap_freeze="encoder-trainable", swap_warmup_steps=3) | bad
        with pytest.raises(RelearnError, match=message):
            RelearnArguments(output_dir=str(tmp_path / "x"), **kw)
    from types import SimpleNamespace

    from hf_relearn.relearn.arguments import check_swap_warmup

    launched = SimpleNamespace(swap_warmup_steps=3, swap_encoder="t5", swap_freeze="encoder-trainable", world_size=2)
    with pytest.raises(RelearnError, match="not supported under a 2-process launch"):
        check_swap_warmup(launched)


# ------------------------------------------------------------------------------------------------- CLI swap
def _swapped_like_the_cli(src, width: int):
    """The swap ``hf-relearn swap`` makes with its defaults (encoder seed 0, reset seed 0), built again here."""
    from hf_relearn.model.swap import swap_encoder

    model = load_model(str(src))
    overrides = f"num_hidden_layers=2,hidden_size={width},num_attention_heads=2,intermediate_size=128,vocab_size=256"
    swap_encoder(model, load_model("bert", overrides, head="base", seed=0), "reset", "decoder-except-cross", 0)
    return model.eval()


def _same_logits(a, b) -> bool:
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(
            a.eval()(input_ids=ids, decoder_input_ids=ids).logits,
            b.eval()(input_ids=ids, decoder_input_ids=ids).logits,
        )


def test_check_reloads_refuses_a_save_that_loads_as_another_model(tmp_path):
    from hf_relearn.model.swap import check_reloads

    model = _pair(64)
    model.save_pretrained(tmp_path / "m")
    check_reloads(model, tmp_path / "m", 256)  # the folder holds this model: accepted
    with torch.no_grad():
        model.decoder.transformer.h[0].mlp.c_fc.bias.add_(1e-3)
    with pytest.raises(RelearnError, match="does not load back as the swapped one"):
        check_reloads(model, tmp_path / "m", 256)


def test_cli_swap_writes_nothing_when_the_save_does_not_reload(tmp_path, capsys, monkeypatch):
    from hf_relearn.cli.main import main
    from hf_relearn.model import swap

    src = tmp_path / "pair"
    _pair(64).save_pretrained(src)
    real = swap.check_reloads

    def after_a_silent_change(model, folder, vocab):  # as if save_pretrained had dropped or altered a tensor
        with torch.no_grad():
            next(model.decoder.parameters()).add_(1e-3)
        real(model, folder, vocab)

    monkeypatch.setattr(swap, "check_reloads", after_a_silent_change)
    out = tmp_path / "out"
    overrides = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=128,vocab_size=256"
    code = main(["swap", str(src), "--encoder", "bert", "--encoder-overrides", overrides, "--output-dir", str(out)])
    assert code == 2 and "does not load back as the swapped one" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing kept, no half-written folder


@pytest.mark.parametrize("width", [32, 128])
def test_cli_swap_saves_an_encoder_decoder_model_that_reloads(tmp_path, capsys, width):
    import json

    from hf_relearn.cli.main import main
    from hf_relearn.data.tokenization import byte_tokenizer

    src = tmp_path / "pair"
    pair = _pair(64)
    pair.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    overrides = f"num_hidden_layers=2,hidden_size={width},num_attention_heads=2,intermediate_size=128,vocab_size=256"
    code = main(["swap", str(src), "--encoder", "bert", "--encoder-overrides", overrides, "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "adapter enc_to_dec_proj" in capsys.readouterr().out
    report = json.loads((out / "swap_report.json").read_text())
    assert report["adapter"] == "enc_to_dec_proj" and report["new_width"] == width and report["old_width"] == 64
    saved = load_model(str(out))
    assert isinstance(saved, EncoderDecoderModel) and saved.enc_to_dec_proj.in_features == width
    assert _same_logits(saved, _swapped_like_the_cli(src, width))  # the saved model is the swapped one
    assert (out / "tokenizer.json").exists()
    # the decoder outside its cross-attention is the trained one, bit for bit
    before, after = fingerprint(pair), fingerprint(saved)
    kept = [n for n in before if n.startswith("decoder.") and "crossattention" not in n and "ln_cross_attn" not in n]
    assert kept and all(before[n] == after[n] for n in kept)


def test_cli_swap_native_same_width_saves_and_other_widths_are_refused(tmp_path, capsys):
    from hf_relearn.cli.main import main

    src = tmp_path / "t5"
    model = _native("t5", 64)
    model.save_pretrained(src)
    enc = "num_layers=4,d_model=64,d_ff=256,num_heads=2,d_kv=32,vocab_size=256"
    out = tmp_path / "same"
    assert main(["swap", str(src), "--encoder", "t5", "--encoder-overrides", enc, "--output-dir", str(out)]) == 0
    from hf_relearn.model.swap import swap_encoder

    expected = load_model(str(src))
    swap_encoder(
        expected, load_model("t5", enc, head="base", seed=0).get_encoder(), "reset", "decoder-except-cross", 0
    )
    assert _same_logits(load_model(str(out)), expected)  # the saved model is the swapped one
    assert (out / "swap_report.json").exists() and not (out / "tokenizer.json").exists()  # the source had none
    capsys.readouterr()
    bad = [
        (["--encoder-overrides", enc.replace("d_model=64", "d_model=32")], "cannot be saved so that it loads back"),
        (["--encoder-overrides", enc.replace("num_layers=4", "num_layers=2")], "is missing (the config describes it)"),
        (["--encoder-overrides", enc.replace("vocab_size=256", "vocab_size=300")], "vocabularies differ"),
        (["--encoder-overrides", "no_such_field=1"], "has no such field"),
        (
            ["--encoder", "bert", "--encoder-overrides", "num_hidden_layers=2,vocab_size=256"],
            "needs an encoder of its own kind",
        ),
    ]
    for extra, message in bad:
        args = ["swap", str(src), "--encoder", "t5", "--output-dir", str(tmp_path / "bad"), *extra]
        assert main(args) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))  # nothing written
    assert main(["swap", "gpt2", "--encoder", "bert", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "not an encoder-decoder" in capsys.readouterr().err
    assert main(["swap", str(src), "--encoder", "t5", "--encoder-overrides", enc, "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("width", [32, 128])
def test_a_t5_encoder_model_of_another_width_swaps_into_a_t5(width):
    """What users load as "a T5 encoder" (T5EncoderModel) goes in: its stack is taken out of the wrapper."""
    from transformers import T5Config, T5EncoderModel

    from hf_relearn.model.swap import check_forward_backward, swap_encoder

    model = _native("t5", 64)
    config = T5Config(**{**TINY["t5"], "d_model": width, "d_ff": 4 * width, "num_layers": 2})
    encoder = T5EncoderModel(config)
    report = swap_encoder(model, encoder)
    assert model.get_encoder() is encoder.encoder  # the T5Stack inside the wrapper
    assert report.old_width == 64 and report.new_width == width and report.adapter == "resized-kv"
    assert torch.isfinite(check_forward_backward(model, 256))


def test_relearn_swaps_in_a_saved_t5_encoder_model_folder_with_its_own_weights(tmp_path):
    """`relearn --swap_encoder FOLDER` where FOLDER holds a T5EncoderModel of another width (what one saves after
    loading "a T5 encoder"): its trained weights go in as they are, not a fresh init or AutoModel's T5Model."""
    from safetensors.torch import load_file
    from test_relearn import T5, base_run, relearn_run
    from transformers import T5Config, T5EncoderModel

    base_run(tmp_path / "base", "t5", T5, objective="seq2seq", steps=40)
    config = T5Config(num_layers=2, d_model=32, d_ff=128, num_heads=2, d_kv=16, vocab_size=259)
    torch.manual_seed(7)
    encoder = T5EncoderModel(config)
    with torch.no_grad():  # weights no fresh init would draw: a swap that re-initialised them would show
        for p in encoder.parameters():
            p.add_(0.5)
    encoder.save_pretrained(tmp_path / "enc")
    saved = load_file(tmp_path / "enc" / "model.safetensors")
    result = relearn_run(
        tmp_path / "rl", tmp_path / "base", "decoder.0", objective="seq2seq", swap_encoder=str(tmp_path / "enc"),
        max_steps=10, stop_at_recovery=False, save_final_model=True,
    )  # fmt: skip
    assert result.surgery["new_width"] == 32 and result.surgery["old_width"] == 64 and result.frozen_unchanged
    swapped = load_file(tmp_path / "rl" / "model.safetensors")
    # the frozen encoder in the re-learned model is the saved one, tensor for tensor
    for name, tensor in saved.items():
        if name.startswith("encoder.block") or name == "encoder.final_layer_norm.weight":
            assert torch.equal(swapped[name], tensor), name


def test_an_mt5_encoder_model_swaps_into_an_mt5():
    """The README's "(or MT5EncoderModel)": its MT5Stack is taken out of the wrapper, as for T5."""
    from transformers import MT5Config, MT5EncoderModel

    model = load_model("mt5", {**TINY["t5"], "decoder_start_token_id": 0, "pad_token_id": 0})
    encoder = MT5EncoderModel(MT5Config(**{**TINY["t5"], "d_model": 32, "d_ff": 128, "num_layers": 2}))
    report = swap_encoder(model, encoder)
    assert model.get_encoder() is encoder.encoder
    assert report.new_width == 32 and report.adapter == "resized-kv"
    assert torch.isfinite(check_forward_backward(model, 256))


def test_a_t5_encoder_model_given_as_a_hub_id_loads_with_its_own_weights(tmp_path):
    """`--swap_encoder NS/NAME` where the Hub repo holds a T5EncoderModel: loaded as that class, tensors unchanged."""
    from hub_server import FakeHub, fake_hub_endpoint
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel

    from hf_relearn.model.swap import load_encoder

    torch.manual_seed(3)
    T5EncoderModel(T5Config(num_layers=2, d_model=32, d_ff=128, num_heads=2, d_kv=16, vocab_size=256)).save_pretrained(
        tmp_path / "enc"
    )
    saved = load_file(tmp_path / "enc" / "model.safetensors")
    with FakeHub() as hub, fake_hub_endpoint(hub, cache_dir=tmp_path / "hub-cache"):
        files = {n: (tmp_path / "enc" / n).read_bytes() for n in ("config.json", "model.safetensors")}
        hub.commit("fake-user/t5-enc", files)
        encoder = load_encoder("fake-user/t5-enc")
    assert type(encoder).__name__ == "T5EncoderModel"
    loaded = encoder.state_dict()
    assert saved.keys() - {"shared.weight"} <= loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    model = _native("t5", 64)
    assert swap_encoder(model, encoder).new_width == 32 and model.get_encoder() is encoder.encoder


# ------------------------------------- encoder swaps: zeroed cross-attention, refused encoders, a dropped projection
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
    model.save_pretrained(tmp_path)
    reloaded = EncoderDecoderModel.from_pretrained(tmp_path)
    assert not hasattr(reloaded, "enc_to_dec_proj")
