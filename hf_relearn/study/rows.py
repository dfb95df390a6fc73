"""A study's rows: one per finished run, built from its result and its base's run info, written to results.csv and
read back from the result files in one place. ``storage.read_results`` reads a results.csv back.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..stats.caveats import codes_of
from ..storage import RESULT_FILE, RUN_FILE
from ..storage import write_results as storage_write_results
from .grid import GridPoint
from .plan import BaseSpec, RunSpec
from .recipe import Recipe

# columns of results.csv: the study's own, then the results contract (docs/results-contract.md)
STUDY_COLUMNS = [
    "study",
    "base_model",
    "run_id",
    "base_id",
    "base_seed",
    "grid",
    "n_layers",
    "stack",
    "layer",
    "relative_depth",
    "part",
    "base_steps",
    "base_stopped",
    "base_final_eval_loss",
    "base_curve",
    "base_warnings",
    "base_warning_codes",
    "swap",
    "swap_encoder",
    "swap_overrides",
    "swap_width",
    "swap_cross_attention",
    "swap_freeze",
    "swap_warmup_steps",
    "swap_stitch",
    "stitch_r2",
    "variant",
    "variant_settings",
]


def result_path(out: Path, run: RunSpec) -> Path:
    """Where a study in ``out`` keeps the result of ``run``: the file whose presence means the run is done."""
    return out / "runs" / run.id / RESULT_FILE


def study_row(recipe: Recipe, run: RunSpec, result: dict, base_info: dict | None) -> dict:
    """One results.csv row: the study's own columns (``STUDY_COLUMNS``) from the recipe, the run and its base's run
    info, then every field of the run's result (lists and dicts as JSON)."""
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
        "grid": GridPoint(dict(run.base.grid)).to_json(),
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
        "swap_stitch": run.swap_stitch,
        "stitch_r2": ((result.get("surgery") or {}).get("stitch") or {}).get("r2_held_out"),
        "variant": run.variant,
        "variant_settings": json.dumps(recipe.sweep["variants"][run.variant]) if run.variant else None,
    }
    for key, value in result.items():
        row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return row


def write_results(path: Path, rows: list[dict]) -> None:
    """Write results.csv atomically, the study's own columns first (see ``storage.write_results``)."""
    storage_write_results(path, rows, STUDY_COLUMNS)


def collect_rows(recipe: Recipe, plan: list[tuple[BaseSpec, RunSpec]], out: Path) -> list[dict]:
    """The rows of every finished run, in plan order, read from the result files (the single source of truth)."""
    rows = []
    for base, run in plan:
        done = result_path(out, run)
        if not done.exists():
            continue
        base_file = out / "bases" / base.id / RUN_FILE
        base_info = json.loads(base_file.read_text()) if base_file.exists() else None
        rows.append(study_row(recipe, run, json.loads(done.read_text()), base_info))
    return rows
