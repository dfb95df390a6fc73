"""Writing results so that nothing half-written is ever left behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RelearnError


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


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import torch
    import transformers

    from . import __version__

    return {"hf_relearn": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
