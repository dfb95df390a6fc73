"""Recipe: a study's YAML -> checked settings -> the plan (one ``BaseSpec`` per base, one ``RunSpec`` per run).

``Recipe.load`` reads the YAML and applies ``--set`` overrides; ``Recipe.validate`` fails before any training (every
section must build its dataclass, every block name must resolve); ``Recipe.bases`` and ``Recipe.runs_for`` expand
the grid, seeds, blocks, trainable arms (``sweep.arms_at``), encoder swaps (``sweep.swaps``) and relearn settings
(``sweep.variants``). Torch and the model code are imported lazily inside the functions that need them
(``import hf_relearn.study.recipe`` loads no torch).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RelearnError
from ..model.arm_registry import DEFAULT_ARM, with_variant
from .plan import (
    SWAP_OPTIONS,
    SWEEP_KEYS,
    BaseSpec,
    RunSpec,
    arms_here,
    grid_points,
    slug,
    swap_arms,
    swap_entries,
    variant_settings,
)

RECIPE_KEYS = {"name", "description", "base", "data", "pretrain", "sweep", "relearn"}
DONOR_SEED_OFFSET = 1000  # a trained donor's seed: the receiving base's + this, so it is never the same model
STUDY_BASE = "study-base:"  # a swap's encoder prefix naming a base trained within the study (resolved by the study)


@dataclass
class Recipe:
    """A study recipe: the base model and its budget, the data, and the sweep."""

    name: str
    base: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] | None = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    relearn: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
        """Read a YAML recipe and apply ``overrides`` (``section.key=value``, e.g. ``pretrain.max_steps=50``)."""
        path = Path(path)
        if not path.is_file():
            raise RelearnError(f"recipe {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RelearnError(f"recipe {path}: not valid YAML: {err}") from err
        return cls.from_dict(data, overrides, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
        """A checked recipe from its parsed YAML (``data`` is not modified), ``overrides`` applied first."""
        data = copy.deepcopy(data)
        for item in overrides or []:
            key, _, value = item.partition("=")
            if not _ or "." not in key:
                raise RelearnError(f"override {item!r}: use SECTION.KEY=VALUE, e.g. pretrain.max_steps=50")
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(value)
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise RelearnError(f"{source}: unknown section(s) {sorted(unknown)}; valid: {sorted(RECIPE_KEYS)}")
        if "base" not in data or "model" not in (data.get("base") or {}):
            raise RelearnError(f"{source}: needs base.model (a model type to build, a local folder or a Hub id)")
        unknown = set(data.get("sweep") or {}) - SWEEP_KEYS
        if unknown:
            raise RelearnError(f"{source}: unknown sweep key(s) {sorted(unknown)}; valid: {sorted(SWEEP_KEYS)}")
        from ..model.modeling import packaged_checkpoint

        data["base"]["model"] = packaged_checkpoint(str(data["base"]["model"]))
        recipe = cls(
            name=data.get("name", "study"),
            description=data.get("description", ""),
            base=data["base"],
            data=data.get("data") or {},
            pretrain=data.get("pretrain", {}),
            sweep=data.get("sweep") or {},
            relearn=data.get("relearn") or {},
        )
        recipe.validate()
        return recipe

    def to_dict(self) -> dict:
        """The recipe as plain data (what the study writes to its recipe.yaml)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Fail before any training: every section must build its dataclass, every block name must resolve."""
        from ..data.datasets import DataArguments
        from ..relearn.arguments import PretrainArguments, RelearnArguments

        with tempfile.TemporaryDirectory() as tmp:
            _build(DataArguments, self.data, "data")
            if self.pretrain is not None:
                _build(PretrainArguments, {**self.pretrain, "output_dir": tmp}, "pretrain")
            # a study's runs get their base's budget (original_run); a stand-in lets a budget share be checked here
            budget = {"original_steps": 1} if self.pretrain is not None else {}
            _build(RelearnArguments, {**budget, **self.relearn, "output_dir": tmp}, "relearn")
            for name in variant_settings(self.sweep):
                settings = {**budget, **self.relearn_settings(name), "output_dir": tmp}
                _build(RelearnArguments, settings, f"sweep.variants.{name}")
        if self.pretrain is None and not (self.relearn.get("original_steps") or self.relearn.get("original_run")):
            raise RelearnError(
                "a recipe without pretrain (a ready-trained base) needs relearn.original_steps or relearn.original_run"
                " for its original budget"
            )
        for base in self.bases():
            self.runs_for(base)  # resolves every block name against the base's architecture
        if self.donors() and self.pretrain is None:
            raise RelearnError("sweep.swaps with trained: true needs a pretrain section (the study trains the donors)")

    def extends(self, previous: dict) -> bool:
        """Whether this recipe is ``previous`` (a study's recipe.yaml) or only adds entries to its ``sweep.variants``:
        then every run finished under ``previous`` is a run of this plan, with the same settings."""
        mine = self.to_dict()
        if mine == previous:
            return True
        old = dict(previous.get("sweep") or {})
        new = dict(mine["sweep"])
        old_variants, new_variants = old.pop("variants", None) or {}, new.pop("variants", None) or {}
        kept = all(new_variants.get(name) == settings for name, settings in old_variants.items())
        return kept and {**previous, "sweep": old} == {**mine, "sweep": new}

    def relearn_settings(self, variant: str | None = None) -> dict[str, Any]:
        """The relearn section's settings, with those of ``variant`` (a name in ``sweep.variants``) over them."""
        return {**self.relearn, **(variant_settings(self.sweep)[variant] if variant else {})}

    def donors(self) -> list[BaseSpec]:
        """The extra bases a study trains only to give their encoders to swaps (``sweep.swaps`` entries with
        ``trained: true``): the base model with the entry's overrides, the same data and pretrain settings, for each
        seed of the sweep with seed + 1000 (its own initialisation and data order)."""
        from ..model.modeling import parse_overrides

        out = []
        for entry in swap_entries(self.sweep):
            if not entry.get("trained"):
                continue
            overrides = {
                **parse_overrides(self.base.get("config_overrides")),
                **parse_overrides(entry.get("overrides")),
            }
            for seed in self.sweep.get("seeds", [0]):
                out.append(
                    BaseSpec(
                        donor_id(entry["name"], seed),
                        self.base["model"],
                        tuple(overrides.items()),
                        seed + DONOR_SEED_OFFSET,
                        (),
                    )
                )
        return out

    def bases(self) -> list[BaseSpec]:
        """One base model per (grid point, seed); a ready-trained base (no pretrain section) is one base."""
        from ..model.modeling import parse_overrides

        seeds = self.sweep.get("seeds", [0])
        out = []
        for point in grid_points(self.sweep.get("grid") or {}):
            overrides = {**parse_overrides(self.base.get("config_overrides")), **point}
            for seed in seeds if self.pretrain is not None else [0]:
                tag = ",".join(f"{k}={v}" for k, v in point.items())
                base_id = slug(f"{tag + '-' if tag else ''}seed{seed}")
                out.append(BaseSpec(base_id, self.base["model"], tuple(overrides.items()), seed, tuple(point.items())))
        return out

    def runs_for(self, base: BaseSpec) -> list[RunSpec]:
        """The relearn runs of one base: blocks (and parts) x inits x trainable arms x variants x seeds, then the
        encoder swaps (``sweep.swaps``) x cross-attention options x freeze modes x warm-ups x variants x seeds.
        Variants: the relearn section's own settings, then each of ``sweep.variants`` (its name ends the arm).

        Without ``sweep.swaps`` the plan is what it always was; with swaps, ``sweep.blocks`` defaults to none.
        """
        from ..model.blocks import BlockMap

        meta = _meta_model(self, base)
        bmap = BlockMap(meta)
        stacks = list(bmap.stacks.values())
        swaps = swap_entries(self.sweep)
        blocks = self.sweep.get("blocks", [] if swaps else "all_layers")
        names = [n for b in blocks for n in _positions(b, stacks)] if isinstance(blocks, list) else []
        if blocks == "all_layers":
            names = [f"{s.name}.{layer.index}" for s in stacks for layer in s.layers]
        elif not isinstance(blocks, list):
            raise RelearnError(f"sweep.blocks must be 'all_layers' or a list of block names, got {blocks!r}")
        for part in self.sweep.get("parts", []) or []:
            names += [f"{s.name}.{layer.index}.{part}" for s in stacks for layer in s.layers if part in layer.parts]
        runs = []
        seeds = self.sweep.get("seeds", [0]) if self.pretrain is None else [base.seed]
        variants = [None, *variant_settings(self.sweep)]
        for name in names:
            block = bmap.resolve(name)
            layer = block.layers[0] if len(block.layers) == 1 else (None, None)
            stack = bmap.stacks[layer[0]] if layer[0] else None
            part = block.name.split(".")[2] if block.kind == "part" else None
            for init in self.sweep.get("inits", ["scratch"]):
                for trainable, variant, seed in itertools.product(arms_here(self.sweep, base), variants, seeds):
                    run_id = f"{base.id}/{slug(block.name)}-{slug(init)}-{with_variant(trainable, variant)}-r{seed}"
                    n = len(stack.layers) if stack else max(len(s.layers) for s in stacks)
                    runs.append(
                        RunSpec(
                            run_id,
                            base,
                            block.name,
                            init,
                            trainable,
                            seed,
                            layer[0],
                            layer[1],
                            n,
                            part,
                            variant=variant,
                        )
                    )
        if swaps:
            runs += self._swap_runs(base, meta, swaps, variants, seeds)
        return runs

    def _swap_runs(self, base: BaseSpec, meta, swaps: list[dict], variants: list, seeds: list[int]) -> list[RunSpec]:
        """The encoder-swap runs of one base: swaps x cross-attention options x freeze modes x warm-ups x variants x
        seeds (see :meth:`runs_for`)."""
        from ..model.blocks import BlockMap
        from ..model.modeling import parse_overrides

        stacks = list(BlockMap(meta).stacks.values())
        runs = []
        if not getattr(meta.config, "is_encoder_decoder", False):
            raise RelearnError(f"sweep.swaps: the base {base.model} is not an encoder-decoder model")
        n = max(len(s.layers) for s in stacks)
        for entry in swaps:
            overrides = tuple(parse_overrides(entry.get("overrides")).items())
            encoder = str(entry.get("encoder"))
            if entry.get("trained"):  # the encoder of a donor base the study trains (its overrides are built in)
                encoder = STUDY_BASE + donor_id(entry["name"], base.seed)
                overrides = ()
            own = {k: entry[k] for k in SWAP_OPTIONS if k in entry}
            for (cross, freeze, warmup, stitch), variant, seed in itertools.product(
                swap_arms({**self.sweep, **own}), variants, seeds
            ):
                options = f"{cross}-{freeze}" + (f"-stitch-{stitch}" if stitch else "")
                arm = with_variant(options + (f"-warmup{warmup}" if warmup else ""), variant)
                run_id = f"{base.id}/swap-{slug(str(entry['name']))}-{arm}-r{seed}"
                runs.append(
                    RunSpec(
                        run_id,
                        base,
                        "decoder.*.cross_attention",
                        "scratch",
                        DEFAULT_ARM,  # the swap's arm is its cross-attention, freeze and warm-up options
                        seed,
                        None,
                        None,
                        n,
                        None,
                        str(entry["name"]),
                        encoder,
                        overrides,
                        cross,
                        freeze,
                        warmup,
                        variant,
                        stitch,
                    )
                )
        return runs


def _build(cls, values: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise RelearnError(f"recipe section {section!r}: unknown field(s) {sorted(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise RelearnError(f"recipe section {section!r}: {err}") from err


def donor_id(swap_name: str, seed: int) -> str:
    """The folder name (under ``bases/``) of the donor a trained swap of base seed ``seed`` takes its encoder from."""
    return slug(f"donor-{swap_name}-seed{seed + DONOR_SEED_OFFSET}")


POSITIONS = {"first": lambda n: 0, "middle": lambda n: n // 2, "last": lambda n: n - 1}


def _positions(name: str, stacks: list) -> list[str]:
    """A ``sweep.blocks`` entry as block names: ``first``, ``middle`` (layer N // 2) or ``last`` name that layer of
    every stack (so one recipe covers several depths); any other entry is a block name as it is."""
    if name not in POSITIONS:
        return [name]
    return [f"{s.name}.{POSITIONS[name](len(s.layers))}" for s in stacks]


def _meta_model(recipe: Recipe, base: BaseSpec):
    """The base's architecture without weights (meta device): enough to list its blocks."""
    import torch

    from ..model.modeling import resolve_architecture

    config, cls = resolve_architecture(base.model, dict(base.overrides) or None, recipe.base.get("head"))
    try:
        with torch.device("meta"):
            return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    except ValueError as err:  # sizes that do not fit together (n_embd not divisible by n_head, ...)
        raise RelearnError(f"recipe {recipe.name!r}, base {base.id}: the model cannot be built: {err}") from None
