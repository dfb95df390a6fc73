"""Surgery on sharded parameters, on CPU: FSDP2 for real (2 gloo processes, `tests/fsdp2_worker.py`); ZeRO-3's
partitioned parameters as DeepSpeed leaves them, with a stand-in for its GatheredParameters (no DeepSpeed here).

accelerate enables FSDP only on accelerators, so the Trainer's FSDP2 path itself waits for a GPU; these tests run
hf-relearn's own reset, tied-weight check, fingerprints and parameter counts on models sharded as accelerate's FSDP2
plugin shards them with TRANSFORMER_BASED_WRAP (``fully_shard`` per transformer layer, then the root).
"""

import json
import os
import socket
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hf_relearn.errors import RelearnError
from hf_relearn.model.blocks import BlockMap
from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import changed_tensors, fingerprint, reset

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch without gloo")
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(WORKER), str(out)]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_models_really_are_sharded(ranks):
    for report in ranks:
        assert report["sharded"] == "DTensor"
        assert report["tied"]  # GPT-2's head is its token embedding: one DTensor under two names
        assert report["root_gathered_after_eval"] == "Parameter"  # what the first reset below has to cope with


def test_fingerprints_of_shards_equal_those_of_the_whole_model(ranks):
    for report in ranks:
        assert report["fingerprint_differs_from_unsharded"] == []


@pytest.mark.parametrize(
    "key",
    [
        "gpt2 embeddings differs after reset",  # the root unit, gathered by the evaluation; tied to the head
        "gpt2 decoder.1 differs after reset",  # GPT-2's scaled c_proj init (a rule of a module without tensors)
        "t5 encoder.1 differs after reset",
        "t5 decoder.0 differs after reset",
        "t5 decoder.1.cross_attention differs after reset",
    ],
)
def test_a_reset_of_shards_is_the_reset_of_the_whole_model(ranks, key):
    """The same tensors, bit for bit, as the same reset of an unsharded twin: not every rank's shard drawn from
    the same local random numbers, not the init of a class fully_shard made anew."""
    for report in ranks:
        assert report[key] == []


def test_tied_weights_are_found_among_shards(ranks):
    for report in ranks:
        assert report["tied_refused"] and "lm_head.weight is the same tensor" in report["tied_refused"]


def test_training_a_sharded_model_moves_exactly_the_trainable_layer(ranks):
    first, second = ranks
    assert first["moved"] == first["trainable"] and len(first["trainable"]) == 12
    assert first["moved"] == second["moved"]
    assert first["reset_block_digest"] == second["reset_block_digest"]
    assert first["losses"] == second["losses"] and first["losses"][-1] < first["losses"][0]


class FakeDeepSpeed(types.ModuleType):
    """``deepspeed.zero.GatheredParameters`` as ZeRO-3 behaves on one rank (DeepSpeed does not run here): inside,
    each listed partitioned parameter holds its whole tensor (ones already gathered are left alone); on exit the
    modifier rank's writes are kept, any other writes dropped, and the local data is empty again. This fake
    releases a tensor listed twice twice, losing its writes; hf-relearn lists a tied tensor once, whatever DeepSpeed
    does with a repeat."""

    def __init__(self):
        super().__init__("deepspeed")
        self.zero = types.SimpleNamespace(GatheredParameters=self.gathered)
        self.gathers = 0

    @contextmanager
    def gathered(self, params, modifier_rank=None):
        todo = [p for p in params if hasattr(p, "ds_id") and p.numel() != p.ds_numel]
        self.gathers += bool(todo)
        for p in todo:
            p.data = p.ds_full.clone()
        try:
            yield
        finally:
            for p in todo:
                if modifier_rank is not None:
                    p.ds_full = p.data
                p.data = torch.empty(0, dtype=p.dtype)


def _partitioned_like_zero3(model: torch.nn.Module) -> None:
    """What ZeRO-3 leaves on a rank outside GatheredParameters: each parameter an empty tensor with a ds_id (its
    whole value kept aside for FakeDeepSpeed, as the other ranks' partitions would hold it)."""
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_numel, p.ds_full = i, p.numel(), p.data.clone()
        p.data = torch.empty(0, dtype=p.dtype)


def _tiny_gpt2() -> torch.nn.Module:
    return load_model("gpt2", dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=259), seed=0)


def test_tied_weights_are_found_among_zero3_partitions():
    model = _tiny_gpt2()
    _partitioned_like_zero3(model)
    with pytest.raises(RelearnError, match="lm_head.weight is the same tensor"):
        reset(model, "embeddings")


def test_zero3_fingerprints_hash_the_whole_parameters(monkeypatch):
    """Outside a gather a partition's local data is empty: hashed as it is, every frozen proof would pass."""
    deepspeed = FakeDeepSpeed()
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    model, twin = _tiny_gpt2(), _tiny_gpt2()
    _partitioned_like_zero3(model)
    assert fingerprint(model) == fingerprint(twin) and deepspeed.gathers > 0
    model.transformer.h[1].mlp.c_fc.weight.ds_full[0, 0] += 1
    assert changed_tensors(fingerprint(twin), fingerprint(model)) == ["transformer.h.1.mlp.c_fc.weight"]


def test_a_reset_of_zero3_partitions_is_the_reset_of_the_whole_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", FakeDeepSpeed())
    model, twin = _tiny_gpt2(), _tiny_gpt2()
    _partitioned_like_zero3(model)
    assert BlockMap(model).numel(BlockMap(model).resolve("decoder.1")) == 12_704  # whole tensors, not empty partitions
    report, twin_report = reset(model, "decoder.1", seed=0), reset(twin, "decoder.1", seed=0)
    assert report.num_parameters == twin_report.num_parameters == 12_704
    assert fingerprint(model) == fingerprint(twin) != fingerprint(_tiny_gpt2())
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned again afterwards


def test_fingerprinting_leaves_every_storage_resizable():
    """numpy() marks the storage it shares as not resizable; a fingerprint that hashed the parameters through it
    left FSDP2 unable to free a gathered parameter (found as a crash in save_pretrained after a relearn)."""
    model = _tiny_gpt2()
    fingerprint(model)
    assert all(p.untyped_storage().resizable() for p in model.parameters())


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_swaps_lora_and_distill_are_refused_under_sharding_before_anything_runs(tmp_path, monkeypatch, flag):
    """The Trainer as an FSDP / DeepSpeed launch makes it (the flag its accelerator sets); the block arm passes."""
    from test_relearn import GPT2, base_run, relearn_run
    from transformers import Trainer

    base_run(tmp_path / "base", "gpt2", GPT2, steps=20)
    made = Trainer.create_accelerator_and_postprocess

    def sharded(self):
        made(self)
        setattr(self, flag, True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", sharded)
    for settings, named in (
        (dict(trainable="lora-rest"), "--trainable lora-rest"),
        (dict(objective="distill"), "--objective distill"),
    ):
        with pytest.raises(RelearnError, match=f"{named} cannot run under FSDP / DeepSpeed.*ddp.yaml"):
            relearn_run(tmp_path / named, tmp_path / "base", "decoder.1", max_steps=2, **settings)
        assert not (tmp_path / named).exists()  # nothing half-written: not even the folder the Trainer made
    # unsharded, the same arm runs
    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", made)
    result = relearn_run(tmp_path / "plain", tmp_path / "base", "decoder.1", max_steps=2, eval_steps=1,
                         trainable="lora-rest", stop_at_recovery=False, save_final_model=False)  # fmt: skip
    assert result.steps_trained == 2
