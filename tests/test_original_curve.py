"""The original curve from a base's published checkpoints: local checkpoint folders, or Hub revisions served by the
loopback Hub (tests/hub_server.py); checkpoints of another model refused; the curve drawn on the relearn plot."""

import json
import os
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from documented import says
from hub_server import FakeHub, fake_hub_endpoint
from test_relearn import relearn_run
from transformers import AutoConfig, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_relearn.data.datasets import DataArguments
from hf_relearn.errors import RelearnError
from hf_relearn.hub.plots import plot_curve
from hf_relearn.relearn import original_curve as oc
from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments, RelearnArguments
from hf_relearn.relearn.result import first_reach
from hf_relearn.relearn.runner import pretrain, relearn

DATA = dict(block_size=64, generated_chars=60_000)
TINY = "n_layer=2,n_embd=32,n_head=2,n_positions=64"
REVISIONS = "step40,step80,step120"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A tiny GPT-2 trained 120 steps with a checkpoint (and an evaluation) every 40: its published history."""
    out = tmp_path_factory.mktemp("published")
    args = PretrainArguments(
        output_dir=str(out), max_steps=120, per_device_train_batch_size=16, learning_rate=3e-3, eval_steps=40,
        save_strategy="steps", save_steps=40, disable_tqdm=True, seed=0,
    )  # fmt: skip
    pretrain(ModelArguments(model="gpt2", config_overrides=TINY), DataArguments(**DATA), args)
    return out


def _relearn(out: Path, base: Path, cache: Path | None, data: dict | None = None, **kw):
    """A relearn of ``base`` (``cache`` None: no ``original_curve_cache``, the default folder)."""
    kw = dict(
        block="decoder.1", max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3, eval_steps=20,
        disable_tqdm=True, original_tokens_per_step=16 * 64,
    ) | kw  # fmt: skip
    if cache is not None:
        kw["original_curve_cache"] = str(cache)
    args = RelearnArguments(output_dir=str(out), **kw)
    return relearn(ModelArguments(model=str(base)), DataArguments(**{**DATA, **(data or {})}), args)


def _logged_curve(base: Path) -> dict[int, float]:
    state = json.loads((base / "trainer_state.json").read_text())
    return {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}


def test_checkpoint_folders_give_the_original_curve_and_are_evaluated_once(published, tmp_path, monkeypatch):
    glob = str(published / "checkpoint-*")
    result = _relearn(tmp_path / "rl", published, tmp_path / "cache", original_checkpoints=glob)
    # each checkpoint evaluated on the run's validation rows gives what the original run logged at that step
    logged = _logged_curve(published)
    assert [s for s, _ in result.original_curve] == [40, 80, 120]
    for step, loss in result.original_curve:
        assert loss == pytest.approx(logged[step], rel=1e-6)
    assert result.original_steps == 120  # the last checkpoint stands for the budget
    same = first_reach([tuple(p) for p in result.original_curve], result.recovery_threshold, False)
    assert result.original_steps_to_same_loss == same and same is not None
    assert result.original_tokens_to_same_loss == same * 16 * 64 and result.original_tokens == 120 * 16 * 64
    saved = json.loads((tmp_path / "rl" / "relearn_result.json").read_text())
    assert saved["original_curve"] == [list(p) for p in result.original_curve]
    # a second run over the same rows reads every evaluation from the cache
    monkeypatch.setattr(oc, "_evaluate", lambda *a: pytest.fail("evaluated a cached checkpoint again"))
    again = _relearn(tmp_path / "rl2", published, tmp_path / "cache", original_checkpoints=glob)
    assert again.original_curve == result.original_curve


def test_hub_revisions_give_the_same_curve_and_bad_ones_fail_before_training(published, tmp_path):
    with FakeHub() as hub, fake_hub_endpoint(hub, cache_dir=tmp_path / "hub-cache"):
        for step in (40, 80, 120):
            folder = published / f"checkpoint-{step}"
            files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
            hub.commit("fake-user/tiny", files, branch=f"step{step}")
        other = Path(tmp_path / "other")  # the same architecture at another width: not this model's history
        from hf_relearn.model.modeling import load_model

        load_model("gpt2", "n_layer=2,n_embd=64,n_head=2,n_positions=64,vocab_size=259").save_pretrained(other)
        hub.commit("fake-user/tiny", {n: (other / n).read_bytes() for n in ("config.json", "model.safetensors")},
                   branch="wider")  # fmt: skip
        result = _relearn(tmp_path / "rl", published, tmp_path / "cache", original_checkpoints="fake-user/tiny",
                          original_revisions=REVISIONS)  # fmt: skip
        local = _relearn(tmp_path / "rl-local", published, tmp_path / "cache-local",
                         original_checkpoints=str(published / "checkpoint-*"))  # fmt: skip
        assert result.original_curve == local.original_curve
        assert result.original_steps_to_same_loss == local.original_steps_to_same_loss
        for revisions, match in [("step40,step999", "no revision 'step999'"), ("step40,wider=200", "not this model")]:
            with pytest.raises(RelearnError, match=match):
                _relearn(tmp_path / "bad", published, tmp_path / "cache", original_checkpoints="fake-user/tiny",
                         original_revisions=revisions)  # fmt: skip
            assert not (tmp_path / "bad").exists()  # refused before anything trained: nothing half-written
    # the Hub gone: one clear error, nothing trained
    with pytest.raises(RelearnError, match="the Hub could not be reached"):
        _relearn(tmp_path / "gone", published, tmp_path / "cache2", original_checkpoints="fake-user/tiny",
                 original_revisions=REVISIONS)  # fmt: skip
    assert not (tmp_path / "gone").exists()


def test_bad_checkpoint_lists_are_refused_when_the_arguments_are_made(tmp_path):
    make = dict(output_dir=str(tmp_path), block="decoder.0")
    with pytest.raises(RelearnError, match="needs original_checkpoints"):
        RelearnArguments(**make, original_revisions="step1,step2")
    with pytest.raises(RelearnError, match="no step in its name"):
        RelearnArguments(**make, original_checkpoints="org/model", original_revisions="main,step2")
    with pytest.raises(RelearnError, match="at least 2"):
        RelearnArguments(**make, original_checkpoints="org/model", original_revisions="step2")
    with pytest.raises(RelearnError, match="same step"):
        RelearnArguments(**make, original_checkpoints="org/model", original_revisions="step2,final=2")
    with pytest.raises(RelearnError, match="no folder matches"):
        RelearnArguments(**make, original_checkpoints=str(tmp_path / "nothing-*"))
    with pytest.raises(RelearnError, match="not with distill"):
        RelearnArguments(**make, objective="distill", original_checkpoints="o/m", original_revisions="s1,s2")
    assert [c.step for c in oc.parse_checkpoints("o/m", "step20, step10,final=30")] == [10, 20, 30]


def test_a_revision_whose_commit_changed_is_evaluated_again(published, tmp_path, monkeypatch):
    """The cache is keyed on the revision's commit: new weights pushed to the same branch are evaluated afresh."""

    def weights(step: int) -> dict[str, bytes]:
        return {n: (published / f"checkpoint-{step}" / n).read_bytes() for n in ("config.json", "model.safetensors")}

    logged = _logged_curve(published)
    with FakeHub() as hub, fake_hub_endpoint(hub, cache_dir=tmp_path / "hub-cache"):
        hub.commit("fake-user/tiny", weights(40), branch="step40")
        hub.commit("fake-user/tiny", weights(80), branch="step80")
        first = _relearn(tmp_path / "rl", published, tmp_path / "cache", original_checkpoints="fake-user/tiny",
                         original_revisions="step40,step80")  # fmt: skip
        assert first.original_curve[0][1] == pytest.approx(logged[40], rel=1e-6)
        hub.commit("fake-user/tiny", weights(120), branch="step40")  # the branch now points at other weights
        evaluated = []
        monkeypatch.setattr(
            oc, "_evaluate", lambda c, *a, _real=oc._evaluate: evaluated.append(c.name) or _real(c, *a)
        )
        again = _relearn(tmp_path / "rl2", published, tmp_path / "cache", original_checkpoints="fake-user/tiny",
                         original_revisions="step40,step80")  # fmt: skip
    assert evaluated == ["fake-user/tiny@step40"]  # step80, unchanged, is read from the cache
    assert again.original_curve[0][1] == pytest.approx(logged[120], rel=1e-6)
    assert logged[120] < logged[40] * 0.99  # the two evaluations are told apart


