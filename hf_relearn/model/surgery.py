"""Surgery: reset a block to its from-scratch distribution, freeze the rest, prove the rest did not move.

How a reset works (transformers v5). ``from_pretrained`` marks every tensor ``_is_hf_initialized`` and the v5
init helpers skip marked tensors, so ``block.apply(model._init_weights)`` silently does nothing. Instead we mark
every tensor *except the block's* as initialised, clear the module flags and run the model's own
``initialize_weights()`` under a fixed seed: the walk is children-first, so parent-set rules (GPT-2's scaled
``c_proj``, T5's per-module factors) still win, and only the block's tensors are written.

To prove coverage, the block's tensors are filled with NaN first: any tensor the model's init does not write
falls back to its module's own ``reset_parameters()`` (what the constructor does), and any still NaN after
that is an error (and the block is restored), never a silently half-reset block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import RelearnError
from .blocks import Block, BlockMap
from .sharding import (
    gathered,
    numel,
    owner,
    reshard_fsdp,
    sharded_class_origin,
    storage_key,
    whole_shards,
    whole_tensor,
)

INIT_MODES = ("scratch", "zero", "checkpoint:PATH")
# module names of the projections that write a sub-layer's output into the residual stream
_OUTPUT_PROJECTIONS = {
    "c_proj",
    "o_proj",
    "out_proj",
    "down_proj",
    "fc2",
    "o",
    "wo",
    "out_lin",
    "lin2",
    "dense_4h_to_h",
}
_MISSING = object()


@dataclass
class SurgeryReport:
    """What a reset did: the block, how, and exactly which tensors were written."""

    block: str
    init: str
    seed: int
    tensors: list[str]
    num_tensors: int
    num_parameters: int
    zeroed: list[str] = field(default_factory=list)
    shared_with: list[str] = field(default_factory=list)
    fallback_reset_parameters: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- fingerprints
def tensor_digest(t: torch.Tensor) -> str:
    """A content hash of one whole tensor: dtype, shape and every byte. A sharded parameter (FSDP2, ZeRO-3) is
    gathered for it, so every rank computes the same digest (a collective: every rank must call it)."""
    with whole_tensor(t) as t:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
        # a copy, always: numpy() marks the storage it shares as not resizable, and FSDP2 frees a gathered parameter
        # by resizing its storage to 0 (on CPU, .cpu() alone would share the parameter's own storage)
        data = t.detach().to("cpu", copy=True).contiguous().reshape(-1)
    if data.numel():
        h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Hash every parameter and buffer (by every name it has), so a later check can prove them bit-identical."""
    out = {name: tensor_digest(p) for name, p in model.named_parameters(remove_duplicate=False)}
    out.update({name: tensor_digest(b) for name, b in model.named_buffers(remove_duplicate=False)})
    return out


