"""A study's plan: the bases to train (``BaseSpec``) and the runs to do (``RunSpec``), and the checks and expansions of
a recipe's ``sweep`` section (grid points, arms per grid point, encoder swaps, relearn variants) that
``recipe.Recipe`` turns into them. Imports no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import RelearnError

SWEEP_KEYS = {
    "blocks",
    "parts",
    "inits",
    "trainable",
    "arms_at",
    "seeds",
    "grid",
    "swaps",
    "swap_cross_attention",
    "swap_freeze",
    "swap_warmup_steps",
    "swap_stitch",
    "variants",
}
SWAP_OPTIONS = ("swap_cross_attention", "swap_freeze", "swap_warmup_steps", "swap_stitch")
# what the sweep sets for each run: a variant (sweep.variants) may not set these
PER_RUN_KEYS = {
    "output_dir",
    "block",
    "init",
    "trainable",
    "reset_seed",
    "original_run",
    "swap_encoder",
    "swap_encoder_overrides",
    *SWAP_OPTIONS,
}
SWAP_KEYS = {"name", "encoder", "overrides", "trained", *SWAP_OPTIONS}


@dataclass(frozen=True)
class BaseSpec:
    """One base model of the study: a grid point's config overrides and a seed; ``id`` names its folder."""

    id: str
    model: str
    overrides: tuple[tuple[str, Any], ...]
    seed: int
    grid: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class RunSpec:
    """One relearn run on a base: the block (or encoder swap), init, trainable arm and seed; ``id`` names its folder."""

    id: str
    base: BaseSpec
    block: str
    init: str
    trainable: str
    seed: int
    stack: str | None
    layer: int | None
    n_layers: int
    part: str | None
    # an encoder swap instead of a block reset (sweep.swaps): its name, the encoder, its config overrides, options
    swap: str | None = None
    swap_encoder: str | None = None
    swap_overrides: tuple[tuple[str, Any], ...] = ()
    swap_cross_attention: str | None = None
    swap_freeze: str | None = None
    swap_warmup_steps: int = 0
    # a named set of relearn settings over the relearn section's (sweep.variants); None: the section's own
    variant: str | None = None
    # the closed-form stitch between the swapped encoder and the old one (sweep.swap_stitch); None: no stitch
    swap_stitch: str | None = None


