"""Names shared by every layer: the files a run or study writes, arm names with a variant, the grid's config keys.

Imports nothing from the package (and no torch), so the report and any tool can read them.
"""

from __future__ import annotations

RESULT_FILE = "relearn_result.json"  # a relearn run's result (docs/results-contract.md)
RUN_FILE = "hf_relearn_run.json"  # written by pretrain: the base's budget, curve, stop reason and warnings
DATA_FILE = "hf_relearn_data.json"  # the data settings of a relearn run (the card names the dataset from it)
RESULTS = "results.csv"  # a study's table: one row per finished run
CURVE_FILE = "relearn_curve.png"  # a run's recovery curve
BLOCK_FILE = "block.safetensors"  # a block-only upload's tensors
CLAIMS = ".claims"  # a study's claims: one empty-ish file per base or run a process has taken (removed at the end)


def with_variant(arm: str, variant: str | None) -> str:
    """An arm's name when it runs the study's variant ``variant`` of the relearn settings (``ARM@VARIANT``); the arm
    as it is under the recipe's own settings (``variant`` None)."""
    return f"{arm}@{variant}" if variant else arm


def split_variant(arm: str) -> tuple[str, str | None]:
    """``with_variant`` undone: the arm under the recipe's own settings, and the variant's name (None without)."""
    base, _, variant = arm.partition("@")
    return base, variant or None


# config fields a study's grid may vary: depth (number of layers) and width (hidden size), per architecture
DEPTH_KEYS = ("n_layer", "num_hidden_layers", "num_layers")
WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")