def changed_tensors(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names whose hash differs, or that appeared / disappeared between two fingerprints."""
    return sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))


def check_frozen_unchanged(
    before: dict[str, str], model: nn.Module, allowed: Iterable[str], raise_error: bool = True
) -> list[str]:
    """Prove every tensor not in ``allowed`` is bit-identical to ``before``; return (or raise on) the ones that moved."""
    allowed = set(allowed)
    moved = [n for n in changed_tensors(before, fingerprint(model)) if n not in allowed]
    if moved and raise_error:
        raise RelearnError(f"{len(moved)} frozen tensor(s) changed: {', '.join(moved[:10])}")
    return moved


# ------------------------------------------------------------------------------------------- freezing
def freeze_except(model: nn.Module, *blocks: Block | str, block_map: BlockMap | None = None) -> list[str]:
    """Leave only the parameters of ``blocks`` trainable (``requires_grad``); return their names.

    A parameter tied to one in the block (the same tensor under another name) stays trainable by necessity; its
    other names are included in the returned list.
    """
    bmap = block_map or (BlockMap(model) if any(isinstance(b, str) for b in blocks) else None)
    resolved = [bmap.resolve(b) if isinstance(b, str) else b for b in blocks]
    keep = {id(p) for blk in resolved for n, p in model.named_parameters(remove_duplicate=False) if n in blk.params}
    trainable = []
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            trainable.append(name)
    return trainable


# ------------------------------------------------------------------------------------------- reset
@contextmanager
def _seeded(seed: int, model: nn.Module):
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_resettable(
    model: nn.Module, block: Block, params: dict[str, nn.Parameter], allow_shared: bool
) -> list[str]:
    """Refuse meta / quantised tensors and, unless allowed, tensors shared with places outside the block."""
    for name in block.params:
        p = params[name]
        if p.device.type == "meta":
            raise RelearnError(
                f"cannot reset {block.name!r}: {name} is on the meta device (weights not materialised); "
                "load the model without device_map/offloading, or gather it first"
            )
        if not p.is_floating_point():
            raise RelearnError(
                f"cannot reset {block.name!r}: {name} is {p.dtype} (quantised?); reset needs float weights"
            )
    in_block = set(block.params)
    by_storage: dict[tuple, list[str]] = {}
    for name, p in params.items():
        if (key := storage_key(p)) is not None:
            by_storage.setdefault(key, []).append(name)
    shared = sorted(
        {
            other
            for name in block.params
            if (key := storage_key(params[name])) is not None
            for other in by_storage[key]
            if other not in in_block
        }
    )
    if (shared or block.notes) and not allow_shared:
        why = [f"{n} is the same tensor as a tensor in the block (tied weights)" for n in shared] + list(block.notes)
        raise RelearnError(
            f"cannot reset {block.name!r} alone: " + "; ".join(why) + ". Resetting it would reset every place that "
            "shares it. Pass allow_shared=True (`hf-relearn reset --allow-shared`, `relearn --allow_shared`) to reset it "
            "everywhere it is used."
        )
    return shared


def _reinit_with_model_init(model: PreTrainedModel, target_ids: set[int], seed: int) -> None:
    """Run the model's own ``initialize_weights`` so that it writes only the tensors in ``target_ids``."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    saved_tensor_flags = {i: t.__dict__.get("_is_hf_initialized", _MISSING) for i, t in tensors.items()}
    saved_module_flags = {m: m.__dict__.get("_is_hf_initialized", _MISSING) for m in model.modules()}
    try:
        for i, t in tensors.items():
            t._is_hf_initialized = i not in target_ids
        for m in saved_module_flags:
            m._is_hf_initialized = False
        if original := sharded_class_origin(model):
            # fully_shard made the model's class anew, inside torch: transformers would take it for remote code and
            # skip the init of modules without tensors of their own (GPT-2's scaled c_proj rule)
            model.is_custom_code = original.is_custom_code
        with _seeded(seed, model):
            model.initialize_weights()
    finally:
        model.__dict__.pop("is_custom_code", None)
        for i, t in tensors.items():
            prev = saved_tensor_flags[i]
            if prev is _MISSING:
                t.__dict__.pop("_is_hf_initialized", None)
            else:
                t._is_hf_initialized = prev
        for m, prev in saved_module_flags.items():
            if prev is _MISSING:
                m.__dict__.pop("_is_hf_initialized", None)
            else:
                m._is_hf_initialized = prev


def zero_init_applies(block: Block) -> bool:
    """Whether ``init='zero'`` can make ``block`` an identity (it has residual output projections to zero)."""
    return bool(_output_projections(block))


def _output_projections(block: Block) -> list[str]:
    """The block's parameters that belong to residual-stream output projections (GPT-2 c_proj, T5 o/wo, ...)."""
    out = []
    for name in block.params:
        parts = name.split(".")
        if len(parts) < 2:
            continue
        module, parent = parts[-2], parts[-3] if len(parts) > 2 else ""
        if module in _OUTPUT_PROJECTIONS or (module == "dense" and parent in ("output", "attention")):
            out.append(name)
    return out


def reset(
    model: PreTrainedModel,
    block: str | Block,
    init: str = "scratch",
    seed: int = 0,
    allow_shared: bool = False,
    verify: bool = True,
    block_map: BlockMap | None = None,
) -> SurgeryReport:
    """Reset the tensors of ``block`` in place; every other tensor stays bit-identical.

    ``init``:
      * ``scratch`` — the distribution the model uses when built from its config (its own ``_init_weights``,
        parent-set scaled inits included), drawn from ``seed`` (identical on every rank);
      * ``zero`` — ``scratch``, then the block's residual output projections (and their biases) set to zero, so the
        block starts as the identity in the residual stream (up to a post-LN's normalisation): "layer deleted";
      * ``checkpoint:PATH`` — copy the block's tensors from another checkpoint of the same architecture.

    Refuses (``RelearnError``, model untouched) meta or quantised tensors, and tensors shared with places outside
    the block (tied embeddings, ALBERT's shared layers) unless ``allow_shared``. With ``verify`` it hashes every
    other tensor before and after and restores the block if anything outside it moved.
    """
    if not isinstance(model, PreTrainedModel):
        raise RelearnError(f"reset needs a transformers PreTrainedModel, got {type(model).__name__}")
    if isinstance(block, str):  # a name: resolved on the caller's block map, or one built for it
        block = (block_map or BlockMap(model)).resolve(block)
    reshard_fsdp(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    shared = _check_resettable(model, block, params, allow_shared)
    if not (init in ("scratch", "zero") or init.startswith("checkpoint:")):
        raise RelearnError(f"unknown init {init!r}; choose one of {', '.join(INIT_MODES)}")
    zero_targets = _output_projections(block) if init == "zero" else []
    if init == "zero" and not zero_targets:
        raise RelearnError(
            f"init='zero' needs a block with attention or MLP output projections; {block.name!r} has none "
            "(norms and embeddings cannot be made an identity by zeroing)"
        )
    donor = _load_donor(model, init[len("checkpoint:") :], block) if init.startswith("checkpoint:") else None

    names = sorted(block.params)
    # under ZeRO-3 and FSDP2 the block's tensors exist whole only inside these contexts
    with gathered(list(params.values())), whole_shards(model, names, params) as params:
        targets = {id(params[n]): params[n] for n in names}
        buffers = _block_buffers(model, set(names))
        protected = set(names) | {n for n, _ in buffers} | set(shared)
        fallback = _rewrite_block(model, block, params, targets, buffers, protected, donor, seed, zero_targets, verify)
    notes = list(block.notes)
    if shared:
        notes.append(f"tied tensors reset too, since they are the same storage: {', '.join(shared)}")
    return SurgeryReport(
        block=block.name,
        init=init,
        seed=seed,
        tensors=names + [n for n, _ in buffers],
        num_tensors=len(names) + len(buffers),
        num_parameters=sum(numel(p) for p in targets.values()),
        zeroed=zero_targets,
        shared_with=shared,
        fallback_reset_parameters=fallback,
        notes=notes,
    )


def _rewrite_block(
    model,
    block: Block,
    params: dict,
    targets: dict,
    buffers: list,
    protected: set[str],
    donor,
    seed: int,
    zero_targets: list[str],
    verify: bool,
) -> list[str]:
    """Write the block's new values (donor copy, or NaN-fill then the model's own init), zero what ``init=zero``
    names, and prove nothing outside ``protected`` moved; on any failure the block is restored. Returns the tensors
    reset by ``reset_parameters`` fallbacks."""
    names = sorted(block.params)
    backup = {n: params[n].detach().clone() for n in names}
    before = fingerprint(model) if verify else None
    fallback: list[str] = []
    try:
        with torch.no_grad():
            if donor is not None:
                for n in names:
                    params[n].copy_(donor[n].to(device=params[n].device, dtype=params[n].dtype))
            else:
                for p in targets.values():
                    p.fill_(float("nan"))
                target_ids = set(targets) | {id(b) for _, b in buffers}
                _reinit_with_model_init(model, target_ids, seed)
                fallback = _fallback_reset_parameters(model, names, params, seed)
                for n in zero_targets:
                    params[n].zero_()
        if verify:
            moved = [n for n in changed_tensors(before, fingerprint(model)) if n not in protected]
            if moved:
                raise RelearnError(
                    f"internal check failed: reset of {block.name!r} also changed {', '.join(moved[:10])}"
                )
    except BaseException:
        with torch.no_grad():
            for n, saved in backup.items():
                params[n].copy_(saved)
        raise
    return fallback


def _block_buffers(model: nn.Module, target_names: set[str]) -> list[tuple[str, torch.Tensor]]:
    """Buffers of modules whose parameters all lie in the block (BatchNorm stats, position-id tables)."""
    out = []
    for name, buf in model.named_buffers():
        path, module = owner(model, name)
        owned = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(remove_duplicate=False)]
        if owned and all(n in target_names for n in owned):
            out.append((name, buf))
    return out


def _fallback_reset_parameters(
    model: nn.Module, names: list[str], params: dict[str, nn.Parameter], seed: int
) -> list[str]:
    """Tensors the model's init left untouched (still NaN) get their module's constructor init, else an error."""
    left = [n for n in names if torch.isnan(params[n]).any()]
    if not left:
        return []
    used = []
    with _seeded(seed + 1, model):
        for path in sorted({owner(model, n)[0] for n in left}):
            module = model.get_submodule(path)
            own = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)]
            if hasattr(module, "reset_parameters") and all(n in names for n in own):
                module.reset_parameters()
                used.append(path)
    still = [n for n in names if torch.isnan(params[n]).any()]
    if still:
        raise RelearnError(
            f"{type(model).__name__}'s own initialisation does not cover {', '.join(still[:5])}"
            f"{' ...' if len(still) > 5 else ''}, and no reset_parameters() is available: hf-relearn cannot know the "
            "from-scratch distribution of these tensors. Use init='checkpoint:PATH' with a freshly built model."
        )
    return used


