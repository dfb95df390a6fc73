"""The pieces objectives build their rows from (``objectives.py``): 🤗 datasets from token arrays, the masked-LM
collator, the one-time masking of the MLM evaluation set, and the span corruption of the seq2seq ``denoise`` task.

Randomness here never touches the global RNG of Python, numpy or torch: the evaluation set is masked and the
denoise sources are corrupted from their own seeded generators, so they are the same on every build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase, default_data_collator

from ..errors import RelearnError

_MLM_PROBABILITY = 0.15
SEQ2SEQ_TASKS = ("continue", "denoise")
DENOISE_RATIO = 0.3  # share of source tokens masked by the denoise task
DENOISE_MEAN_SPAN = 3.0  # mean length of a masked span (1 + Poisson(2))


class MaskedLMCollator:
    """MLM masking for examples without ``labels`` (training); pre-masked examples (evaluation) pass unchanged."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mlm_probability: float = _MLM_PROBABILITY) -> None:
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        fresh = [i for i, f in enumerate(features) if "labels" not in f]
        if not fresh:
            return default_data_collator(list(features))
        masked = self.masker([dict(features[i]) for i in fresh])
        if len(fresh) == len(features):
            return masked
        # a mixed batch: mask the fresh examples, keep the pre-masked ones, collate all in their original order
        rows = [dict(f) for f in features]
        for row, i in enumerate(fresh):
            rows[i] = {key: value[row].tolist() for key, value in masked.items()}
        return default_data_collator(rows)


def mask_once(blocks: np.ndarray, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked inputs and labels for ``blocks``, drawn from their own generator: the global RNG is not touched.

    Guarantees: the masking of ``DataCollatorForLanguageModeling`` (each token chosen with probability 0.15) from a
    generator seeded with ``seed``, so the same ``(blocks, tokenizer, seed)`` give the same arrays every time; both
    are int64 and shaped like ``blocks``; labels are -100 where a token is not masked.
    """
    masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=_MLM_PROBABILITY, seed=seed)
    batch = masker([{"input_ids": row} for row in blocks.tolist()])
    return batch["input_ids"].numpy().astype(np.int64), batch["labels"].numpy().astype(np.int64)


def to_dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    """A 🤗 dataset of ``columns`` (one row per array row), every column stored as int64 lists whatever its dtype."""
    # int64 explicitly: datasets would store a column called input_ids as int32, and int32 labels break the loss
    import pyarrow as pa

    features = datasets.Features({name: datasets.Sequence(datasets.Value("int64")) for name in columns})
    # built as Arrow list arrays straight from the numpy buffers (from_dict walks Python lists: 1.4 s for 15k blocks)
    arrays = {}
    for name, array in columns.items():
        rows = np.ascontiguousarray(array, dtype=np.int64)  # (examples, tokens)
        offsets = np.arange(rows.shape[0] + 1, dtype=np.int64) * rows.shape[1]
        arrays[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(rows.reshape(-1)))
    return datasets.Dataset(pa.table(arrays).cast(features.arrow_schema))


def denoise_source(blocks: np.ndarray, mask_id: int, seed: int) -> np.ndarray:
    """``blocks`` with random spans replaced by ``mask_id`` (the source of the ``denoise`` seq2seq task).

    Guarantees: same shape and dtype as ``blocks`` (one mask id per masked token, so source and target stay aligned
    and the same length); span starts are drawn with probability ``DENOISE_RATIO / DENOISE_MEAN_SPAN`` per token and
    span lengths are ``1 + Poisson(DENOISE_MEAN_SPAN - 1)``, so about ``DENOISE_RATIO`` of the tokens (a little less
    where spans overlap or run off the end) are masked; every row keeps its first token; the result depends only on
    ``(blocks, mask_id, seed)`` (its own generator; the global RNG is not touched), so every build of a data set
    corrupts each example the same way.
    """
    rng = np.random.default_rng(seed)
    rows, width = blocks.shape
    starts = rng.random((rows, width)) < DENOISE_RATIO / DENOISE_MEAN_SPAN
    starts[:, 0] = False
    lengths = 1 + rng.poisson(DENOISE_MEAN_SPAN - 1, size=(rows, width))
    masked = np.zeros((rows, width), dtype=bool)
    r, c = np.nonzero(starts)
    span = lengths[r, c]
    for k in range(int(span.max()) if len(span) else 0):
        keep = (span > k) & (c + k < width)
        masked[r[keep], c[keep] + k] = True
    out = blocks.copy()
    out[masked] = mask_id
    return out


def mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id the ``denoise`` task masks with: the tokenizer's mask token, else its unk token (else a RelearnError)."""
    for token_id in (tokenizer.mask_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return int(token_id)
    raise RelearnError(
        f"seq2seq_task 'denoise' needs a tokenizer with a mask (or unk) token; {type(tokenizer).__name__} has none "
        "(use --tokenizer bytes)"
    )
