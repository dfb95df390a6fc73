"""Where a model keeps its layers, and what the user's block names mean.

All architecture knowledge of hf-relearn lives here, discovered from the module tree:

* a *stack* is the outermost ``nn.ModuleList`` of identical blocks that contain attention or an MLP
  (``transformer.h`` in GPT-2, ``model.layers`` in Llama, ``encoder.block`` / ``decoder.block`` in T5);
* a stack is called ``encoder`` or ``decoder`` from its module path (``model.decoder.layers``) or, for a
  single-stack model with no hint in its path, from the model type (causal LM -> ``decoder``, else
  ``encoder``); a single stack also answers to ``layers``;
* the *parts* of a layer are found by module class and name: self-``attention``, ``cross_attention``,
  ``mlp`` (FFN) and ``norms``. A norm nested inside an attention or MLP sub-module (BERT's
  ``attention.output.LayerNorm``, T5's ``layer.0.layer_norm``) belongs to ``norms``, not to the part.

Grammar (see README): ``decoder.3``, ``decoder.-1``, ``encoder.2:4``, ``decoder.3.mlp``,
``decoder.*.cross_attention``, ``encoder`` (whole stack), ``embeddings``, ``head``, ``final_norm``,
``encoder.final_norm``, or any exact module / parameter path (``transformer.h.3.attn``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel

from ..errors import RelearnError
from .sharding import numel

PARTS = ("attention", "cross_attention", "mlp", "norms")
PART_ALIASES = {
    "attn": "attention",
    "self_attn": "attention",
    "self_attention": "attention",
    "cross_attn": "cross_attention",
    "crossattention": "cross_attention",
    "encoder_attn": "cross_attention",
    "ffn": "mlp",
    "feed_forward": "mlp",
    "norm": "norms",
    "layernorm": "norms",
    "layer_norm": "norms",
}
_CROSS_TOKENS = ("cross", "encdec", "encoder_attn", "enc_dec")
_ATTN_NAMES = {"attn", "self_attn", "attention", "self_attention", "selfattention"}
_MLP_CLASS_TOKENS = ("mlp", "feedforward", "ffn", "denseactdense", "densegatedactdense", "layerff", "moe")
_MLP_NAMES = {"mlp", "ffn", "feed_forward", "fc1", "fc2", "intermediate", "output", "experts", "block_sparse_moe"}


def _is_norm(module: nn.Module) -> bool:
    cls = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "Norm" in cls


def _classify(name: str, module: nn.Module) -> str | None:
    """The part a direct child of a layer (or of a container inside it) belongs to, or None to look deeper."""
    if _is_norm(module):
        return "norms"
    low_name, low_cls = name.lower(), type(module).__name__.lower()
    if any(t in low_name or t in low_cls for t in _CROSS_TOKENS):
        return "cross_attention"
    if "attention" in low_cls or low_name in _ATTN_NAMES:
        return "attention"
    if any(t in low_cls for t in _MLP_CLASS_TOKENS) or low_name in _MLP_NAMES:
        return "mlp"
    return None


def _param_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(remove_duplicate=False)]


def _layer_parts(layer: nn.Module, layer_path: str) -> dict[str, list[str]]:
    """Parameter names of each part of one layer (empty parts left out)."""
    parts: dict[str, list[str]] = {p: [] for p in PARTS}

    def visit(module: nn.Module, path: str) -> None:
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}"
            part = _classify(child_name, child)
            if part is None:
                visit(child, child_path)
            elif part == "norms":
                parts["norms"].extend(_param_names(child, child_path))
            else:
                # norms nested inside attention / MLP containers (BERT, T5) are `norms`, not the part
                nested_norms = {
                    n
                    for sub_path, sub in child.named_modules(prefix=child_path)
                    if _is_norm(sub)
                    for n in _param_names(sub, sub_path)
                }
                parts["norms"].extend(sorted(nested_norms))
                parts[part].extend(n for n in _param_names(child, child_path) if n not in nested_norms)

    visit(layer, layer_path)
    return {p: names for p, names in parts.items() if names}


@dataclass
class Layer:
    index: int
    path: str
    params: list[str]
    parts: dict[str, list[str]]


@dataclass
class Stack:
    name: str
    path: str  # the ModuleList
    layers: list[Layer]
    owner: str | None = None  # the whole stack module (an enc-dec model's encoder / decoder)
    applied_depth: int | None = None  # depth at which the layers are applied, when weights are shared


@dataclass(frozen=True)
class Block:
    """A resolved block: the exact parameters a name stands for."""

    name: str
    kind: str  # stack | layer | layers | part | embeddings | head | final_norm | module
    params: tuple[str, ...]
    modules: tuple[str, ...] = ()
    layers: tuple[tuple[str, int], ...] = ()  # (stack, index) of the layers it touches
    notes: tuple[str, ...] = field(default=())


def _single_stack_role(model: PreTrainedModel) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if getattr(cfg, "is_decoder", False):
        return "decoder"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def _path_role(path: str) -> str | None:
    for token in path.lower().split("."):
        if "decoder" in token:
            return "decoder"
        if "encoder" in token:
            return "encoder"
    return None


def _has_block_content(module: nn.Module) -> bool:
    return any(
        _classify(n.rsplit(".", 1)[-1], m) in ("attention", "cross_attention", "mlp")
        for n, m in module.named_modules()
        if n
    )


class BlockMap:
    """The stacks, layers and parts of a model, and the resolver for block names.

    Guarantees: every name it lists resolves; ``resolve`` returns the exact parameter names (as in
    ``model.named_parameters(remove_duplicate=False)``) a name stands for, or raises ``RelearnError``
    listing what is valid.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.param_numel = {n: numel(p) for n, p in model.named_parameters(remove_duplicate=False)}
        self.module_paths = {n for n, _ in model.named_modules(remove_duplicate=False)}
        self.stacks: dict[str, Stack] = {}
        self._discover_stacks()
        self._discover_non_blocks()

    # ---------------------------------------------------------------- discovery
    def _discover_stacks(self) -> None:
        model = self.model
        found: list[tuple[str, nn.ModuleList]] = []
        for path, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if any(path.startswith(p + ".") for p, _ in found):
                continue  # nested inside a layer already found (T5's layer list, MoE experts)
            if len({type(m) for m in module}) != 1 or not _has_block_content(module[0]):
                continue
            found.append((path, module))
        if not found:
            raise RelearnError(
                f"{type(model).__name__}: found no stack of repeated transformer layers in the module tree; "
                "name blocks by their exact module path instead."
            )
        cfg = model.config
        for path, module in found:
            role = _path_role(path) or (_single_stack_role(model) if len(found) == 1 else None) or path
            name = role if role not in self.stacks else path
            layers = []
            for i, layer in enumerate(module):
                lp = f"{path}.{i}"
                layers.append(Layer(i, lp, _param_names(layer, lp), _layer_parts(layer, lp)))
            stack = Stack(name, path, layers)
            if getattr(cfg, "is_encoder_decoder", False) and name in ("encoder", "decoder"):
                owner_module = model.get_encoder() if name == "encoder" else model.get_decoder()
                stack.owner = next((p for p, m in model.named_modules() if m is owner_module), None)
            depth = getattr(cfg.get_text_config(), "num_hidden_layers", None) if len(found) == 1 else None
            if isinstance(depth, int) and depth > len(layers):
                stack.applied_depth = depth  # ALBERT: one layer group applied num_hidden_layers times
            self.stacks[name] = stack

    def _discover_non_blocks(self) -> None:
        model = self.model
        in_stack = tuple(s.path + "." for s in self.stacks.values())

        def outside(path: str) -> bool:
            return not path.startswith(in_stack)

        # head: everything outside the backbone, or the output embeddings of a model that is its own base
        head: set[str] = set()
        base = model.base_model
        if base is not model:
            base_prefix = next(p for p, m in model.named_modules() if m is base)
            head = {n for n in self.param_numel if not n.startswith(base_prefix + ".")}
        else:
            out = model.get_output_embeddings()
            if out is not None:
                out_path = next(p for p, m in model.named_modules(remove_duplicate=False) if m is out)
                head = set(_param_names(out, out_path))
        self.head = sorted(head)

        embeddings: set[str] = set()
        named = dict(model.named_modules(remove_duplicate=False))
        for path, module in named.items():
            if not outside(path) or any(n.startswith(path + ".") for n in self.head) or path in ("",):
                continue
            if isinstance(module, nn.Embedding) and not any(n.startswith(path + ".") for n in head):
                parent_path = path.rsplit(".", 1)[0] if "." in path else ""
                parent = named.get(parent_path)
                if parent_path and type(parent).__name__.endswith("Embeddings") and parent is not base:
                    embeddings.update(_param_names(parent, parent_path))
                else:
                    embeddings.update(_param_names(module, path))
            elif _is_norm(module) and "embed" in path.rsplit(".", 1)[-1].lower():
                embeddings.update(_param_names(module, path))  # BART's layernorm_embedding
        self.embeddings = sorted(embeddings)

        final_norm: set[str] = set()
        for path, module in named.items():
            if path and outside(path) and _is_norm(module):
                names = set(_param_names(module, path))
                if not names & (embeddings | head):
                    final_norm |= names
        self.final_norm = sorted(final_norm)
        self._discover_others(outside, base)

    def _discover_others(self, outside, base) -> None:
        """Every other module outside the stacks with parameters of its own (BERT's ``pooler``, a classifier in the
        backbone), under its name relative to the backbone, so that ``blocks`` lists everything one may reset."""
        covered = set(self.embeddings) | set(self.head) | set(self.final_norm)
        base_prefix = next((p for p, m in self.model.named_modules() if m is base), "")
        taken = {"embeddings", "head", "final_norm", "layers", *self.stacks}
        self.others: dict[str, list[str]] = {}
        for name in self.param_numel:
            if name in covered or not outside(name):
                continue
            rel = name[len(base_prefix) + 1 :] if base_prefix and name.startswith(base_prefix + ".") else name
            key = rel.split(".")[0]
            if "." in rel and key not in taken:
                self.others.setdefault(key, []).append(name)

    # ---------------------------------------------------------------- listing
    def _stack(self, name: str) -> Stack | None:
        if name in self.stacks:
            return self.stacks[name]
        if name == "layers" and len(self.stacks) == 1:
            return next(iter(self.stacks.values()))
        return None

    def numel(self, block: Block) -> int:
        """Number of distinct parameters (tied tensors counted once)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return sum({id(params[n]): numel(params[n]) for n in block.params}.values())

    def names(self) -> list[Block]:
        """Every valid name (no wildcards or ranges), each resolved: stacks, layers, parts, non-blocks."""
        out = []
        for stack in self.stacks.values():
            out.append(self.resolve(stack.name))
            for layer in stack.layers:
                out.append(self.resolve(f"{stack.name}.{layer.index}"))
                out.extend(self.resolve(f"{stack.name}.{layer.index}.{p}") for p in layer.parts)
            if stack.owner is not None and self._final_norm_of(stack):
                out.append(self.resolve(f"{stack.name}.final_norm"))
        for name in ("embeddings", "head", "final_norm"):
            if getattr(self, name):
                out.append(self.resolve(name))
        return out + [self.resolve(name) for name in self.others]

    def summary(self) -> str:
        """One line per stack and non-block: what names are valid (used in error messages)."""
        lines = []
        for s in self.stacks.values():
            n = len(s.layers)
            parts = sorted({p for layer in s.layers for p in layer.parts}, key=PARTS.index)
            alias = " (alias: layers)" if len(self.stacks) == 1 else ""
            lines.append(
                f"  {s.name}{alias}: layers {s.name}.0 .. {s.name}.{n - 1} (or {s.name}.-{n} .. {s.name}.-1, "
                f"ranges {s.name}.A:B, all {s.name}.*); parts: {', '.join(parts)}"
            )
        extra = [n for n in ("embeddings", "head", "final_norm") if getattr(self, n)] + list(self.others)
        if extra:
            lines.append(f"  also: {', '.join(extra)}")
        lines.append("  or an exact module/parameter path (e.g. the output of `hf-relearn blocks MODEL --paths`)")
        return "\n".join(lines)

    def _unknown(self, name: str, why: str) -> RelearnError:
        return RelearnError(
            f"unknown block {name!r}: {why}\nValid names for {type(self.model).__name__}:\n{self.summary()}"
        )

    def _final_norm_of(self, stack: Stack) -> list[str]:
        return [n for n in self.final_norm if stack.owner and n.startswith(stack.owner + ".")]

    # ---------------------------------------------------------------- resolving
    def resolve(self, name: str) -> Block:
        """Resolve a block name to its parameters; raises RelearnError naming the valid choices."""
        if not isinstance(name, str) or not name.strip():
            raise self._unknown(str(name), "empty name")
        name = name.strip()
        if name in ("embeddings", "head", "final_norm"):
            params = getattr(self, name)
            if not params:
                raise self._unknown(name, f"{type(self.model).__name__} has no {name}")
            return Block(name, name, tuple(params))
        if name in self.others:
            return Block(name, "module", tuple(sorted(self.others[name])))
        tokens = name.split(".")
        stack = self._stack(tokens[0])
        if stack is None:
            return self._resolve_path(name)
        if len(tokens) == 1:
            params = self._stack_params(stack)
            layers = tuple((stack.name, layer.index) for layer in stack.layers)
            modules = (stack.owner or stack.path,)
            return Block(stack.name, "stack", tuple(params), modules, layers, self._shared_notes(stack))
        if tokens[1] == "final_norm" and len(tokens) == 2:
            params = self._final_norm_of(stack)
            if not params:
                raise self._unknown(name, f"stack {stack.name} has no final norm of its own")
            return Block(f"{stack.name}.final_norm", "final_norm", tuple(params))
        indices, canonical = self._layer_indices(stack, tokens[1], name)
        if len(tokens) == 2:
            params = [n for i in indices for n in stack.layers[i].params]
            kind = "layer" if len(indices) == 1 else "layers"
            modules = tuple(stack.layers[i].path for i in indices)
            layers = tuple((stack.name, i) for i in indices)
            return Block(f"{stack.name}.{canonical}", kind, tuple(params), modules, layers, self._shared_notes(stack))
        if len(tokens) == 3:
            part = PART_ALIASES.get(tokens[2].lower(), tokens[2].lower())
            params = []
            for i in indices:
                layer = stack.layers[i]
                if part not in layer.parts:
                    have = ", ".join(layer.parts) or "none"
                    raise RelearnError(
                        f"block {name!r}: layer {stack.name}.{i} of {type(self.model).__name__} has no {part!r}; "
                        f"its parts are: {have}"
                    )
                params.extend(layer.parts[part])
            layers = tuple((stack.name, i) for i in indices)
            return Block(
                f"{stack.name}.{canonical}.{part}", "part", tuple(params), (), layers, self._shared_notes(stack)
            )
        raise self._unknown(name, "too many dots: the form is STACK.LAYER[.PART]")

    def _stack_params(self, stack: Stack) -> list[str]:
        if stack.owner is not None:
            return [n for n in self.param_numel if n.startswith(stack.owner + ".")]
        return [n for layer in stack.layers for n in layer.params]

    def _shared_notes(self, stack: Stack) -> tuple[str, ...]:
        if stack.applied_depth is None:
            return ()
        return (
            f"{type(self.model).__name__} shares layer weights: its {len(stack.layers)} stored layer(s) in "
            f"{stack.path} are applied {stack.applied_depth} times (num_hidden_layers={stack.applied_depth}), "
            "so resetting one resets it at every depth where it is used",
        )

    def _layer_indices(self, stack: Stack, sel: str, name: str) -> tuple[list[int], str]:
        n = len(stack.layers)
        valid = f"{stack.name} has {n} layers: use 0..{n - 1} or -{n}..-1"
        if sel == "*":
            return list(range(n)), "*"
        m = re.fullmatch(r"(-?\d*):(-?\d*)", sel)
        if m:
            start = int(m.group(1)) if m.group(1) else 0
            stop = int(m.group(2)) if m.group(2) else n
            for bound in (start, stop):
                if not -n <= bound <= n:
                    raise RelearnError(f"block {name!r}: range bound {bound} out of range; {valid}")
            indices = list(range(n))[start:stop]
            if not indices:
                raise RelearnError(f"block {name!r}: the range {sel} selects no layer; {valid}")
            return indices, f"{indices[0]}:{indices[-1] + 1}"
        if re.fullmatch(r"-?\d+", sel):
            i = int(sel)
            if not -n <= i < n:
                raise RelearnError(f"block {name!r}: layer {i} out of range; {valid}")
            i %= n
            return [i], str(i)
        raise self._unknown(name, f"{sel!r} is not a layer index, range A:B or *")

    def _resolve_path(self, name: str) -> Block:
        if name in self.param_numel:
            return Block(name, "module", (name,))
        if name in self.module_paths and name:
            params = [n for n in self.param_numel if n.startswith(name + ".")]
            if not params:
                raise RelearnError(f"block {name!r}: module {name} has no parameters to reset")
            layers = tuple(
                (s.name, layer.index)
                for s in self.stacks.values()
                for layer in s.layers
                if name == layer.path or name.startswith(layer.path + ".")
            )
            return Block(name, "module", tuple(params), (name,), layers)
        raise self._unknown(name, "not a stack, non-block name, module path or parameter name")
