"""Frozen-prefix cache: train and evaluate block L without running the frozen modules below it.

When only block L (and modules after it in the forward order) can change, everything that runs before it — the
layers ``0..L-1`` of its stack and, for a decoder block of an encoder-decoder, the whole encoder — computes the same
output for the same input every time, in eval mode. ``PrefixCache`` stores those outputs per example the first
time the example is seen and, from then on, the skipped modules hand them back instead of computing:

* **what**: the output of the last skipped layer (the hidden states entering block L, plus whatever else the stack
  passes from layer to layer, such as T5's position bias) and the encoder's output where the encoder is skipped.
  Masks, position ids and rotary tables are recomputed by the model's own forward, which is cheap: the model runs as
  usual, its skipped modules just return at once (``module.forward`` is replaced on the instance and restored);
* **when**: lazily, per example, on first sight (one eval-mode, no-grad forward that stops at the boundary). A run
  that recovers in 50 steps computes the prefix for the rows it saw, not for the whole training set; evaluation
  rows are computed once and reused at every evaluation;
* **where**: in memory, or in memory-mapped files on disk (``torch.from_file``) when the planned size exceeds the
  memory budget. Not Arrow: an Arrow table is written once and whole, while this cache is filled row by row as the
  run meets its examples; a memory-mapped file is the same mechanism, writable in place;
* **exact or refused**: a cached row is served only when the inputs it was computed from are identical (checked on
  every use: a collator that masks, crops or augments at random is caught), every sequence must keep its length, and
  the frozen modules run in eval mode (no dropout). ``plan_prefix`` says why no cache is possible for a setup.

Sharing: one ``PrefixCache`` can serve several runs over the same frozen base and data (a study). With
``capture_all=True`` each fill also stores every lower layer boundary of the stack, which the forward computes on
its way anyway, so one pass over the data fills the caches for every layer below.

This module holds the storage and serving (``PrefixCache``, ``default_memory_budget``); the planning (``PrefixPlan``,
``plan_prefix``, ``active_dropout``, ``MODES``, the row index ``ROW_COLUMN`` / ``with_row_index`` / ``RowCollator``)
is ``prefix_plan.py``, and its names are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..errors import RelearnError
from .prefix_plan import (
    PrefixPlan,
)

logger = logging.getLogger("hf_relearn")


# ------------------------------------------------------------------------------------------------------- pytrees
def _flatten(out: Any) -> tuple[Any, list[torch.Tensor]]:
    """(template, tensor leaves) of a module output made of tensors, tuples/lists, ModelOutputs and Nones."""
    if torch.is_tensor(out):
        return ("tensor",), [out]
    if out is None:
        return ("none",), []
    if isinstance(out, ModelOutput):
        keys = [k for k, v in out.items() if v is not None]
        subs, leaves = zip(*(_flatten(out[k]) for k in keys), strict=True) if keys else ((), ())
        return ("output", type(out), keys, list(subs)), [t for sub in leaves for t in sub]
    if isinstance(out, (tuple, list)):
        flat = [_flatten(o) for o in out]
        return ("seq", type(out), [f[0] for f in flat]), [t for f in flat for t in f[1]]
    raise _Uncacheable(f"a layer output of type {type(out).__name__} (only tensors, tuples and ModelOutputs)")


def _unflatten(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    kind = template[0]
    if kind == "tensor":
        return next(leaves)
    if kind == "none":
        return None
    if kind == "output":
        _, cls, keys, subs = template
        return cls(**{k: _unflatten(s, leaves) for k, s in zip(keys, subs, strict=True)})
    _, cls, subs = template
    return cls(_unflatten(s, leaves) for s in subs)


class _Uncacheable(Exception):
    pass


class _StopForward(Exception):
    pass


# ------------------------------------------------------------------------------------------------------- storage
def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _human(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while n >= 1024 and len(units) > 1:
        n, units = n / 1024, units[1:]
    return f"{n:.1f} {units[0]}"


@dataclass
class _Rows:
    """One stored output: per-row leaves (one slot per example met), shared leaves once, which rows are filled."""

    template: Any
    per_row: list[bool]
    tensors: list[torch.Tensor]
    filled: torch.Tensor  # per dataset row
    on_disk: bool


@dataclass
class _Split:
    """One dataset's rows: a slot per example met (``slot[row]``, -1 = none yet), the inputs each was computed from."""

    n_rows: int
    capacity: int
    slot: torch.Tensor
    used: int = 0
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    captures: dict[str, _Rows] = field(default_factory=dict)