def _counting_evaluations(monkeypatch) -> list[str]:
    evaluated: list[str] = []
    real = oc._evaluate
    monkeypatch.setattr(oc, "_evaluate", lambda c, *a: evaluated.append(c.name) or real(c, *a))
    return evaluated


SHORT = dict(max_steps=2, eval_steps=1, stop_at_recovery=False)


def test_other_validation_rows_are_evaluated_again(published, tmp_path, monkeypatch):
    """The cache is keyed on the validation rows too: the same checkpoints on other rows are evaluated afresh."""
    glob = str(published / "checkpoint-*")
    evaluated = _counting_evaluations(monkeypatch)
    first = _relearn(tmp_path / "rl16", published, tmp_path / "cache", {"max_eval_samples": 16},
                     original_checkpoints=glob, **SHORT)  # fmt: skip
    names = [str(published / f"checkpoint-{s}") for s in (40, 80, 120)]
    assert evaluated == names
    evaluated.clear()
    other = _relearn(tmp_path / "rl8", published, tmp_path / "cache", {"max_eval_samples": 8},
                     original_checkpoints=glob, **SHORT)  # fmt: skip
    assert evaluated == names  # none read from the evaluations of the 16 rows
    assert len(list((tmp_path / "cache").glob("*.json"))) == 6
    assert [s for s, _ in other.original_curve] == [40, 80, 120] and other.original_curve != first.original_curve
    evaluated.clear()
    again = _relearn(tmp_path / "rl8-again", published, tmp_path / "cache", {"max_eval_samples": 8},
                     original_checkpoints=glob, **SHORT)  # fmt: skip
    assert evaluated == [] and again.original_curve == other.original_curve  # the same rows: read from the cache


