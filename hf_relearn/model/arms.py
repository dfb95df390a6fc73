"""The trainable arms of a re-learn (``--trainable``): the block alone, everything, LoRA on the rest (peft), and
the fingerprints that prove the frozen tensors unchanged through a peft wrapper."""

from __future__ import annotations

import torch

from ..errors import RelearnError
from .arm_registry import get_arm
from .blocks import Block, BlockMap
from .surgery import fingerprint, freeze_except


def digest_int(hexdigests: list[str]) -> int:
    """A 60-bit integer summary of some tensor digests (gatherable as an int64 tensor)."""
    import hashlib

    return int(hashlib.blake2b("".join(hexdigests).encode(), digest_size=8).hexdigest(), 16) >> 4


def normalised_fingerprint(model) -> dict[str, str]:
    """Fingerprint keyed by the original parameter names, also through a peft wrapper (LoRA tensors left out)."""
    fp = fingerprint(model)
    out = {}
    for name, digest in fp.items():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = digest
    return out


def wrap_lora_rest(model, block: Block, r: int, train_block: bool, block_map: BlockMap | None = None):
    """peft LoRA on every linear layer of every stack layer outside ``block`` (the block itself left as it is).

    Returns the peft model; only LoRA tensors (and the block, when ``train_block``) require grad.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    bmap = block_map or BlockMap(model)
    in_block = set(block.params)
    targets = []
    for stack in bmap.stacks.values():
        for layer in stack.layers:
            for path, module in model.named_modules():
                if not path.startswith(layer.path + ".") or not isinstance(module, (torch.nn.Linear, Conv1D)):
                    continue
                if any(n.startswith(path + ".") for n in in_block):
                    continue
                targets.append(path)
    if not targets:
        raise RelearnError(f"lora-rest: no linear layer outside {block.name!r} to put LoRA on")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=False)
    peft_model = get_peft_model(model, config)
    # get_peft_model freezes everything but LoRA; a block that trains keeps its own requires_grad
    for n, p in peft_model.named_parameters():
        base = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if base in in_block and "lora_" not in n:
            p.requires_grad_(train_block)
    return peft_model


def apply_trainable(
    model, block: Block, trainable: str, lora_r: int, block_map: BlockMap | None = None
) -> tuple[torch.nn.Module, list[str]]:
    """Make the arm's parameters trainable and freeze the rest; returns (the model, wrapped for LoRA arms, and the
    names of every parameter that may change). Refuses an arm that leaves nothing to train."""
    arm = get_arm(trainable)
    if arm.trains_everything:
        for p in model.parameters():
            p.requires_grad_(True)
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    else:
        names = freeze_except(model, block) if arm.trains_block else freeze_except(model)
    if arm.lora_rest:
        model = wrap_lora_rest(model, block, lora_r, arm.trains_block, block_map)
        names = names + [n for n, p in model.named_parameters() if "lora_" in n]
    if not any(p.requires_grad for p in model.parameters()):
        raise RelearnError(f"nothing to train: block {block.name!r} with trainable={trainable!r}")
    return model, names