class PrefixCache:
    """Outputs of a frozen prefix for fixed datasets, filled lazily per example; see the module docstring.

    ``max_memory_bytes``: above this total the stores go to memory-mapped files in ``directory`` (default: a temporary
    folder), which ``close()`` deletes. ``capture_all``: fill every lower layer boundary too (for studies).
    """

    def __init__(
        self,
        max_memory_bytes: int | None = None,
        directory: str | Path | None = None,
        capture_all: bool = False,
    ) -> None:
        self.max_memory_bytes = default_memory_budget() if max_memory_bytes is None else int(max_memory_bytes)
        self.directory = Path(directory) if directory else None
        self.capture_all = capture_all
        self.splits: dict[str, _Split] = {}
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.filled_rows = 0  # rows whose prefix this cache computed (all splits, all fills)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._serving: dict[str, Any] | None = None
        self._patched: dict[str, tuple[nn.Module, Any]] = {}
        self._files: list[Path] = []  # the memory-mapped files this cache created (close() deletes them)

    # ------------------------------------------------------------ patching the model
    def attach(self, model: nn.Module, plan: PrefixPlan) -> None:
        """Make ``plan``'s skipped modules return cached outputs while a batch is being served (else run as usual)."""
        self.detach()
        self.model, self.plan = model, plan
        for path, capture in plan.skipped.items():
            module = model.get_submodule(path)
            self._patched[path] = (module, module.__dict__.get("forward"))
            module.forward = _SkipForward(self, capture, module.forward)

    def detach(self) -> None:
        """Restore every patched module's own forward. Idempotent."""
        for module, own in self._patched.values():
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._patched = {}

    def close(self) -> None:
        """Detach and delete any on-disk stores this cache created (in ``directory`` too: the folder stays)."""
        self.detach()
        self.splits = {}
        for file in self._files:
            file.unlink(missing_ok=True)
        self._files = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ------------------------------------------------------------ serving a batch
    @contextlib.contextmanager
    def serving(
        self, inputs: dict[str, Any], rows: torch.Tensor, split: str, n_rows: int, capacity: int | None = None
    ) -> Iterator[None]:
        """Within this context a forward of the attached model on ``inputs`` skips the prefix.

        ``rows``: the batch's example indices in ``split`` (``n_rows`` examples; ``capacity``: at most how many of them
        this run can meet, which sizes the storage; it grows if more come). Rows not seen before are computed first
        (eval mode, no grad); rows seen before are checked to come from identical inputs. Raises ``RelearnError``
        where serving would not be exact.
        """
        rows = rows.detach().to("cpu", torch.long)
        data = self._split(split, n_rows, capacity)
        self._fill(data, inputs, rows)
        self._check_inputs(data, inputs, rows)
        device = next(iter(v for v in inputs.values() if torch.is_tensor(v))).device
        slots = data.slot[rows]
        served = {}
        for path in self.plan.captures:
            store = data.captures[path]
            # shared leaves are copied too: a model that edits its inputs in place must not edit the cache
            leaves = iter(
                t[slots].to(device, non_blocking=True) if per_row else t.to(device, copy=True)
                for t, per_row in zip(store.tensors, store.per_row, strict=True)
            )
            served[path] = _unflatten(store.template, leaves)
        self._serving = served
        try:
            yield
        finally:
            self._serving = None

    def _split(self, split: str, n_rows: int, capacity: int | None) -> _Split:
        data = self.splits.get(split)
        if data is None:
            capacity = n_rows if capacity is None else max(1, min(n_rows, capacity))
            data = self.splits[split] = _Split(n_rows, capacity, torch.full((n_rows,), -1, dtype=torch.long))
        elif data.n_rows != n_rows:
            raise RelearnError(
                f"prefix cache: the {split} set has {n_rows} rows but the cache was built for {data.n_rows}; a "
                "shared cache serves one dataset"
            )
        return data

    # ------------------------------------------------------------ filling
    def _wanted(self) -> list[str]:
        """Captures to fill: the plan's, and with ``capture_all`` every lower layer boundary of its stack."""
        plan = self.plan
        wanted = list(plan.captures)
        if self.capture_all:
            wanted += [p for p in plan.layer_paths[: max(plan.boundary - 1, 0)] if p not in wanted]
        return wanted

    def _fill(self, data: _Split, inputs: dict[str, Any], rows: torch.Tensor) -> None:
        wanted = self._wanted()
        missing = torch.zeros(len(rows), dtype=torch.bool)
        for path in wanted:
            store = data.captures.get(path)
            missing |= torch.ones(len(rows), dtype=torch.bool) if store is None else ~store.filled[rows]
        if not missing.any():
            return
        index = missing.nonzero().flatten()
        batch = len(rows)
        sub = {
            k: (v[index.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in inputs.items()
        }
        outputs: dict[str, Any] = {}
        last = self.plan.captures[-1]
        hooks = []
        for path in wanted:

            def hook(module, args, out, path=path):
                outputs[path] = out
                if path == last:
                    raise _StopForward

            hooks.append(self.model.get_submodule(path).register_forward_hook(hook))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(**sub)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        if set(outputs) != set(wanted):
            raise RelearnError(f"prefix cache: the forward never reached {sorted(set(wanted) - set(outputs))}")
        fill_rows = rows[index]
        fresh = fill_rows[data.slot[fill_rows] < 0]
        if data.used + len(fresh) > data.capacity:
            self._grow(data, data.used + len(fresh))
        data.slot[fresh] = torch.arange(data.used, data.used + len(fresh))
        data.used += len(fresh)
        slots = data.slot[fill_rows]
        self._store_inputs(data, sub, slots)
        for path in wanted:
            self._store(data, path, outputs[path], slots, fill_rows)
        self.filled_rows += len(fill_rows)

    def _grow(self, data: _Split, needed: int) -> None:
        """More rows than planned: every per-row store of ``data`` gets room for at least ``needed`` slots."""
        new = min(data.n_rows, max(needed, 2 * data.capacity))
        logger.info("prefix cache: growing from %d to %d rows", data.capacity, new)
        data.inputs = {k: self._resized(t, new, False, f"inputs.{k}") for k, t in data.inputs.items()}
        for path, store in data.captures.items():
            store.tensors = [
                self._resized(t, new, store.on_disk, f"{path}.{i}") if pr else t
                for i, (t, pr) in enumerate(zip(store.tensors, store.per_row, strict=True))
            ]
        data.capacity = new

    def _resized(self, t: torch.Tensor, capacity: int, on_disk: bool, name: str) -> torch.Tensor:
        grown = self._empty((capacity, *t.shape[1:]), t.dtype, on_disk, name)
        grown[: len(t)] = t
        added = _nbytes(tuple(grown.shape), t.dtype) - _nbytes(tuple(t.shape), t.dtype)
        if on_disk:
            self.disk_bytes += added
        else:
            self.memory_bytes += added
        return grown

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool, name: str) -> torch.Tensor:
        if not on_disk:
            return torch.empty(shape, dtype=dtype)  # pages are committed only when rows are written
        file = self._dir() / f"{name}.{os.getpid()}.{len(self._files) + 1}.bin"
        self._files.append(file)
        return torch.from_file(str(file), shared=True, size=math.prod(shape), dtype=dtype).view(shape)

    def _store_inputs(self, data: _Split, sub: dict[str, Any], slots: torch.Tensor) -> None:
        if not data.inputs:
            for k, v in sub.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(slots):
                    data.inputs[k] = torch.empty((data.capacity, *v.shape[1:]), dtype=v.dtype)
                    self.memory_bytes += _nbytes(tuple(data.inputs[k].shape), v.dtype)
        for k, store in data.inputs.items():
            value = sub.get(k)
            _check_shape(k, value, store)
            store[slots] = value.detach().cpu()

    def _check_inputs(self, data: _Split, inputs: dict[str, Any], rows: torch.Tensor) -> None:
        slots = data.slot[rows]
        for k, store in data.inputs.items():
            value = inputs.get(k)
            _check_shape(k, value, store)
            if not torch.equal(store[slots], value.detach().cpu()):
                raise RelearnError(_changed_inputs(k))

    def _store(self, data: _Split, path: str, out: Any, slots: torch.Tensor, rows: torch.Tensor) -> None:
        try:
            template, leaves = _flatten(out)
        except _Uncacheable as err:
            raise RelearnError(f"prefix cache: {path} returns {err}") from None
        store = data.captures.get(path)
        if store is None:
            store = data.captures[path] = self._allocate(data, template, leaves, len(rows), path)
        if template != store.template or len(leaves) != len(store.tensors):
            raise RelearnError(f"prefix cache: {path} changed the structure of its output between batches")
        for leaf, tensor, per_row in zip(leaves, store.tensors, store.per_row, strict=True):
            leaf = leaf.detach().to("cpu")
            if per_row:
                if tuple(leaf.shape[1:]) != tuple(tensor.shape[1:]):
                    raise RelearnError(
                        f"prefix cache: {path} gave shape {tuple(leaf.shape)} for a batch after "
                        f"{tuple(tensor.shape[1:])}: sequences must keep one length (fixed-length blocks)"
                    )
                tensor[slots] = leaf
            elif leaf.shape != tensor.shape or not torch.equal(leaf, tensor):
                raise RelearnError(
                    f"prefix cache: a tensor that {path} passes to every example ({tuple(tensor.shape)}) changed "
                    "between batches (padding or varying lengths?): the cache cannot be exact; use prefix_cache=false"
                )
        store.filled[rows] = True

    def _allocate(self, data: _Split, template: Any, leaves: list[torch.Tensor], batch: int, path: str) -> _Rows:
        # a leaf with one entry per example is stored per row; one shaped [1, ...] (T5's position bias) once
        per_row = [leaf.dim() > 0 and leaf.shape[0] == batch for leaf in leaves]
        cap = data.capacity
        pairs = list(zip(leaves, per_row, strict=True))
        row_bytes = sum(_nbytes((cap, *leaf.shape[1:]), leaf.dtype) for leaf, pr in pairs if pr)
        once_bytes = sum(_nbytes(tuple(leaf.shape), leaf.dtype) for leaf, pr in pairs if not pr)
        on_disk = self.memory_bytes + row_bytes + once_bytes > self.max_memory_bytes
        tensors = [
            self._empty((cap, *leaf.shape[1:]), leaf.dtype, on_disk, f"{path}.{i}")
            if pr
            else leaf.detach().to("cpu").clone()
            for i, (leaf, pr) in enumerate(pairs)
        ]
        logger.info(
            "prefix cache: output of %s for %d rows x %s = %s %s%s",
            path,
            cap,
            _human(row_bytes / max(cap, 1)),
            _human(row_bytes),
            f"on disk in {self._dir()}" if on_disk else "in memory",
            f" (+ {_human(once_bytes)} shared by all rows)" if once_bytes else "",
        )
        self.memory_bytes += once_bytes + (0 if on_disk else row_bytes)
        self.disk_bytes += row_bytes if on_disk else 0
        return _Rows(template, per_row, tensors, torch.zeros(data.n_rows, dtype=torch.bool), on_disk)

    def _dir(self) -> Path:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            return self.directory
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hf-relearn-prefix-")
        return Path(self._tmp.name)

    def summary(self) -> dict[str, Any]:
        """What the cache holds: plan, rows filled per split, bytes in memory and on disk."""
        return {
            "skipped": self.plan.describe() if getattr(self, "plan", None) else None,
            "rows_filled": {s: d.used for s, d in self.splits.items()},
            "prefix_forwards": self.filled_rows,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
        }


def _check_shape(key: str, value: Any, store: torch.Tensor) -> None:
    if value is None:
        raise RelearnError(f"prefix cache: a batch came without {key!r}, which the cached rows were computed with")
    if tuple(value.shape[1:]) != tuple(store.shape[1:]):
        raise RelearnError(
            f"prefix cache: {key} of shape {tuple(value.shape)} after rows of {tuple(store.shape[1:])}: sequences must "
            "keep one length (fixed-length blocks) for the cache to be exact; use prefix_cache=false"
        )


def _changed_inputs(key: str) -> str:
    return (
        f"prefix cache: example inputs ({key}) differ from those the cached prefix was computed from — the data "
        "changes between uses (random masking, crops or augmentation); the cache cannot be "
        "exact: use prefix_cache=false"
    )


class _SkipForward:
    """Stands in for a skipped module's forward: the cached output while serving, the module's own otherwise."""

    def __init__(self, cache: PrefixCache, capture: str, own) -> None:
        self.cache, self.capture, self.own = cache, capture, own

    def __call__(self, *args, **kwargs):
        served = self.cache._serving
        if served is None:
            return self.own(*args, **kwargs)
        return served[self.capture]


def default_memory_budget() -> int:
    """A quarter of the memory available now (Linux), else 4 GiB."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError, AttributeError):
        return 4 << 30
