"""hf-relearn: reset one block of a trained transformer, freeze the rest, measure the cost of re-learning."""

from .blocks import Block, BlockMap
from .errors import RelearnError

__version__ = "0.1.0"

__all__ = ["Block", "BlockMap", "RelearnError", "__version__", "load_relearned"]


def load_relearned(base: str, repo_or_dir: str, revision: str | None = None, **load_kwargs):
    """Rebuild a re-learned model from its base and a block-only upload (see ``hf_relearn.hub.load_relearned``)."""
    from .hub import load_relearned as _load

    return _load(base, repo_or_dir, revision=revision, **load_kwargs)
