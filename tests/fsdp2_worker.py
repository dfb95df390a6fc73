"""One rank of tests/test_fsdp2.py, run under torchrun on CPU (gloo): hf-relearn's surgery on FSDP2-sharded models.

Each model is sharded as accelerate's FSDP2 plugin does with TRANSFORMER_BASED_WRAP (``fully_shard`` on every
transformer layer, then on the root), evaluated once (as the Trainer's baseline evaluation leaves it), then reset;
an unsharded twin gets the same reset. Writes ``rank{R}.json`` into the folder given as the first argument.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import hf_relearn
from hf_relearn.errors import RelearnError
from hf_relearn.model.arms import apply_trainable, normalised_fingerprint
from hf_relearn.model.blocks import BlockMap
from hf_relearn.model.modeling import load_model
from hf_relearn.model.surgery import changed_tensors, fingerprint, reset

GPT2 = dict(n_layer=3, n_embd=32, n_head=2, n_positions=64, vocab_size=259)
T5 = dict(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=259)
LAYERS = {"gpt2": "GPT2Block", "t5": "T5Block"}


def sharded(name: str, overrides: dict, mesh) -> torch.nn.Module:
    model = load_model(name, overrides, seed=0)
    for module in model.modules():
        if type(module).__name__ == LAYERS[name]:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def text_batch(rows: int, width: int) -> torch.Tensor:
    """Real text (this package's own source) as byte ids, the same on every rank."""
    data = b"".join(p.read_bytes() for p in sorted(Path(hf_relearn.__file__).parent.rglob("*.py")))
    ids = torch.tensor(list(data[: rows * width]), dtype=torch.long)
    return ids.reshape(rows, width)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report: dict = {}
    x = text_batch(8, 64)

    # GPT-2: fingerprints through DTensors, reset after an evaluation, then training with one layer trainable
    model, twin = sharded("gpt2", GPT2, mesh), load_model("gpt2", GPT2, seed=0)
    report["tied"] = model.lm_head.weight is model.transformer.wte.weight
    report["sharded"] = type(model.transformer.h[1].attn.c_attn.weight).__name__
    report["fingerprint_differs_from_unsharded"] = changed_tensors(fingerprint(model), fingerprint(twin))
    model.eval()
    with torch.no_grad():
        report["baseline_loss"] = model(input_ids=x, labels=x).loss.item()
    # the evaluation left the root unit (embeddings, tied head) gathered: the first reset must reach its shards,
    # and fingerprinting the gathered copies (as a relearn does after its last evaluation) must not stop FSDP2 from
    # freeing them
    report["root_gathered_after_eval"] = type(model.transformer.wte.weight).__name__
    fingerprint(model)
    for name in ("embeddings", "decoder.1"):
        reset(model, name, seed=0, allow_shared=True)
        reset(twin, name, seed=0, allow_shared=True)
        report[f"gpt2 {name} differs after reset"] = changed_tensors(fingerprint(model), fingerprint(twin))
    try:
        reset(model, "embeddings", seed=0)
        report["tied_refused"] = None
    except RelearnError as e:
        report["tied_refused"] = str(e)
    block = BlockMap(model).resolve("decoder.1")
    model, trainable = apply_trainable(model, block, "block", 8)
    before = normalised_fingerprint(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    report["losses"] = losses
    report["trainable"] = sorted(trainable)
    report["moved"] = changed_tensors(before, normalised_fingerprint(model))
    report["reset_block_digest"] = {n: before[n] for n in block.params}

    # T5: per-module init factors (attention and feed-forward modules hold no tensors of their own)
    model, twin = sharded("t5", T5, mesh), load_model("t5", T5, seed=0)
    for name in ("encoder.1", "decoder.0", "decoder.1.cross_attention"):
        reset(model, name, seed=0)
        reset(twin, name, seed=0)
        report[f"t5 {name} differs after reset"] = changed_tensors(fingerprint(model), fingerprint(twin))

    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    sys.stdout.flush()
    # the process group's threads abort the interpreter's own exit after FSDP2 training on CPU ("terminate called
    # without an active exception", exit -6) even after destroy_process_group; the results are written by now
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
