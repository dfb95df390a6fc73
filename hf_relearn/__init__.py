"""hf-relearn: reset one block of a trained transformer, freeze the rest, measure the cost of re-learning."""

from .blocks import Block, BlockMap
from .errors import RelearnError

__version__ = "0.1.0"

__all__ = ["Block", "BlockMap", "RelearnError", "__version__"]
