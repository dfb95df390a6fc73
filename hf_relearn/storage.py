"""The files a run or a study writes: their names, and reading and writing them so that nothing half-written is
ever left behind (atomic JSON, folders and results.csv), with the versions that made them.

Imports no torch: the report (``hf-relearn report``) reads studies with this module alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RelearnError

RESULT_FILE = "relearn_result.json"  # a relearn run's result (docs/results-contract.md)
RUN_FILE = "hf_relearn_run.json"  # written by pretrain: the base's budget, curve, stop reason and warnings
DATA_FILE = "hf_relearn_data.json"  # the data settings of a relearn run (the card names the dataset from it)
RESULTS = "results.csv"  # a study's table: one row per finished run
CURVE_FILE = "relearn_curve.png"  # a run's recovery curve
BLOCK_FILE = "block.safetensors"  # a block-only upload's tensors
CLAIMS = ".claims"  # a study's claims: one empty-ish file per base or run a process has taken (removed at the end)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite`` (before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RelearnError(f"output dir {path} exists and is a file")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RelearnError(f"output dir {path} exists and is not empty; pass --overwrite to replace it")
    return path


def write_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write into a fresh sibling folder, then move it to ``path`` in one step.

    If ``fill`` fails, nothing is left at ``path`` (an earlier folder there is kept until the swap).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def cache_dir(name: str) -> Path:
    """``HF_HOME/hf_relearn/NAME``: where hf-relearn keeps what it computed once (token streams, original curves)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_relearn" / name


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on (from the installed metadata: no import of torch)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in (("hf_relearn", "hf-relearn"), ("torch", "torch"), ("transformers", "transformers")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def read_result(run_dir: str | os.PathLike) -> dict:
    """A finished relearn run's ``relearn_result.json``; a clear error when the folder holds none."""
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        raise RelearnError(
            f"{run_dir}: no {RESULT_FILE} here; give the output dir of a finished relearn run (or, for card and push, a study folder with results.csv)"
        )
    return json.loads(path.read_text())


def write_results(path: str | os.PathLike, rows: list[dict], first_columns: list[str]) -> None:
    """Write a results.csv atomically (temporary file + rename): never a half-written or duplicated row.

    Columns: ``first_columns`` in order, then every other key of the rows, sorted.
    """
    path = Path(path)
    columns = list(first_columns) + sorted({k for r in rows for k in r} - set(first_columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(path: str | os.PathLike) -> list[dict]:
    """results.csv as a list of dicts with numbers, booleans and JSON columns decoded."""
    path = Path(path)
    if not path.exists():
        raise RelearnError(f"{path}: no results.csv (has the study finished any run?)")
    with path.open(newline="") as f:
        return [{k: _decode(v) for k, v in raw.items()} for raw in csv.DictReader(f)]


def _decode(value: str):
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return value
