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
    "Block": "model.blocks",
    "BlockMap": "model.blocks",
    "reset": "model.surgery",
    "freeze_except": "model.surgery",
    "fingerprint": "model.surgery",
    "check_frozen_unchanged": "model.surgery",
    "swap_encoder": "model.swap",
    "load_model": "model.modeling",
    "DataArguments": "data.datasets",
    "build_datasets": "data.datasets",
    "get_tokenizer": "data.tokenization",
    "byte_tokenizer": "data.tokenization",
    "RelearnArguments": "relearn.arguments",
    "PretrainArguments": "relearn.arguments",
    "ModelArguments": "relearn.arguments",
    "RelearnResult": "relearn.result",
    "RelearnTrainer": "relearn.trainer",
    "RecoveryCallback": "relearn.callbacks",
    "ConvergenceCallback": "relearn.callbacks",
    "pretrain": "relearn.runner",
    "relearn": "relearn.runner",
    "probe": "relearn.probe",
    "ProbeArguments": "relearn.probe",
    "Recipe": "study.recipe",
    "run_study": "study.run",
    "build_report": "report.build",
    "push": "hub.push",
    "load_relearned": "hub.push",
}

__all__ = ["RelearnError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .hub.push import load_relearned, push  # noqa: F401
    from .model.blocks import Block, BlockMap  # noqa: F401
    from .relearn.trainer import RelearnTrainer  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_relearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
