"""A stitch between encoders: the closed-form fit, the swap that keeps the trained cross-attention, a relearn with it,
and one clear error for each bad input."""

import copy
import logging

import pytest
import torch
from test_swap import _native, _pair

from hf_relearn import RelearnError
from hf_relearn.model.stitch import Stitch, encoder_states, fit_stitch, install_stitch, is_stitched
from hf_relearn.model.surgery import fingerprint
from hf_relearn.model.swap import swap_encoder

TINY_T5 = "num_layers=2,num_decoder_layers=2,d_model={d},d_ff={ff},num_heads=2,d_kv=16"


def _rows(n: int, width: int, seed: int = 0, tokens: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, width, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("new_width,old_width", [(16, 32), (32, 32), (64, 32)])
def test_lstsq_recovers_an_affine_map_between_any_widths(new_width, old_width):
    new = _rows(12, new_width)
    weight = torch.randn(old_width, new_width, dtype=torch.float64)
    bias = torch.randn(old_width, dtype=torch.float64)
    old = [r @ weight.T + bias for r in new]
    stitch, fit = fit_stitch(new, old, "lstsq")
    assert isinstance(stitch, Stitch) and stitch.weight.shape == (old_width, new_width)
    assert fit.rows_fit == 9 and fit.rows_held_out == 3 and fit.tokens_held_out == 60
    assert fit.r2_held_out == pytest.approx(1.0, abs=1e-9) and fit.relative_residual_held_out < 1e-6
    torch.testing.assert_close(stitch.weight.double(), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stitch.bias.double(), bias, atol=1e-4, rtol=1e-4)


def test_procrustes_recovers_a_rotation_and_lstsq_explains_what_a_rotation_cannot():
    new = _rows(12, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    old = [r @ rotation + 0.5 for r in new]
    stitch, fit = fit_stitch(new, old, "procrustes")
    assert fit.r2_held_out == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(stitch.weight.double(), rotation.T, atol=1e-5, rtol=1e-5)
    # a scaled, sheared map: a rotation explains part of it, least squares all of it
    shear = torch.randn(8, 8, dtype=torch.float64) * 3
    old = [r @ shear for r in new]
    assert fit_stitch(new, old, "procrustes")[1].r2_held_out < 0.99
    assert fit_stitch(new, old, "lstsq")[1].r2_held_out == pytest.approx(1.0, abs=1e-9)


def test_noise_the_map_cannot_explain_shows_on_the_held_out_rows():
    new, unrelated = _rows(12, 16), _rows(12, 16, seed=1)
    fit = fit_stitch(new, unrelated, "lstsq")[1]
    assert fit.r2_fit > fit.r2_held_out and fit.r2_held_out < 0.05  # nothing to map: the held-out rows say so


@pytest.mark.parametrize(
    "new,old,method,match",
    [
        (_rows(12, 8), _rows(12, 8), "ridge", "must be one of lstsq, procrustes"),
        (_rows(12, 8), _rows(12, 16), "procrustes", "equal widths only"),
        (_rows(12, 8), _rows(11, 8), "lstsq", "differ between the two encoders"),
        (_rows(12, 8), _rows(12, 8, tokens=19), "lstsq", "differ between the two encoders"),
        (_rows(3, 8), _rows(3, 8), "lstsq", "too small: 3 rows"),
        (_rows(4, 64, tokens=5), _rows(4, 32, tokens=5), "lstsq", "too small"),  # 15 tokens for 65 parameters
    ],
)
def test_a_bad_stitch_sample_gets_one_clear_error(new, old, method, match):
    with pytest.raises(RelearnError, match=match):
        fit_stitch(new, old, method)


def _batches(n_rows: int = 16, length: int = 24, vocab: int = 99, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, length // 2 :] = 0  # some padding: only real tokens are samples
    return [{"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, n_rows, 8)]


def test_encoder_states_keep_real_tokens_only_in_eval_mode_and_restore_the_mode():
    model = _native("t5", 32)
    encoder = model.get_encoder().train()
    batches = _batches()
    rows = encoder_states(encoder, batches)
    assert encoder.training and len(rows) == 16
    assert [len(r) for r in rows[:3]] == [12, 24, 24] and rows[0].dtype == torch.float64
    assert torch.equal(torch.cat(rows), torch.cat(encoder_states(encoder, batches)))  # no dropout: deterministic


@pytest.mark.parametrize("new_width", [16, 32, 64])
def test_a_stitched_swap_keeps_the_decoder_and_maps_the_new_encoder_to_the_old_one(new_width):
    model = _native("t5", 32)
    old_encoder = copy.deepcopy(model.get_encoder())
    new_encoder = _native("t5", new_width, seed=3).get_encoder()
    before = fingerprint(model)
    report = swap_encoder(model, new_encoder, "keep", stitch="lstsq", stitch_batches=_batches())
    assert is_stitched(model) and report.adapter == "stitch" and report.resized == []
    assert report.stitch["method"] == "lstsq" and report.stitch["rows_held_out"] == 4
    assert report.reset_tensors == ["stitch.weight", "stitch.bias"]
    assert report.num_parameters == 32 * new_width + 32
    # the decoder, cross-attention included, is exactly as trained; only the encoder changed
    after = fingerprint(model)
    changed = {n for n in before if n in after and before[n] != after[n]} | (set(before) ^ set(after))
    assert all(n.startswith(("encoder.", "stitch.")) for n in changed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(report.trainable) and "stitch.weight" in trainable
    blocks = {n.split(".layer.")[0] for n in trainable if n.startswith("decoder.")}
    assert blocks == {f"decoder.block.{i}" for i in range(model.config.num_decoder_layers)}
    assert all("EncDecAttention" in n for n in trainable if n.startswith("decoder."))
    # the hook maps the new encoder's output through the stitch: what the decoder reads has the old width
    batch = _batches()[0]
    model.eval()  # no dropout: the two reads must agree exactly
    with torch.no_grad():
        mapped = model.get_encoder()(**batch).last_hidden_state
        raw = new_encoder(**batch).last_hidden_state  # the same module: the hook applies here too
        assert mapped.shape[-1] == 32 and torch.equal(mapped, raw)
        assert old_encoder(**batch).last_hidden_state.shape == mapped.shape
    labels = batch["input_ids"].clone()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert model.stitch.weight.grad is not None and torch.isfinite(loss)


def test_stitch_only_trains_the_map_and_a_deep_copy_applies_its_own_map():
    model = _native("t5", 32)
    report = swap_encoder(
        model,
        _native("t5", 16, seed=3).get_encoder(),
        "keep",
        "stitch-only",
        stitch="lstsq",
        stitch_batches=_batches(),
    )
    assert set(report.trainable) == {"stitch.weight", "stitch.bias"}
    twin = copy.deepcopy(model)
    batch = _batches()[0]
    with torch.no_grad():
        twin.stitch.weight.zero_()
        twin.stitch.bias.fill_(1.0)
        assert torch.all(twin.get_encoder()(**batch).last_hidden_state == 1.0)  # the copy's hook, the copy's map
        assert not torch.all(model.get_encoder()(**batch).last_hidden_state == 1.0)


def test_bad_stitched_swaps_get_one_clear_error():
    new = _native("t5", 16, seed=3).get_encoder()
    with pytest.raises(RelearnError, match="use cross_attention 'keep'"):
        swap_encoder(_native("t5", 32), new, "reset", stitch="lstsq", stitch_batches=_batches())
    with pytest.raises(RelearnError, match="give stitch_batches"):
        swap_encoder(_native("t5", 32), new, "keep", stitch="lstsq")
    with pytest.raises(RelearnError, match="'stitch-only' needs a stitch"):
        swap_encoder(_native("t5", 32), new, "reset", "stitch-only")
    with pytest.raises(RelearnError, match="reads 32-wide encoder states and the new encoder gives 16"):
        swap_encoder(_native("t5", 32), new, "keep")
    with pytest.raises(RelearnError, match="equal widths only"):
        swap_encoder(_native("t5", 32), new, "keep", stitch="procrustes", stitch_batches=_batches())
    with pytest.raises(RelearnError, match="too small"):
        swap_encoder(_native("t5", 32), new, "keep", stitch="lstsq", stitch_batches=[_batches(2)[0]])
    with pytest.raises(RelearnError, match="EncoderDecoderModel is not supported"):
        swap_encoder(_pair(), _pair(32).encoder, "keep", stitch="lstsq", stitch_batches=_batches())
    stack = _native("t5", 32).get_decoder()  # a bare decoder stack: no encoder of its own to swap or stitch to
    with pytest.raises(RelearnError, match="no encoder of its own to swap"):
        swap_encoder(stack, new, "keep", stitch="lstsq", stitch_batches=_batches())
    no_cross = _native("t5", 32)
    for block in no_cross.decoder.block:  # a decoder without cross-attention: nothing reads the encoder
        del block.layer[1]
    with pytest.raises(RelearnError, match="has no cross-attention"):
        swap_encoder(no_cross, new, "keep", stitch="lstsq", stitch_batches=_batches())
    model = _native("t5", 32)
    install_stitch(model, Stitch(16, 32))
    with pytest.raises(RelearnError, match="already has a 'stitch'"):
        install_stitch(model, Stitch(16, 32))


def test_relearn_arguments_default_to_a_kept_cross_attention_with_a_stitch(tmp_path):
    from hf_relearn.relearn.arguments import RelearnArguments

    kw = dict(output_dir=str(tmp_path), block="decoder.0", objective="seq2seq")
    assert RelearnArguments(**kw, swap_encoder="t5").swap_cross_attention == "reset"
    assert RelearnArguments(**kw, swap_encoder="t5", swap_stitch="lstsq").swap_cross_attention == "keep"
    with pytest.raises(RelearnError, match="swap_stitch needs swap_encoder"):
        RelearnArguments(**kw, swap_stitch="lstsq")
    with pytest.raises(RelearnError, match="swap_stitch_rows must be at least 4"):
        RelearnArguments(**kw, swap_encoder="t5", swap_stitch="lstsq", swap_stitch_rows=2)


# ------------------------------------------------------------------------------- real text: trained encoders
@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """A tiny T5 base and a donor of half its width, each trained 300 steps on Tiny Shakespeare (denoise)."""
    from conftest import SHARED_DATA, missing_fixture
    from test_swap import _real_data

    from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments
    from hf_relearn.relearn.runner import pretrain

    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        missing_fixture("../shared/data")
    out = tmp_path_factory.mktemp("stitch-pair")
    for name, seed, width in (("base", 0, 32), ("donor", 1000, 16)):
        args = PretrainArguments(
            output_dir=str(out / name), max_steps=300, per_device_train_batch_size=16, learning_rate=5e-3,
            eval_steps=100, objective="seq2seq", disable_tqdm=True, seed=seed,
        )  # fmt: skip
        overrides = TINY_T5.format(d=width, ff=4 * width)
        pretrain(
            ModelArguments(model="t5", config_overrides=overrides, model_seed=seed), _real_data(SHARED_DATA), args
        )
    return out / "base", out / "donor"


def test_a_stitch_closes_most_of_a_trained_donors_jump_and_records_its_fit(
    trained_pair, shared_data, tmp_path, caplog
):
    from test_swap import _real_data, _relearn

    base, donor = trained_pair
    data = _real_data(shared_data)
    kw = dict(swap_encoder=str(donor), max_steps=20, eval_steps=10, stop_at_recovery=False)
    reset = _relearn(tmp_path / "reset", base, data, **kw)
    with caplog.at_level(logging.WARNING, logger="hf_relearn"):
        stitched = _relearn(tmp_path / "stitch", base, data, **kw, swap_stitch="lstsq", save_final_model=True)
    only = _relearn(tmp_path / "only", base, data, **kw, swap_stitch="lstsq", swap_freeze="stitch-only")
    fit = stitched.surgery["stitch"]
    assert fit["method"] == "lstsq" and fit["rows_fit"] == 192 and fit["rows_held_out"] == 64
    assert 0.2 < fit["r2_held_out"] < 1  # trained encoders of one corpus: related, not identical (measured ~0.45)
    # measured: reset +7%, stitched +2.6% (about 60% of the jump closed before any training)
    reset_jump = reset.after_reset_eval_loss - reset.baseline_eval_loss
    stitch_jump = stitched.after_reset_eval_loss - stitched.baseline_eval_loss
    assert 0 < stitch_jump < 0.6 * reset_jump
    assert only.after_reset_eval_loss == stitched.after_reset_eval_loss  # the same closed-form map
    assert only.trainable_parameters == 16 * 32 + 32 and stitched.trainable_parameters > only.trainable_parameters
    for run in (stitched, only):
        assert run.frozen_unchanged and run.frozen_changed == [] and run.final_eval_loss < run.after_reset_eval_loss
    assert not (tmp_path / "stitch" / "model.safetensors").exists()  # a hook save_pretrained would drop
    assert "not saved" in caplog.text and "forward hook" in caplog.text
    assert (tmp_path / "stitch" / "relearn_result.json").exists()
    from hf_relearn.hub.cards import relearn_card

    card = relearn_card(tmp_path / "stitch").text
    assert (
        f"R² = {fit['r2_held_out']:.3f}" in card and "lstsq stitch fitted in closed form on 192 training rows" in card
    )
    assert "closed form" not in relearn_card(tmp_path / "reset").text


def test_cli_swap_keeps_a_same_width_cross_attention_and_sends_a_stitch_to_relearn(tmp_path, capsys):
    from hf_relearn.cli.main import main
    from hf_relearn.model.modeling import load_model

    src = tmp_path / "t5"
    _native("t5", 32).save_pretrained(src)
    enc = "num_layers=4,d_model=32,d_ff=256,num_heads=2,d_kv=32,vocab_size=256"  # the source's own shapes
    out = tmp_path / "keep"
    assert main(["swap", str(src), "--encoder", "t5", "--encoder-overrides", enc, "--output-dir", str(out),
                 "--cross-attention", "keep"]) == 0  # fmt: skip
    before, after = fingerprint(load_model(str(src))), fingerprint(load_model(str(out)))
    cross = [n for n in before if "EncDecAttention" in n]
    assert cross and all(before[n] == after[n] for n in cross)  # kept as trained
    assert any(before[n] != after[n] for n in before if n.startswith("encoder."))  # the new encoder
    capsys.readouterr()
    bad = tmp_path / "bad"
    args = ["swap", str(src), "--encoder", "t5", "--encoder-overrides", enc.replace("d_model=32", "d_model=16"),
            "--output-dir", str(bad), "--stitch", "lstsq"]  # fmt: skip
    assert main(args) == 2 and not bad.exists()
    err = capsys.readouterr().err
    assert "hf-relearn relearn" in err and "--stitch lstsq" in err and "Nothing was written" in err