def _load_donor(model: PreTrainedModel, path: str, block: Block) -> dict[str, torch.Tensor]:
    """The block's tensors from another checkpoint of the same architecture (checked: type, names, shapes)."""
    from transformers import AutoConfig

    if not path:
        raise RelearnError("init='checkpoint:PATH' needs a path, e.g. checkpoint:runs/base/checkpoint-0")
    if not (Path(path) / "config.json").exists():
        raise RelearnError(f"init='checkpoint:{path}': no config.json there (not a save_pretrained folder)")
    donor_config = AutoConfig.from_pretrained(path)
    if donor_config.model_type != model.config.model_type:
        raise RelearnError(
            f"init='checkpoint:{path}' is a {donor_config.model_type!r} checkpoint; the model is "
            f"{model.config.model_type!r}: a block can only be copied between checkpoints of the same architecture"
        )
    donor = type(model).from_pretrained(path)
    donor_params = dict(donor.named_parameters(remove_duplicate=False))
    out = {}
    for n in block.params:
        if n not in donor_params:
            raise RelearnError(f"init='checkpoint:{path}': the checkpoint has no tensor {n}")
        want = dict(model.named_parameters(remove_duplicate=False))[n].shape
        if donor_params[n].shape != want:
            raise RelearnError(
                f"init='checkpoint:{path}': {n} has shape {tuple(donor_params[n].shape)} there, {tuple(want)} here"
            )
        out[n] = donor_params[n].detach()
    return out