def test_the_original_curve_cache_defaults_to_hf_home(published, tmp_path, monkeypatch):
    import subprocess
    import sys

    from huggingface_hub import constants

    # HF_HOME, as the environment sets it, is where hf-relearn keeps what it computed once
    home = tmp_path / "hf-home"
    code = "from hf_relearn.storage import cache_dir; print(cache_dir('original_curves'))"
    env = {**os.environ, "HF_HOME": str(home)}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == str(home / "hf_relearn" / "original_curves")
    # a relearn given no original_curve_cache writes its evaluations there
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    result = _relearn(tmp_path / "rl", published, None, original_checkpoints=str(published / "checkpoint-*"),
                      **SHORT)  # fmt: skip
    saved = [json.loads(f.read_text()) for f in (home / "hf_relearn" / "original_curves").glob("*.json")]
    assert sorted((d["step"], d["eval_loss"]) for d in saved) == [tuple(p) for p in result.original_curve]
    assert len(saved) == 3


def test_original_steps_overrides_the_last_checkpoint_as_the_budget(published, tmp_path):
    result = _relearn(tmp_path / "rl", published, tmp_path / "cache", original_checkpoints=str(published / "checkpoint-*"),
                      original_steps=100, tolerance=0.05)  # fmt: skip
    assert [s for s, _ in result.original_curve] == [40, 80, 120]  # the last checkpoint is 120 ...
    assert result.original_steps == 100  # ... but the budget is what original_steps says
    assert result.original_tokens == 100 * 16 * 64
    assert result.recovered and result.fraction_of_original == pytest.approx(result.steps_to_recover / 100)


# ----------------------------------------------------------------------------- original checkpoints of another model
def _checkpoints(folder: Path, base: Path, other) -> str:
    """``checkpoint-1``: the base's own weights; ``checkpoint-2``: ``other`` saved. Returns their glob."""
    shutil.copytree(base, folder / "checkpoint-1", ignore=shutil.ignore_patterns("checkpoint-*"))
    other.save_pretrained(folder / "checkpoint-2")
    return str(folder / "checkpoint-*")


def test_original_checkpoints_of_another_model_are_refused_before_anything_is_written(quiet_gpt2_base, tmp_path):
    assert says("a revision whose weights are not this model's (other tensor names")
    config = AutoConfig.from_pretrained(quiet_gpt2_base)
    # the same model_type (gpt2), one layer more: every tensor of the base is there with its shape, plus
    # transformer.h.3.*, names the base has not
    deeper = GPT2LMHeadModel(AutoConfig.from_pretrained(quiet_gpt2_base, n_layer=config.n_layer + 1))
    # another architecture altogether (its model_type is checked before its weights are loaded)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    cases = [
        (deeper, r"is not this model at another step: its weights differ in names or shapes \(first: transformer\.h\.3\."),
        (llama, r"checkpoint-2 is a 'llama' model, the run's is 'gpt2'"),
    ]  # fmt: skip
    for i, (other, message) in enumerate(cases):
        glob = _checkpoints(tmp_path / f"published-{i}", quiet_gpt2_base, other)
        with pytest.raises(RelearnError, match=message):
            relearn_run(tmp_path / f"rl-{i}", quiet_gpt2_base, "decoder.1", original_checkpoints=glob, max_steps=2,
                        eval_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)  # fmt: skip
        assert not (tmp_path / f"rl-{i}").exists()  # refused before any surgery or training: nothing written
    # the base's own weights pass the same check: only the other model was refused
    glob = _checkpoints(tmp_path / "published-own", quiet_gpt2_base, GPT2LMHeadModel.from_pretrained(quiet_gpt2_base))
    result = relearn_run(tmp_path / "rl-own", quiet_gpt2_base, "decoder.1", original_checkpoints=glob, max_steps=2,
                         eval_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)  # fmt: skip
    assert [s for s, _ in result.original_curve] == [1, 2]
    assert result.original_curve[0][1] == pytest.approx(result.baseline_eval_loss, rel=1e-5)  # the base itself


# ---------------------------------------------------------------------- the original run's curve on the relearn plot
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
