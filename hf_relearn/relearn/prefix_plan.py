"""Frozen-prefix planning: which modules a run may skip, and the row index that lets a batch find its cached rows.

``plan_prefix`` finds the largest frozen prefix of a model given its trainable parameters (or says why there is
none), ``active_dropout`` lists the dropout that would make a cached prefix inexact, and ``with_row_index`` /
``RowCollator`` carry each example's index (``ROW_COLUMN``) from the dataset into the batch. The storage and serving
of the cached outputs is ``prefix_cache.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RelearnError
from ..model.blocks import BlockMap

ROW_COLUMN = "hfr_row"  # example index added to the datasets so that a batch can find its cached rows
MODES = ("auto", "true", "false")


# ------------------------------------------------------------------------------------------------------- plan
@dataclass
class PrefixPlan:
    """Which modules a run may skip and whose outputs stand in for them.

    ``stack`` / ``boundary``: the layers ``0..boundary-1`` of that stack are skipped (they all return the output of
    layer ``boundary-1``); ``encoder``: the module path of an encoder-decoder's encoder when it is skipped too.
    """

    stack: str
    boundary: int
    layer_paths: list[str]
    encoder: str | None = None

    @property
    def captures(self) -> list[str]:
        """Module paths whose outputs are stored, in forward order (the encoder first)."""
        out = [self.encoder] if self.encoder else []
        return out + ([self.layer_paths[self.boundary - 1]] if self.boundary > 0 else [])

    @property
    def skipped(self) -> dict[str, str]:
        """Skipped module path -> the capture whose output it returns."""
        out = {self.encoder: self.encoder} if self.encoder else {}
        for i in range(self.boundary):
            out[self.layer_paths[i]] = self.layer_paths[self.boundary - 1]
        return out

    def describe(self) -> str:
        parts = [f"the encoder ({self.encoder})"] if self.encoder else []
        if self.boundary:
            parts.append(
                f"{self.stack} layers 0-{self.boundary - 1}" if self.boundary > 1 else f"{self.stack} layer 0"
            )
        return " and ".join(parts)


def plan_prefix(
    model: nn.Module, trainable: Iterable[str], *, block_map: BlockMap | None = None
) -> tuple[PrefixPlan | None, str]:
    """The largest frozen prefix of ``model`` given the names of its trainable parameters, or ``(None, reason)``.

    Guarantees: every parameter of a skipped module is outside ``trainable``; nothing is skipped when an embedding
    trains (it feeds every layer) or when the first trainable parameter is in the first layer of a single stack.
    ``block_map``: the run's :class:`BlockMap` of ``model``, used as it is (one is built when it is not given).
    """
    trainable = set(trainable)
    if not trainable:
        return None, "nothing is trainable"
    bmap = BlockMap(model) if block_map is None else block_map
    try:
        embeddings = set(bmap.resolve("embeddings").params)
    except RelearnError:  # a model without input embeddings of its own
        embeddings = set()
    if trainable & embeddings:
        return None, "a trainable tensor is in the embeddings, which feed every layer: there is no frozen prefix"
    encoder_path = None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "encoder" in bmap.stacks:
        encoder = model.get_encoder()
        encoder_path = next(p for p, m in model.named_modules() if m is encoder)
        if any(n.startswith(encoder_path + ".") for n in trainable):
            stack = bmap.stacks["encoder"]
            encoder_path = None
        else:
            stack = bmap.stacks["decoder"]
    elif len(bmap.stacks) == 1:
        stack = next(iter(bmap.stacks.values()))
    else:
        return None, f"cannot tell the forward order of the stacks {', '.join(bmap.stacks)}"
    layer_paths = [layer.path for layer in stack.layers]
    boundary = len(layer_paths)
    for i, layer in enumerate(stack.layers):
        if trainable & set(layer.params):
            boundary = i
            break
    if stack.applied_depth is not None:
        return None, f"the {stack.name} layers share weights (applied more often than stored): not cached"
    if boundary == 0 and encoder_path is None:
        return None, f"the first trainable tensor is in {stack.name} layer 0: nothing below it to cache"
    return PrefixPlan(stack.name, boundary, layer_paths, encoder_path), ""


def active_dropout(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """Dropout that is active in train mode inside the modules ``paths`` (``nn.Dropout`` and ``*dropout*`` rates)."""
    found = []
    for path in paths:
        for name, module in model.get_submodule(path).named_modules(prefix=path):
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                found.append(f"{name} (p={module.p:g})")
            for attr, value in vars(module).items():
                if "dropout" in attr and isinstance(value, float) and value > 0:
                    found.append(f"{name}.{attr}={value:g}")
    return found


# ------------------------------------------------------------------------------------------------------- data
def with_row_index(dataset):
    """``dataset`` with an integer ``hfr_row`` column (its example index), for 🤗 and torch datasets alike."""
    if dataset is None:
        return None
    if hasattr(dataset, "add_column"):
        if ROW_COLUMN in dataset.column_names:
            return dataset
        return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    return _IndexedDataset(dataset)


class _IndexedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], ROW_COLUMN: i}


class RowCollator:
    """Wraps a collator: takes ``hfr_row`` out of the features, collates the rest, puts the rows back as a tensor."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        if not features or ROW_COLUMN not in features[0]:
            return self.collator(features)
        rows = torch.tensor([int(f[ROW_COLUMN]) for f in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != ROW_COLUMN} for f in features])
        batch[ROW_COLUMN] = rows
        return batch