def swap_entries(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's ``sweep.swaps``, checked: each ``{name, encoder, overrides}`` with a unique name, and optionally
    its own ``swap_cross_attention`` / ``swap_freeze`` / ``swap_warmup_steps`` lists (else the sweep's)."""
    swaps = sweep.get("swaps") or []
    if not isinstance(swaps, list):
        raise RelearnError("sweep.swaps must be a list of {name, encoder, overrides} entries")
    names = set()
    for entry in swaps:
        if not isinstance(entry, dict) or "name" not in entry or ("encoder" not in entry and not entry.get("trained")):
            raise RelearnError(
                f"sweep.swaps entry {entry!r}: needs name and encoder (and optional overrides), or trained: true"
            )
        if entry.get("trained") not in (None, True, False):
            raise RelearnError(f"sweep.swaps entry {entry['name']!r}: trained must be true or false")
        unknown = set(entry) - SWAP_KEYS
        if unknown:
            raise RelearnError(f"sweep.swaps entry {entry['name']!r}: unknown key(s) {sorted(unknown)}")
        if entry["name"] in names:
            raise RelearnError(f"sweep.swaps: the name {entry['name']!r} is used twice")
        names.add(entry["name"])
    return swaps


def swap_arms(sweep: dict[str, Any]) -> list[tuple[str, str, int, str | None]]:
    """(cross_attention, freeze, warm-up steps, stitch) arms of every swap, skipping the combinations that cannot
    run or repeat another: a warm-up only where something unfreezes later; a stitch only with a kept cross-attention
    (it maps to what the trained cross-attention reads); ``stitch-only`` only with a stitch; and, where the sweep
    also stitches, a kept cross-attention only with a stitch (the unstitched arm is the reset one)."""
    from ..model.stitch import STITCH_FITS
    from ..model.swap import CROSS_ATTENTION, FREEZE_MODES

    stitches = [None if s in (None, "none") else s for s in sweep.get("swap_stitch", [None])]
    for stitch in stitches:
        if stitch is not None and stitch not in STITCH_FITS:
            raise RelearnError(f"sweep.swap_stitch: {stitch!r} is not none or one of {', '.join(STITCH_FITS)}")
    arms = []
    for cross in sweep.get("swap_cross_attention", ["reset"]):
        if cross not in CROSS_ATTENTION:
            raise RelearnError(f"sweep.swap_cross_attention: {cross!r} is not one of {', '.join(CROSS_ATTENTION)}")
        for freeze in sweep.get("swap_freeze", ["decoder-except-cross"]):
            if freeze not in FREEZE_MODES:
                raise RelearnError(f"sweep.swap_freeze: {freeze!r} is not one of {', '.join(FREEZE_MODES)}")
            for warmup in sweep.get("swap_warmup_steps", [0]):
                if not isinstance(warmup, int) or warmup < 0:
                    raise RelearnError(f"sweep.swap_warmup_steps: {warmup!r} is not a step count >= 0")
                if warmup and freeze in ("decoder-except-cross", "stitch-only"):
                    continue  # nothing to unfreeze after the warm-up: the arm would repeat warm-up 0
                for stitch in stitches:
                    if (stitch is not None) != (cross == "keep") and (stitch is not None or any(stitches)):
                        continue
                    if freeze == "stitch-only" and stitch is None:
                        continue
                    arms.append((cross, freeze, warmup, stitch))
    if not arms:
        raise RelearnError(
            "sweep: the swap options leave no arm that can run (a stitch needs swap_cross_attention keep)"
        )
    return arms


def variant_settings(sweep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``sweep.variants`` checked: names that are folder names, each a mapping of relearn settings the sweep leaves
    to the recipe (not the block, arm, seed or swap of a run)."""
    variants = sweep.get("variants") or {}
    if not isinstance(variants, dict):
        raise RelearnError("sweep.variants must map a name to relearn settings, e.g. {lr-1e-3: {learning_rate: 1e-3}}")
    for name, settings in variants.items():
        if not isinstance(name, str) or slug(name) != name or len(name) > 40 or json_value(name):
            raise RelearnError(
                f"sweep.variants: name {name!r} must be a short folder name (letters, digits, . _ = -) that is not "
                "a number or true/false/null (results.csv would read it back as one)"
            )
        if not isinstance(settings, dict) or not settings:
            raise RelearnError(f"sweep.variants.{name}: give relearn settings, e.g. {{learning_rate: 1.0e-3}}")
        fixed = sorted(set(settings) & PER_RUN_KEYS)
        if fixed:
            raise RelearnError(f"sweep.variants.{name}: {fixed} are set per run by the sweep, not by a variant")
    return variants


def json_value(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def arms_here(sweep: dict[str, Any], base: BaseSpec) -> list[str]:
    """The ``sweep.trainable`` arms that run on this base: ``sweep.arms_at`` limits an arm to the grid points that
    match it (e.g. ``{all: {n_layer: 4, n_embd: 64}}``: the ``all`` arm only where n_layer=4 and n_embd=64)."""
    arms = sweep.get("trainable", ["block"])
    limits = sweep.get("arms_at") or {}
    if not isinstance(limits, dict):
        raise RelearnError("sweep.arms_at must map an arm to grid values, e.g. {all: {n_layer: 4}}")
    grid = dict(base.grid)
    for arm, where in limits.items():
        if arm not in arms:
            raise RelearnError(f"sweep.arms_at names {arm!r}, which is not in sweep.trainable {arms}")
        if not isinstance(where, dict) or not set(where) <= set(sweep.get("grid") or {}):
            raise RelearnError(
                f"sweep.arms_at.{arm}: give grid keys and values (grid keys: {list(sweep.get('grid') or {})})"
            )
    return [a for a in arms if all(grid.get(k) == v for k, v in (limits.get(a) or {}).items())]


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    if not grid:
        return [{}]
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise RelearnError(f"sweep.grid.{k} must be a non-empty list of values")
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def slug(text: str) -> str:
    """``text`` as a folder name: letters, digits and ``_ . = -`` only; a long one shortened with a hash of it."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")
    if len(slug) > 60:
        slug = slug[:48] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return slug
