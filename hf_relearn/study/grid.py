"""A study's grid point: the config fields one base changes (``{"n_layer": 4, "n_embd": 64}``), as a value.

A :class:`GridPoint` is an immutable, hashable mapping (equal, whatever the order of its keys, to another with the
same items), so it groups rows and keys dicts as it is; labels list its keys sorted. results.csv
stores it as JSON (:meth:`GridPoint.to_json`) and :func:`grid_of` reads it back from any row.
Imports nothing heavy: the report reads grids with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

# config fields a study's grid may vary: depth (number of layers) and width (hidden size), per architecture
DEPTH_KEYS = ("n_layer", "num_hidden_layers", "num_layers")
WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")


class GridPoint(Mapping):
    """Config field -> value for one point of a study's grid; equal to a dict with the same items."""

    __slots__ = ("_items", "_key")

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._items = tuple((values or {}).items())
        self._key = json.dumps(dict(self._items), sort_keys=True, default=str)  # hashable whatever the values

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"GridPoint({dict(self._items)!r})"

    @property
    def sort_key(self) -> str:
        """Orders grid points (by their items, keys sorted) where a report lists them."""
        return self._key

    def to_json(self) -> str:
        """The JSON results.csv stores: ``grid_of`` of it is this point again."""
        return json.dumps(dict(self._items))

    def label(self) -> str:
        """The point in a report's words, keys sorted, e.g. ``n_embd=64, n_layer=4`` (``base`` without a grid)."""
        return ", ".join(f"{k}={v}" for k, v in sorted(self._items)) or "base"


def grid_of(row_or_value: Any) -> GridPoint:
    """The grid point of a results row (its ``grid``), or of a value already read: a mapping, its JSON, or None."""
    value = row_or_value.get("grid") if isinstance(row_or_value, Mapping) and "grid" in row_or_value else row_or_value
    if isinstance(value, GridPoint):
        return value
    if isinstance(value, str):
        value = json.loads(value) if value else {}
    return GridPoint(value or {})
