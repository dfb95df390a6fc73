"""hf-relearn: reset one block of a trained transformer, freeze the rest, measure the cost of re-learning.

Names are imported lazily (PEP 562): ``import hf_relearn`` loads no torch, so the report and the CLI's help start
fast; ``from hf_relearn import RelearnTrainer`` loads what that name needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import RelearnError

__version__ = "0.1.0"

# public name -> the module that owns it
_LAZY = {
    "Block": "blocks",
    "BlockMap": "blocks",
    "reset": "surgery",
    "freeze_except": "surgery",
    "fingerprint": "surgery",
    "check_frozen_unchanged": "surgery",
    "swap_encoder": "swap",
    "load_model": "modeling",
    "DataArguments": "data",
    "build_datasets": "data",
    "get_tokenizer": "tokenization",
    "byte_tokenizer": "tokenization",
    "RelearnArguments": "config",
    "PretrainArguments": "config",
    "ModelArguments": "config",
    "RelearnResult": "result",
    "RelearnTrainer": "trainer",
    "RecoveryCallback": "callbacks",
    "ConvergenceCallback": "callbacks",
    "pretrain": "runner",
    "relearn": "runner",
    "probe": "probe",
    "ProbeArguments": "probe",
    "Recipe": "recipe",
    "run_study": "study",
    "build_report": "report",
    "push": "hub",
    "load_relearned": "hub",
}

__all__ = ["RelearnError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .blocks import Block, BlockMap  # noqa: F401
    from .hub import load_relearned, push  # noqa: F401
    from .trainer import RelearnTrainer  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_relearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
