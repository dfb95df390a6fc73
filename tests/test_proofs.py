"""The proofs a relearn reports must be able to fail: a frozen tensor moved during training refuses the run (one and
two processes), and the trainable=all arm has nothing frozen to prove."""

import json
import textwrap

import pytest
import torch
from test_distributed import launch
from test_relearn import GPT2, base_run, relearn_run
from transformers import TrainerCallback

from hf_relearn import RelearnError
from hf_relearn.relearn.result import smoothed

FROZEN = "transformer.h.0.mlp.c_fc.bias"  # layer 0: frozen when decoder.2 is re-learned


class NudgeFrozen(TrainerCallback):
    """Moves one frozen tensor a little at step ``at`` (what a buggy optimizer or a shared tensor would do)."""

    def __init__(self, name: str = FROZEN, at: int = 2):
        self.name, self.at = name, at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                dict(model.named_parameters())[self.name].add_(1e-4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof-base")
    base_run(out, "gpt2", GPT2, steps=60, max_eval_samples=32)
    return out


def test_a_frozen_tensor_moved_mid_run_refuses_the_relearn_naming_it(base, tmp_path):
    with pytest.raises(RelearnError, match=f"frozen tensors changed during training: {FROZEN}"):
        relearn_run(tmp_path / "r", base, "decoder.2", callbacks=[NudgeFrozen()], max_steps=4, eval_steps=2)
    result = json.loads((tmp_path / "r" / "relearn_result.json").read_text())
    assert result["frozen_unchanged"] is False and result["frozen_changed"] == [FROZEN]
    # the same run without the nudge proves the frozen tensors unchanged
    clean = relearn_run(tmp_path / "clean", base, "decoder.2", max_steps=4, eval_steps=2)
    assert clean.frozen_unchanged and clean.frozen_changed == []


def test_trainable_all_has_nothing_frozen_so_a_moving_tensor_is_allowed(base, tmp_path):
    result = relearn_run(
        tmp_path / "all", base, "decoder.2", trainable="all", callbacks=[NudgeFrozen()], max_steps=4, eval_steps=2
    )
    assert result.frozen_unchanged and result.frozen_changed == []
    assert result.trainable_parameters == result.total_parameters


def test_a_frozen_tensor_moved_on_one_of_two_processes_refuses_the_run(base, tmp_path):
    """Only process 1 moves the tensor: the gathered verdict must still refuse the run on the main process."""
    from pathlib import Path

    script = tmp_path / "nudge.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, json
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_proofs import NudgeFrozen
            from hf_relearn import RelearnError
            from hf_relearn.relearn.arguments import ModelArguments, RelearnArguments
            from hf_relearn.data.datasets import DataArguments
            from hf_relearn.relearn.runner import relearn

            rank = int(os.environ["RANK"])
            args = RelearnArguments(output_dir={str(tmp_path / "two")!r}, block="decoder.2",
                                    original_run={str(base)!r}, max_steps=4, eval_steps=2,
                                    per_device_train_batch_size=8, disable_tqdm=True, report_to=[])
            callbacks = [NudgeFrozen()] if rank == 1 else []
            try:
                relearn(ModelArguments(model={str(base)!r}), DataArguments(), args, callbacks=callbacks, quiet=True)
            except RelearnError as err:
                print(f"rank {{rank}} refused: {{err}}")
                sys.exit(3)
            """
        )
    )
    proc = launch([], script=script)
    assert proc.returncode != 0
    assert f"rank 1 refused: frozen tensors changed during training: {FROZEN}" in proc.stdout
    assert "rank 0 refused: frozen tensors changed during training: on another process" in proc.stdout
    result = json.loads((tmp_path / "two" / "relearn_result.json").read_text())
    assert result["world_size"] == 2 and result["frozen_unchanged"] is False


def test_a_reset_that_differs_on_one_of_two_processes_is_recorded(base, tmp_path):
    """Process 1 nudges one tensor of its freshly reset block: the gathered digests differ, and the result says so
    (DDP then trains from process 0's copy; nothing frozen moved, so the run is not refused)."""
    script = tmp_path / "differ.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys
            import torch
            import hf_relearn.relearn.trainer
            from hf_relearn.relearn.arguments import ModelArguments, RelearnArguments
            from hf_relearn.data.datasets import DataArguments
            from hf_relearn.relearn.runner import relearn

            rank = int(os.environ["RANK"])
            original = hf_relearn.relearn.trainer.reset

            def nudged(model, block, **kwargs):
                report = original(model, block, **kwargs)
                with torch.no_grad():
                    dict(model.named_parameters())[report.tensors[0]].add_(1e-4)
                return report

            if rank == 1:
                hf_relearn.relearn.trainer.reset = nudged
            args = RelearnArguments(output_dir={str(tmp_path / "two")!r}, block="decoder.2",
                                    original_run={str(base)!r}, max_steps=4, eval_steps=2,
                                    per_device_train_batch_size=8, disable_tqdm=True, report_to=[])
            result = relearn(ModelArguments(model={str(base)!r}), DataArguments(), args, quiet=True)
            print(f"rank {{rank}}: " + json.dumps([result.reset_identical_across_ranks, result.frozen_unchanged]))
            """
        )
    )
    proc = launch([], script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: [false, true]" in proc.stdout and "rank 1: [false, true]" in proc.stdout
    result = json.loads((tmp_path / "two" / "relearn_result.json").read_text())
    assert result["world_size"] == 2 and result["reset_identical_across_ranks"] is False
    assert result["frozen_unchanged"] is True and result["frozen_changed"] == []
    assert (tmp_path / "two" / "model.safetensors").exists()  # the run went through to its save


# ------------------------------------------------------------------------------------------ recovery settings
def test_tolerance_abs_sets_the_threshold_and_the_recovery_step(base, tmp_path):
    r = relearn_run(
        tmp_path / "abs", base, "decoder.0", tolerance_abs=0.005, max_steps=100, eval_steps=5, recovery_window=1
    )  # the raw rule: the first evaluation within the threshold
    assert r.recovery_threshold == pytest.approx(r.baseline_eval_loss + 0.005)
    assert r.after_reset_eval_loss > r.recovery_threshold  # the reset moved it further than the tolerance
    first = next(step for step, value in r.curve if value <= r.baseline_eval_loss + 0.005)
    assert r.recovered and r.steps_to_recover == first > 0
    assert r.curve[-1][0] == first  # stopped at recovery


def test_a_higher_is_better_metric_recovers_upwards(base, tmp_path):
    r = relearn_run(
        tmp_path / "acc", base, "decoder.2", metrics=["accuracy"], recovery_metric="accuracy", tolerance=0.05,
        max_steps=60, eval_steps=5,
    )  # fmt: skip
    assert r.recovery_metric == "eval_accuracy" and r.after_reset_metric < r.baseline_metric
    assert r.recovery_threshold == pytest.approx(r.baseline_metric * 0.95)  # below the baseline: accuracy rises
    reached = [step for step, value in smoothed(r.curve, r.recovery_window) if value >= r.recovery_threshold]
    assert r.steps_to_recover == (reached[0] if reached else None)


def test_checkpoint_init_from_the_base_itself_barely_matters_and_says_so(base, tmp_path):
    from hf_relearn.stats.caveats import RESET_BARELY_MATTERED

    r = relearn_run(tmp_path / "ck", base, "decoder.2", init=f"checkpoint:{base}", max_steps=5, eval_steps=5)
    # the block is copied back from the very weights it had: the model is unchanged
    assert r.after_reset_eval_loss == r.baseline_eval_loss and r.steps_to_recover == 0
    assert RESET_BARELY_MATTERED in r.warning_codes


def test_reset_seed_draws_the_block(base, tmp_path):
    runs = {
        name: relearn_run(tmp_path / name, base, "decoder.2", reset_seed=seed, max_steps=1, eval_steps=1)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }
    assert runs["a"].after_reset_eval_loss == runs["b"].after_reset_eval_loss  # the same seed: the same draw
    assert runs["a"].after_reset_eval_loss != runs["c"].after_reset_eval_loss


def test_init_zero_starts_the_block_as_the_identity(base, tmp_path):
    from hf_relearn.model.modeling import load_model

    r = relearn_run(tmp_path / "z", base, "decoder.2", init="zero", max_steps=1, eval_steps=1)
    assert sorted(r.surgery["zeroed"]) == [
        "transformer.h.2.attn.c_proj.bias",
        "transformer.h.2.attn.c_proj.weight",
        "transformer.h.2.mlp.c_proj.bias",
        "transformer.h.2.mlp.c_proj.weight",
    ]
    # a pre-LN block whose output projections are zero adds nothing to the residual stream: the model computes
    # exactly what the same model without layer 2 computes
    model = load_model(str(base)).eval()
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
    reset_model = load_model(str(base)).eval()
    from hf_relearn.model.surgery import reset

    reset(reset_model, "decoder.2", init="zero")
    with torch.no_grad():
        after = reset_model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(after[3], after[2]) and torch.equal(after[2], full[2])


def test_a_base_at_unigram_level_is_flagged(tmp_path):
    from hf_relearn.stats.caveats import UNIGRAM_LEVEL

    base_run(tmp_path / "b", "gpt2", GPT2, steps=2, max_eval_samples=32)  # 2 steps: nothing learned yet
    r = relearn_run(tmp_path / "r", tmp_path / "b", "decoder.2", max_steps=1, eval_steps=1)
    assert UNIGRAM_LEVEL in r.warning_codes


def test_distill_kl_matches_the_formula_and_scales_with_temperature():
    from types import SimpleNamespace

    from hf_relearn.data.objectives import distill_loss

    teacher = SimpleNamespace(logits=torch.tensor([[[2.0, 0.0, -1.0]]]))
    student = SimpleNamespace(logits=torch.tensor([[[0.5, 0.5, 0.0]]]))
    for t in (1.0, 2.0):
        p = torch.softmax(teacher.logits / t, -1)
        q = torch.log_softmax(student.logits / t, -1)
        expected = (p * (p.log() - q)).sum() * t * t
        assert distill_loss(student, teacher, None, t) == pytest.approx(expected.item(), rel=1e-6)
    assert distill_loss(teacher, teacher, None, 2.0) == pytest.approx(0.0, abs=1e-7)
    # padding is left out of the mean
    mask = torch.tensor([[1, 0]])
    two = SimpleNamespace(logits=torch.cat([student.logits, teacher.logits], 1))
    ref = SimpleNamespace(logits=torch.cat([teacher.logits, student.logits], 1))
    assert distill_loss(two, ref, mask, 1.0) == pytest.approx(distill_loss(student, teacher, None, 1.0).item())
    # a model without a head: MSE of the last hidden states
    h = SimpleNamespace(logits=None, last_hidden_state=torch.ones(1, 2, 4))
    z = SimpleNamespace(logits=None, last_hidden_state=torch.zeros(1, 2, 4))
    assert distill_loss(h, z, None, 1.0).item() == pytest.approx(1.0)


def test_a_launch_whose_processes_cannot_see_each_other_is_refused(monkeypatch):
    from types import SimpleNamespace

    from hf_relearn.relearn.arguments import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RelearnError, match="launched 2 processes but the Trainer sees a world of 1"):
        check_world_size(SimpleNamespace(world_size=1))
    check_world_size(SimpleNamespace(world_size=2))  # a launch that formed its group: accepted
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world_size(SimpleNamespace(world_size=1))


@pytest.mark.parametrize("arm", ["all", "lora-rest", "block+lora-rest"])
def test_every_arm_learns_and_a_lora_merge_keeps_the_outputs(base, tmp_path, arm):
    from hf_relearn.model.modeling import load_model

    r = relearn_run(
        tmp_path / arm, base, "decoder.0", trainable=arm, max_steps=40, eval_steps=10, stop_at_recovery=False,
        save_final_model=False,
    )  # fmt: skip
    assert r.curve[-1][1] < r.curve[0][1] * 0.97  # the loss fell: the arm trains something that matters
    assert r.frozen_unchanged
    if "lora" in arm:
        # the merged save computes what the trained peft model computed (same final eval loss)
        from hf_relearn.data.datasets import DataArguments
        from hf_relearn.relearn.arguments import ModelArguments, RelearnArguments
        from hf_relearn.relearn.runner import relearn

        out = tmp_path / f"{arm}-saved"
        args = RelearnArguments(
            output_dir=str(out), block="decoder.0", original_run=str(base), trainable=arm, max_steps=20, eval_steps=10,
            stop_at_recovery=False, disable_tqdm=True, seed=0, report_to=[],
        )  # fmt: skip
        result = relearn(ModelArguments(model=str(base)), DataArguments(), args, quiet=True)
        merged = load_model(str(out))
        assert not any("lora" in n for n, _ in merged.named_parameters())
        data = DataArguments(block_size=64, generated_chars=150_000, max_eval_samples=32)  # the base's data
        check = RelearnArguments(
            output_dir=str(tmp_path / f"{arm}-check"), block="decoder.0", init=f"checkpoint:{out}", original_steps=1,
            max_steps=1, eval_steps=1, disable_tqdm=True, report_to=[], save_final_model=False,
        )  # fmt: skip
        relearned = relearn(ModelArguments(model=str(out)), data, check, quiet=True)
        assert relearned.baseline_eval_loss == pytest.approx(result.final_eval_loss, rel=1e-5)
