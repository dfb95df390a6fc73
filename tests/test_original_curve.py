"""The original curve from a base's published checkpoints: local checkpoint folders, or Hub revisions served by the
loopback Hub (tests/hub_server.py)."""

import json
from pathlib import Path

import pytest
from hub_server import FakeHub, fake_hub_endpoint

from hf_relearn import original_curve as oc
from hf_relearn.data import DataArguments
from hf_relearn.errors import RelearnError
from hf_relearn.result import first_reach
from hf_relearn.runner import ModelArguments, PretrainArguments, pretrain, relearn
from hf_relearn.trainer import RelearnArguments

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


def _relearn(out: Path, base: Path, cache: Path, **kw):
    args = RelearnArguments(
        output_dir=str(out), block="decoder.1", max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3,
        eval_steps=20, disable_tqdm=True, original_curve_cache=str(cache), original_tokens_per_step=16 * 64, **kw,
    )  # fmt: skip
    return relearn(ModelArguments(model=str(base)), DataArguments(**DATA), args)


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
        from hf_relearn.modeling import load_model

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
