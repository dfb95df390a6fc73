"""Study: a recipe (YAML) -> base models with a known budget -> a sweep of re-learn runs -> results.csv.

Layout of a study folder::

    recipe.yaml                 the recipe as run (with --set overrides applied)
    bases/<base>/               one pretrain run per (grid point, seed): model, trainer_state.json, curve
    runs/<base>/<run>/          one relearn run: relearn_result.json
    results.csv                 one row per finished run (rebuilt atomically after every run)
    report.md, plots/*.png      see report.py

Resumable by construction: a base is done when its ``hf_relearn_run.json`` exists, a run when its
``relearn_result.json`` exists (both written atomically, last); anything else found is a run that was killed
and is redone from scratch. ``results.csv`` is rebuilt from the result files, so it never holds a duplicate or a
half-written row.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .caveats import codes_of
from .errors import RelearnError
from .files import RESULTS
from .io import read_results  # noqa: F401  (re-exported: hf_relearn.study.read_results)
from .io import write_results as _write_results
from .prefix_cache import PrefixCache

RECIPE_KEYS = {"name", "description", "base", "data", "pretrain", "sweep", "relearn"}
SWEEP_KEYS = {
    "blocks", "parts", "inits", "trainable", "arms_at", "seeds", "grid",
    "swaps", "swap_cross_attention", "swap_freeze", "swap_warmup_steps",
}  # fmt: skip
SWAP_OPTIONS = ("swap_cross_attention", "swap_freeze", "swap_warmup_steps")
SWAP_KEYS = {"name", "encoder", "overrides", *SWAP_OPTIONS}
# columns of results.csv: the study's own, then the results contract (docs/results-contract.md)
STUDY_COLUMNS = [
    "study", "base_model", "run_id", "base_id", "base_seed", "grid", "n_layers", "stack", "layer", "relative_depth", "part", "base_steps", "base_stopped",
    "base_final_eval_loss", "base_curve", "base_warnings", "base_warning_codes", "swap", "swap_encoder", "swap_overrides", "swap_width",
    "swap_cross_attention", "swap_freeze", "swap_warmup_steps",
]  # fmt: skip


@dataclass(frozen=True)
class BaseSpec:
    id: str
    model: str
    overrides: tuple[tuple[str, Any], ...]
    seed: int
    grid: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class RunSpec:
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


def _swap_entries(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's ``sweep.swaps``, checked: each ``{name, encoder, overrides}`` with a unique name, and optionally
    its own ``swap_cross_attention`` / ``swap_freeze`` / ``swap_warmup_steps`` lists (else the sweep's)."""
    swaps = sweep.get("swaps") or []
    if not isinstance(swaps, list):
        raise RelearnError("sweep.swaps must be a list of {name, encoder, overrides} entries")
    names = set()
    for entry in swaps:
        if not isinstance(entry, dict) or "name" not in entry or "encoder" not in entry:
            raise RelearnError(f"sweep.swaps entry {entry!r}: needs name and encoder (and optional overrides)")
        unknown = set(entry) - SWAP_KEYS
        if unknown:
            raise RelearnError(f"sweep.swaps entry {entry['name']!r}: unknown key(s) {sorted(unknown)}")
        if entry["name"] in names:
            raise RelearnError(f"sweep.swaps: the name {entry['name']!r} is used twice")
        names.add(entry["name"])
    return swaps


