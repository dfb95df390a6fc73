"""Objectives and arms come from registries: a new objective is one class and one register call, and each objective's
own options reach its loss through the trainer; the distill teacher computes evaluation rows once."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from documented import says
from test_prefix_cache import _batch
from test_relearn import relearn_run
from tiny import TINY

import hf_relearn.relearn.trainer as trainer_module
from hf_relearn.data.datasets import DataArguments, build_datasets
from hf_relearn.data.objectives import OBJECTIVES, CausalLM, distill_loss, get_objective, register_objective
from hf_relearn.data.tokenization import get_tokenizer
from hf_relearn.errors import RelearnError
from hf_relearn.model.arm_registry import ARMS, Arm, get_arm, register_arm
from hf_relearn.model.modeling import load_model
from hf_relearn.relearn.arguments import RelearnArguments
from hf_relearn.relearn.metrics import Teacher
from hf_relearn.relearn.trainer import RelearnTrainer

PACKAGE = Path(__file__).resolve().parents[1] / "hf_relearn"


class TailCausalLM(CausalLM):
    """A toy objective: a causal LM scored on the second half of each block only (the first half is context)."""

    name = "clm-tail"
    description = "causal LM scored on the second half of each block"

    def columns(self, blocks, tokenizer, seed, options):
        labels = blocks.copy()
        labels[:, : blocks.shape[1] // 2] = -100
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": labels}


@pytest.fixture
def tail_objective():
    register_objective(TailCausalLM())
    yield OBJECTIVES["clm-tail"]
    del OBJECTIVES["clm-tail"]


def test_a_registered_objective_runs_through_relearn_with_its_own_rows(gpt2_base, tmp_path, tail_objective):
    result = relearn_run(tmp_path / "tail", gpt2_base, "decoder.1", objective="clm-tail", max_steps=20, eval_steps=10)
    assert result.objective == "clm-tail" and result.frozen_unchanged
    # its baseline is the intact model's loss over the second halves only, computed here row by row
    tokenizer = get_tokenizer("auto", str(gpt2_base))
    data = DataArguments(**json.loads((tmp_path / "tail" / "hf_relearn_data.json").read_text()))  # the base's
    _, evaluation, _ = build_datasets(data, tokenizer, "clm-tail")
    model = load_model(str(gpt2_base)).eval()
    with torch.no_grad():
        ids, labels = torch.tensor(evaluation["input_ids"]), torch.tensor(evaluation["labels"])
        logits = model(input_ids=ids).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        scored = labels[:, 1:] != -100
        expected = (per_token * scored).sum() / scored.sum()
    assert scored.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert result.baseline_eval_loss == pytest.approx(expected.item(), rel=1e-5)
    # and not the plain clm loss of the same rows (close on this corpus, but far outside the tolerance above)
    _, plain, _ = build_datasets(data, tokenizer, "clm")
    with torch.no_grad():
        ids = torch.tensor(plain["input_ids"])
        whole = model(input_ids=ids, labels=ids).loss.item()
    assert whole != pytest.approx(expected.item(), rel=1e-4)


def test_unknown_or_clashing_objectives_and_arms_fail_naming_the_known_ones(tmp_path, tail_objective):
    with pytest.raises(
        RelearnError, match="objective 'nope' unknown; choose one of clm, mlm, seq2seq, distill, clm-tail"
    ):
        RelearnArguments(output_dir=str(tmp_path), objective="nope")
    with pytest.raises(RelearnError, match="trainable 'some' unknown; choose one of block, all, lora-rest"):
        RelearnArguments(output_dir=str(tmp_path), trainable="some")

    class OtherTail(CausalLM):
        name = "clm-tail"
        description = "another"

    with pytest.raises(RelearnError, match="already registered"):
        register_objective(OtherTail())
    with pytest.raises(RelearnError, match="already registered"):
        register_arm(Arm("block", "x", "y", trains_everything=True))
    assert get_objective("clm-tail") is tail_objective and get_arm("block").only_the_block


def test_a_registered_arm_trains_what_it_says(gpt2_base, tmp_path):
    register_arm(Arm("everything-again", "all, registered twice", "every parameter", trains_everything=True))
    try:
        result = relearn_run(tmp_path / "arm", gpt2_base, "decoder.1", trainable="everything-again", max_steps=2,
                             eval_steps=2, stop_at_recovery=False)  # fmt: skip
    finally:
        del ARMS["everything-again"]
    assert result.trainable_parameters == result.total_parameters
    assert result.prefix_cache["enabled"] is False  # layers below the block train: nothing may be cached


def test_the_distill_temperature_reaches_the_loss_through_the_arguments(gpt2_base, tmp_path):
    tokenizer = get_tokenizer("auto", str(gpt2_base))
    train, evaluation, collator = build_datasets(DataArguments(max_eval_samples=8), tokenizer, "distill")
    losses = {}
    for temperature in (1.0, 3.0):
        args = RelearnArguments(output_dir=str(tmp_path / f"t{temperature}"), block="decoder.1", objective="distill",
                                distill_temperature=temperature, max_steps=1, report_to=[], prefix_cache="false",
                                per_device_eval_batch_size=8)  # fmt: skip
        trainer = RelearnTrainer(model=load_model(str(gpt2_base)), args=args, train_dataset=train,
                                 eval_dataset=evaluation, data_collator=collator)  # fmt: skip
        trainer.prepare_relearn()
        batch = next(iter(trainer.get_eval_dataloader()))
        batch = {k: v for k, v in batch.items() if k != "hfr_row"}
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch)).item()
            student, teacher = trainer.model(**batch), trainer.teacher.model(**batch)
        expected = distill_loss(student, teacher, batch["attention_mask"], temperature).item()
        assert loss == pytest.approx(expected, rel=1e-5)
        losses[temperature] = loss
    assert losses[1.0] != pytest.approx(losses[3.0], rel=1e-2)


def test_no_module_compares_an_objective_or_arm_name_outside_its_registry():
    names = set(OBJECTIVES) | set(ARMS)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem in ("objectives", "arm_registry"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in names:
                        found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Dict):  # a mapping keyed by objective or arm names
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                if len(keys) > 1 and set(keys) <= names:
                    found.append(f"{path.name}:{node.lineno}: a dict keyed by {keys}")
    assert not found, "\n".join(found)
    assert re.search(r"register_objective", (PACKAGE.parent / "CONTRIBUTING.md").read_text())


# ----------------------------------------------------------------- the distill teacher computes evaluation rows once
def test_teacher_computes_evaluation_rows_once_within_its_budget():
    model = load_model("gpt2", TINY["gpt2"])
    calls = []
    own = model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return own(*args, **kwargs)

    model.forward = counted
    inputs = {"input_ids": _batch(0, rows=2)["input_ids"]}
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
    other = {"input_ids": _batch(1, rows=2)["input_ids"]}
    for _ in range(2):
        small.outputs(other, torch.tensor([1, 2]))
    assert len(calls) == 3 and small.bytes == one_batch <= small.max_bytes and sorted(small.rows) == [4, 9]
    small.outputs(inputs, rows)
    assert len(calls) == 3  # the stored rows are still served


class _CountingTeachers(list):
    """Every ``Teacher`` made while installed, its model's forward calls counted in ``calls``."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls = 0
        made = self

        class Counted(Teacher):
            def __init__(self, model, *a, **kw):
                super().__init__(model, *a, **kw)
                made.append(self)
                own = self.model.forward

                def counted(*args, **kwargs):
                    made.calls += 1
                    return own(*args, **kwargs)

                self.model.forward = counted

        monkeypatch.setattr(trainer_module, "Teacher", Counted)


# decoder.1 runs with the frozen-prefix cache; decoder.0 has nothing below it to cache: the teacher keeps its
# outputs all the same
@pytest.mark.parametrize("block, cached", [("decoder.1", True), ("decoder.0", False)])
def test_relearn_distill_computes_the_teachers_evaluation_outputs_once(
    quiet_gpt2_base, tmp_path, monkeypatch, block, cached
):
    assert says("With `--objective distill` the teacher's outputs for evaluation rows are computed once too")
    teachers = _CountingTeachers(monkeypatch)
    result = relearn_run(tmp_path / "rl", quiet_gpt2_base, block, objective="distill", max_steps=6, eval_steps=2,
                         stop_at_recovery=False, per_device_train_batch_size=4, per_device_eval_batch_size=4)  # fmt: skip
    assert result.prefix_cache["enabled"] is cached
    # the after-reset evaluation and one every 2 steps: 4 evaluations of the base's 8 rows (2 batches each)
    assert [s for s, _ in result.curve] == [0, 2, 4, 6] and result.steps_trained == 6
    # the teacher runs on each training batch (new rows every step) and once per evaluation batch: 6 + 2, not 6 + 8
    assert len(teachers) == 1 and teachers.calls == 6 + 2
