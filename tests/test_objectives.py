"""Objectives and arms come from registries: a new objective is one class and one register call, and each objective's
own options reach its loss through the trainer."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_relearn import relearn_run

from hf_relearn.arm_registry import ARMS, Arm, get_arm, register_arm
from hf_relearn.config import RelearnArguments
from hf_relearn.data import DataArguments, build_datasets
from hf_relearn.errors import RelearnError
from hf_relearn.modeling import load_model
from hf_relearn.objectives import OBJECTIVES, CausalLM, distill_loss, get_objective, register_objective
from hf_relearn.tokenization import get_tokenizer
from hf_relearn.trainer import RelearnTrainer

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
    for path in sorted(PACKAGE.glob("*.py")):
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
