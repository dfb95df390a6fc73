"""The frozen-prefix cache under the settings a GPU run turns on: each attention implementation, bf16 autocast and
``torch.compile``. Run on CPU: the same wiring (patched forwards, served tensors, Trainer's autocast and compile
wrappers) that a GPU run goes through, with CPU kernels."""

import pytest
import torch
from test_prefix_cache import _batch, _loss_and_grads, quiet_base  # noqa: F401  (quiet_base: a fixture)
from test_relearn import relearn_run
from tiny import TINY

from hf_relearn.errors import RelearnError
from hf_relearn.model.blocks import BlockMap
from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import freeze_except
from hf_relearn.relearn.prefix_cache import PrefixCache
from hf_relearn.relearn.prefix_plan import plan_prefix


def _frozen_below(kind: str, block: str, **load):
    model = load_model(kind, TINY[kind], **load).eval()
    return model, freeze_except(model, BlockMap(model).resolve(block))


@pytest.mark.parametrize("kind, block", [("gpt2", "decoder.2"), ("bert", "encoder.2")])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_each_attention_implementation_is_served_exactly(kind, block, attn):
    model, trainable = _frozen_below(kind, block, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    inputs = _batch()
    loss, grads = _loss_and_grads(model, inputs)
    cache = PrefixCache()
    cache.attach(model, plan_prefix(model, trainable)[0])
    for _ in range(2):  # fill, then read back
        with cache.serving(inputs, torch.arange(4), "train", n_rows=4):
            cached_loss, cached_grads = _loss_and_grads(model, inputs)
        assert cached_loss == loss and all(torch.equal(cached_grads[n], g) for n, g in grads.items())


def test_a_saved_model_loads_with_the_attention_implementation_asked_for(quiet_base):  # noqa: F811
    for attn in ("eager", "sdpa"):
        assert load_model(str(quiet_base), attn_implementation=attn).config._attn_implementation == attn
    with pytest.raises(RelearnError, match="attn_implementation='flash_attention_2' for .*FlashAttention2"):
        load_model(str(quiet_base), attn_implementation="flash_attention_2")


def test_an_attention_implementation_the_machine_lacks_is_refused_before_loading():
    with pytest.raises(RelearnError, match="attn_implementation='flash_attention_2' for gpt2: .*FlashAttention2"):
        load_model("gpt2", TINY["gpt2"], attn_implementation="flash_attention_2")
    with pytest.raises(RelearnError, match="attn_implementation='no-such' for gpt2"):
        load_model("gpt2", TINY["gpt2"], attn_implementation="no-such")


def test_a_relearn_refused_for_its_attention_leaves_no_output_folder(tmp_path, capsys, quiet_base):  # noqa: F811
    from hf_relearn.cli import main as cli

    out = tmp_path / "run"
    argv = ["relearn", "--model", str(quiet_base), "--block", "decoder.1", "--output_dir", str(out)]
    assert cli.main([*argv, "--attn_implementation", "flash_attention_2", "--max_steps", "2"]) == 2
    assert "error: attn_implementation='flash_attention_2'" in capsys.readouterr().err
    assert not out.exists()  # nothing half-made for a later run to trip over


def test_a_compiled_model_is_served_from_the_cache_and_skips_the_prefix():
    model, trainable = _frozen_below("gpt2", "decoder.2")
    inputs, rows = _batch(), torch.arange(4)
    eager_loss, eager_grads = _loss_and_grads(model, inputs)
    cache = PrefixCache()
    cache.attach(model, plan_prefix(model, trainable)[0])
    compiled = torch.compile(model)
    with cache.serving(inputs, rows, "train", n_rows=4):
        loss, grads = _loss_and_grads(compiled, inputs)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}  # the compiled wrapper's names
    assert grads.keys() == eager_grads.keys()
    assert all(torch.allclose(grads[n], g, rtol=1e-4, atol=1e-7) for n, g in eager_grads.items())
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.add_(1.0)  # wreck a layer the cache skips: served batches must not notice, others must
    with cache.serving(inputs, rows, "train", n_rows=4):
        assert compiled(**inputs).loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert abs(compiled(**inputs).loss.item() - loss.item()) > 1e-3
    cache.close()


@pytest.mark.parametrize(
    "setting",
    [dict(bf16=True, use_cpu=True), dict(torch_compile=True)],
    ids=["bf16", "torch_compile"],
)
def test_a_relearn_under_gpu_settings_gives_the_same_curve_with_the_cache(quiet_base, tmp_path, setting):  # noqa: F811
    runs = {
        mode: relearn_run(
            tmp_path / mode,
            quiet_base,
            "decoder.2",
            prefix_cache=mode,
            max_steps=20,
            stop_at_recovery=False,
            **setting,
        )
        for mode in ("false", "auto")
    }
    off, on = runs["false"], runs["auto"]
    assert on.prefix_cache["enabled"] and on.prefix_cache["splits"] == ["eval", "train"]
    assert on.prefix_cache["rows_filled"]["train"] > 0
    assert [s for s, _ in on.curve] == [s for s, _ in off.curve] and len(on.curve) == 3
    for (_, v1), (_, v2) in zip(on.curve + on.train_curve, off.curve + off.train_curve, strict=True):
        assert v1 == pytest.approx(v2, rel=1e-5)
    assert on.frozen_unchanged
    if "bf16" in setting:  # autocast really ran: the curve is not the fp32 one
        fp32 = relearn_run(tmp_path / "fp32", quiet_base, "decoder.2", max_steps=20, stop_at_recovery=False)
        assert fp32.curve[0][1] != on.curve[0][1]