def _swap_arms(sweep: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(cross_attention, freeze, warm-up steps) arms of every swap; a warm-up only where something unfreezes later."""
    from .swap import FREEZE_MODES

    arms = []
    for cross in sweep.get("swap_cross_attention", ["reset"]):
        if cross not in ("reset", "zero"):
            raise RelearnError(f"sweep.swap_cross_attention: {cross!r} is not reset or zero")
        for freeze in sweep.get("swap_freeze", ["decoder-except-cross"]):
            if freeze not in FREEZE_MODES:
                raise RelearnError(f"sweep.swap_freeze: {freeze!r} is not one of {', '.join(FREEZE_MODES)}")
            for warmup in sweep.get("swap_warmup_steps", [0]):
                if not isinstance(warmup, int) or warmup < 0:
                    raise RelearnError(f"sweep.swap_warmup_steps: {warmup!r} is not a step count >= 0")
                if warmup and freeze == "decoder-except-cross":
                    continue  # nothing to unfreeze after the warm-up: the arm would repeat warm-up 0
                arms.append((cross, freeze, warmup))
    return arms


def _arms_here(sweep: dict[str, Any], base: BaseSpec) -> list[str]:
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


def _grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    if not grid:
        return [{}]
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise RelearnError(f"sweep.grid.{k} must be a non-empty list of values")
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


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
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Fail before any training: every section must build its dataclass, every block name must resolve."""
        from .data import DataArguments
        from .runner import PretrainArguments
        from .trainer import RelearnArguments

        with tempfile.TemporaryDirectory() as tmp:
            _build(DataArguments, self.data, "data")
            if self.pretrain is not None:
                _build(PretrainArguments, {**self.pretrain, "output_dir": tmp}, "pretrain")
            _build(RelearnArguments, {**self.relearn, "output_dir": tmp}, "relearn")
        if self.pretrain is None and not (self.relearn.get("original_steps") or self.relearn.get("original_run")):
            raise RelearnError(
                "a recipe without pretrain (a ready-trained base) needs relearn.original_steps or relearn.original_run"
                " for its original budget"
            )
        for base in self.bases():
            self.runs_for(base)  # resolves every block name against the base's architecture

    def bases(self) -> list[BaseSpec]:
        """One base model per (grid point, seed); a ready-trained base (no pretrain section) is one base."""
        from .modeling import parse_overrides

        seeds = self.sweep.get("seeds", [0])
        out = []
        for point in _grid_points(self.sweep.get("grid") or {}):
            overrides = {**parse_overrides(self.base.get("config_overrides")), **point}
            for seed in seeds if self.pretrain is not None else [0]:
                tag = ",".join(f"{k}={v}" for k, v in point.items())
                base_id = _slug(f"{tag + '-' if tag else ''}seed{seed}")
                out.append(BaseSpec(base_id, self.base["model"], tuple(overrides.items()), seed, tuple(point.items())))
        return out

    def runs_for(self, base: BaseSpec) -> list[RunSpec]:
        """The relearn runs of one base: blocks (and parts) x inits x trainable arms x seeds, then the encoder swaps
        (``sweep.swaps``) x cross-attention options x freeze modes x warm-ups x seeds.

        Without ``sweep.swaps`` the plan is what it always was; with swaps, ``sweep.blocks`` defaults to none.
        """
        from .blocks import BlockMap
        from .modeling import parse_overrides

        meta = _meta_model(self, base)
        bmap = BlockMap(meta)
        stacks = list(bmap.stacks.values())
        swaps = _swap_entries(self.sweep)
        blocks = self.sweep.get("blocks", [] if swaps else "all_layers")
        names = list(blocks) if isinstance(blocks, list) else []
        if blocks == "all_layers":
            names = [f"{s.name}.{layer.index}" for s in stacks for layer in s.layers]
        elif not isinstance(blocks, list):
            raise RelearnError(f"sweep.blocks must be 'all_layers' or a list of block names, got {blocks!r}")
        for part in self.sweep.get("parts", []) or []:
            names += [f"{s.name}.{layer.index}.{part}" for s in stacks for layer in s.layers if part in layer.parts]
        runs = []
        seeds = self.sweep.get("seeds", [0]) if self.pretrain is None else [base.seed]
        for name in names:
            block = bmap.resolve(name)
            layer = block.layers[0] if len(block.layers) == 1 else (None, None)
            stack = bmap.stacks[layer[0]] if layer[0] else None
            part = block.name.split(".")[2] if block.kind == "part" else None
            for init in self.sweep.get("inits", ["scratch"]):
                for trainable in _arms_here(self.sweep, base):
                    for seed in seeds:
                        run_id = f"{base.id}/{_slug(block.name)}-{_slug(init)}-{trainable}-r{seed}"
                        n = len(stack.layers) if stack else max(len(s.layers) for s in stacks)
                        runs.append(
                            RunSpec(run_id, base, block.name, init, trainable, seed, layer[0], layer[1], n, part)
                        )
        if swaps:
            if not getattr(meta.config, "is_encoder_decoder", False):
                raise RelearnError(f"sweep.swaps: the base {base.model} is not an encoder-decoder model")
            n = max(len(s.layers) for s in stacks)
            for entry in swaps:
                overrides = tuple(parse_overrides(entry.get("overrides")).items())
                own = {k: entry[k] for k in SWAP_OPTIONS if k in entry}
                for cross, freeze, warmup in _swap_arms({**self.sweep, **own}):
                    arm = f"{cross}-{freeze}" + (f"-warmup{warmup}" if warmup else "")
                    for seed in seeds:
                        run_id = f"{base.id}/swap-{_slug(str(entry['name']))}-{arm}-r{seed}"
                        runs.append(
                            RunSpec(run_id, base, "decoder.*.cross_attention", "scratch", "block", seed, None, None,
                                    n, None, str(entry["name"]), str(entry["encoder"]), overrides, cross, freeze,
                                    warmup)
                        )  # fmt: skip
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


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")
    if len(slug) > 60:
        slug = slug[:48] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return slug


def _meta_model(recipe: Recipe, base: BaseSpec):
    """The base's architecture without weights (meta device): enough to list its blocks."""
    import torch

    from .modeling import resolve_architecture

    config, cls = resolve_architecture(base.model, dict(base.overrides) or None, recipe.base.get("head"))
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


# ------------------------------------------------------------------------------------------------ running
def _train_base(recipe: Recipe, base: BaseSpec, folder: Path) -> dict:
    from .data import DataArguments
    from .runner import RUN_FILE, ModelArguments, PretrainArguments, pretrain

    done = folder / RUN_FILE
    if done.exists():
        return json.loads(done.read_text())
    model_args = ModelArguments(
        model=base.model,
        config_overrides=dict(base.overrides) or None,
        head=recipe.base.get("head"),
        model_seed=base.seed,
    )
    settings = {"disable_tqdm": True, "seed": base.seed, **recipe.pretrain, "output_dir": str(folder)}
    # a checkpoint is complete once its trainer_state.json is written (the Trainer writes it last)
    checkpoints = sorted(
        (c.parent for c in folder.glob("checkpoint-*/trainer_state.json")), key=lambda c: int(c.name.split("-")[-1])
    )
    if checkpoints:  # a killed base run that saved checkpoints goes on from its last one
        settings["resume_from_checkpoint"] = str(checkpoints[-1])
    args = PretrainArguments(objective=recipe.base.get("objective", "clm"), **settings)
    return pretrain(model_args, DataArguments(**recipe.data), args, quiet=True)


def _run_one(recipe: Recipe, run: RunSpec, base_dir: Path | None, folder: Path, prefix_cache=None) -> dict:
    from .data import DataArguments
    from .runner import ModelArguments, relearn
    from .trainer import RESULT_FILE, RelearnArguments

    done = folder / RESULT_FILE
    if done.exists():
        return json.loads(done.read_text())
    settings = {"disable_tqdm": True, "seed": run.seed, "save_final_model": False, **recipe.relearn}
    settings.update(
        output_dir=str(folder), block=run.block, init=run.init, trainable=run.trainable, reset_seed=run.seed
    )
    settings.setdefault("objective", recipe.base.get("objective", "clm"))
    if base_dir is not None:
        settings["original_run"] = str(base_dir)
    if run.swap is not None:
        settings.update(
            swap_encoder=run.swap_encoder,
            swap_encoder_overrides=_swap_overrides(run, base_dir),
            swap_cross_attention=run.swap_cross_attention,
            swap_freeze=run.swap_freeze,
            swap_warmup_steps=run.swap_warmup_steps,
        )
    model = str(base_dir) if base_dir is not None else run.base.model
    data_args = DataArguments(**recipe.data)
    model_args = ModelArguments(model=model, head=recipe.base.get("head"))
    args = RelearnArguments(**settings)
    return relearn(model_args, data_args, args, quiet=True, prefix_cache=prefix_cache).to_dict()


def _swap_overrides(run: RunSpec, base_dir: Path | None) -> str | None:
    """The new encoder's config overrides as ``k=v,...``; a model type built from config gets the base's vocab size
    (a native encoder-decoder feeds its encoder the decoder's token ids) unless the recipe sets one."""
    from .modeling import is_config_name

    overrides = dict(run.swap_overrides)
    if base_dir is not None and is_config_name(str(run.swap_encoder)) and "vocab_size" not in overrides:
        overrides["vocab_size"] = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or None


def _row(recipe: Recipe, run: RunSpec, result: dict, base_info: dict | None) -> dict:
    depth = None
    if run.layer is not None and run.n_layers > 1:
        depth = run.layer / (run.n_layers - 1)
    overrides = ",".join(f"{k}={v}" for k, v in run.base.overrides)
    row = {
        "study": recipe.name,
        "base_model": f"{run.base.model}" + (f" ({overrides})" if overrides else ""),
        "run_id": run.id,
        "base_id": run.base.id,
        "base_seed": run.base.seed,
        "grid": json.dumps(dict(run.base.grid)),
        "n_layers": run.n_layers,
        "stack": run.stack,
        "layer": run.layer,
        "relative_depth": depth,
        "part": run.part,
        "base_steps": (base_info or {}).get("budget_steps") or (base_info or {}).get("steps"),
        "base_stopped": (base_info or {}).get("stopped"),
        "base_final_eval_loss": (base_info or {}).get("final_eval_loss"),
        "base_curve": json.dumps((base_info or {}).get("curve", [])),
        "base_warnings": json.dumps((base_info or {}).get("warnings", [])),
        "base_warning_codes": json.dumps(codes_of((base_info or {}).get("warnings", []))),
        "swap": run.swap,
        "swap_encoder": run.swap_encoder,
        "swap_overrides": json.dumps(dict(run.swap_overrides)) if run.swap else None,
        "swap_width": (result.get("surgery") or {}).get("new_width") if run.swap else None,
        "swap_cross_attention": run.swap_cross_attention,
        "swap_freeze": run.swap_freeze,
        "swap_warmup_steps": run.swap_warmup_steps if run.swap else None,
    }
    for key, value in result.items():
        row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return row


def write_results(path: Path, rows: list[dict]) -> None:
    """Write results.csv atomically, the study's own columns first (see ``io.write_results``)."""
    _write_results(path, rows, STUDY_COLUMNS)


_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")  # fmt: skip


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _leave_launch_group() -> None:
    """For ``parallel="runs"``: hide the launch from this process's Trainers, so each trains its runs alone.

    The process group that validating the recipe's TrainingArguments set up is closed and accelerate's shared
    state reset; each process keeps one GPU of its own where there are several.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    local = os.environ.get("LOCAL_RANK")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    for key in _LAUNCH_ENV:
        os.environ.pop(key, None)
    if local is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = local  # before CUDA is initialised: one GPU per process


def _remove_unfinished(out: Path, bases: list[BaseSpec], plan: list[tuple[BaseSpec, RunSpec]]) -> None:
    """Delete what a killed earlier attempt left half-done (done by one process, before any training)."""
    from .runner import RUN_FILE
    from .trainer import RESULT_FILE

    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)  # left by a write that a kill interrupted; the file it replaced is intact
    for base in bases:
        folder = out / "bases" / base.id
        if folder.exists() and not (folder / RUN_FILE).exists() and not any(folder.glob("checkpoint-*")):
            shutil.rmtree(folder)
    for _, run in plan:
        folder = out / "runs" / run.id
        if folder.exists() and not (folder / RESULT_FILE).exists():
            shutil.rmtree(folder)


def _collect_rows(recipe: Recipe, plan: list[tuple[BaseSpec, RunSpec]], out: Path) -> list[dict]:
    """The rows of every finished run, in plan order, read from the result files (the single source of truth)."""
    from .runner import RUN_FILE
    from .trainer import RESULT_FILE

    rows = []
    for base, run in plan:
        done = out / "runs" / run.id / RESULT_FILE
        if not done.exists():
            continue
        base_file = out / "bases" / base.id / RUN_FILE
        base_info = json.loads(base_file.read_text()) if base_file.exists() else None
        rows.append(_row(recipe, run, json.loads(done.read_text()), base_info))
    return rows


def _wait_for(paths: list[Path], what: str, timeout_s: float = 24 * 3600) -> None:
    import time

    start = time.time()
    while not all(p.exists() for p in paths):
        if time.time() - start > timeout_s:
            raise RelearnError(f"gave up waiting for {what} (another process of this launch died?)")
        time.sleep(1.0)


def run_study(
    recipe: Recipe, output_dir: str | os.PathLike, progress: bool = True, parallel: str = "data"
) -> list[dict]:
    """Train the bases, run every relearn of the sweep (skipping finished ones), keep results.csv current.

    Returns the rows of results.csv in plan order. Safe to kill at any moment and start again with the same
    recipe and output_dir: finished work is kept, unfinished work redone.

    Under ``accelerate launch`` with N processes: ``parallel="data"`` (default) runs every relearn on all N
    processes together (DDP); ``parallel="runs"`` gives each process its own share of the bases and then of the
    runs (round robin), each trained alone; the main process waits for all and writes the final results.csv.
    """
    from tqdm.auto import tqdm

    from .runner import RUN_FILE
    from .trainer import RESULT_FILE

    if parallel not in ("data", "runs"):
        raise RelearnError(f"parallel must be 'data' or 'runs', got {parallel!r}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.yaml"
    if recipe_file.exists():
        previous = yaml.safe_load(recipe_file.read_text())
        if previous != recipe.to_dict():
            raise RelearnError(
                f"{out} holds a study of a different recipe ({recipe_file}); use another --output-dir, or delete it"
            )
    bases = recipe.bases()
    plan = [(b, r) for b in bases for r in recipe.runs_for(b)]
    if rank == 0:
        _remove_unfinished(out, bases, plan)
        if not recipe_file.exists():
            tmp = out / ".recipe.yaml.tmp"
            tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            os.replace(tmp, recipe_file)
    _barrier()  # nobody trains before the clean-up is done
    share, shares = rank, world  # this process's share of the bases and runs
    if parallel == "runs" and world > 1:
        _leave_launch_group()
    else:
        share, shares = 0, 1  # "data": every process runs every run, together
    mine = [item for i, item in enumerate(plan) if i % shares == share]
    bar = tqdm(total=len(mine), desc=f"study {recipe.name}", unit="run", disable=not progress or rank != 0)
    if recipe.pretrain is not None:
        for i, base in enumerate(bases):
            if i % shares == share:
                bar.set_postfix_str(f"training base {base.id}")
                _train_base(recipe, base, out / "bases" / base.id)
        _wait_for([out / "bases" / b.id / RUN_FILE for b in bases], "the other processes' base models")
    # one frozen-prefix cache per base, shared by its runs (same frozen weights, same data); top layers first, as a
    # fill computes every lower layer boundary on its way and stores them all (prefix_cache.py)
    mine.sort(key=lambda item: (bases.index(item[0]), -(item[1].layer if item[1].layer is not None else -1)))
    cache, cache_base = None, None
    for base, run in mine:
        base_dir = out / "bases" / base.id if recipe.pretrain is not None else None
        bar.set_postfix_str(run.id)
        if cache_base != base.id:
            if cache is not None:
                cache.close()
            cache, cache_base = PrefixCache(capture_all=True), base.id
        result = _run_one(recipe, run, base_dir, out / "runs" / run.id, prefix_cache=cache)
        if rank == 0 or shares > 1:
            write_results(out / RESULTS, _collect_rows(recipe, plan, out))
        steps = result["steps_to_recover"]
        outcome = (
            f"recovered in {steps} steps" if result["recovered"] else f"not recovered in {result['steps_trained']}"
        )
        bar.write(f"{run.id}: {result['after_reset_eval_loss']:.4f} -> {outcome}")
        bar.update(1)
    bar.close()
    if cache is not None:
        cache.close()
    if shares > 1:
        _wait_for([out / "runs" / r.id / RESULT_FILE for _, r in plan], "the other processes' runs")
    rows = _collect_rows(recipe, plan, out)
    if rank == 0:
        write_results(out / RESULTS, rows)
    return rows
