"""Data: tokenise, chunk and collate text per objective (``clm``, ``mlm``, ``seq2seq``, ``distill``), on 🤗 datasets.

Text comes from a local file, a Hub dataset, or a generated corpus (offline, no download). It is tokenised into
one token stream, the validation part is held out from the end of that stream (or read from its own file), and
both are cut into fixed-length blocks. The collators returned never re-randomise the evaluation set, so the
evaluation loss of a model is the same number every time it is measured.

This is the module users import: ``DataArguments``, ``build_datasets`` and ``unigram_loss`` live here, and the
names of the pieces it is built from are re-exported: tokenizers (``tokenization.py``), built-in corpora
(``corpora.py``), loading and cutting text (``texts.py``), columns and collators per objective (``collators.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from ..errors import RelearnError
from .collators import (
    SEQ2SEQ_TASKS,
    to_dataset,
)
from .corpora import generated_corpus, stdlib_corpus
from .objectives import get_objective
from .texts import FILE_BUILDERS as _FILE_BUILDERS
from .texts import Text, cut_blocks, load_file, load_hub, split_streams

# ---------------------------------------------------------------------------------------------------- arguments


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into blocks (parseable with ``transformers.HfArgumentParser``)."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training text: .txt (one stream, line breaks kept), .json, .jsonl, .csv or .parquet."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Local validation text (same formats); default: hold out the end of the training text."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (needs the network or a cache), used instead of train_file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    text_column: str = field(
        default="text", metadata={"help": "The column holding the text (json, csv, parquet and Hub datasets)."}
    )
    tokenizer: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the model folder's own tokenizer if it has one, else bytes), 'bytes' (256 byte ids + "
            "<pad>, <mask>, </s>), 'model' (the model's own), or a folder/Hub id."
        },
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training example (at least 2)."})
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of the token stream held out at its end for validation, in (0, 0.5]."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first this many training blocks."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the first this many blocks of the evaluation split (and of the selection split)."
        },
    )
    selection_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of the validation blocks that choose a base's checkpoint and judge its convergence (the "
            "selection split); the others (the evaluation split) measure baselines and recovery, so a baseline is "
            "not the best of many noisy draws on its own rows. Block i is a selection block when "
            "floor((i+1)*f) > floor(i*f): every 2nd block (1, 3, 5, ...) for 0.5. 0 turns the split off: the same "
            "rows choose and measure (biased; how bases made before this option were trained)."
        },
    )
    builtin_corpus: str = field(
        default="generated",
        metadata={
            "help": "Text used when neither train_file nor dataset_name is given: 'generated' (a synthetic grammar) "
            "or 'stdlib' (the source of Python's standard library: real text on every machine, no download)."
        },
    )
    generated_chars: int = field(
        default=200_000,
        metadata={"help": "Length in characters of the built-in corpus (generated or stdlib)."},
    )
    corpus_seed: int = field(
        default=0, metadata={"help": "Seed of the generated corpus and of the one-time masking of the MLM eval set."}
    )
    seq2seq_task: str = field(
        default="continue",
        metadata={
            "help": "What the seq2seq objective asks: 'continue' (source = first half of a block, target = the rest) "
            "or 'denoise' (source = the whole block with random spans masked, target = the block; BART-style: the "
            "decoder needs the encoder to predict well)."
        },
    )
    seq2seq_target_tokens: int | None = field(
        default=None,
        metadata={
            "help": "For seq2seq_task 'continue': the target is the last this many tokens of a block and the source "
            "the rest (default: half the block). A short target leaves the decoder little context of its own."
        },
    )

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise RelearnError(f"block_size must be at least 2, got {self.block_size}")
        if not 0 < self.validation_fraction <= 0.5:
            raise RelearnError(f"validation_fraction must be in (0, 0.5], got {self.validation_fraction}")
        if not 0 <= self.selection_fraction < 1:
            raise RelearnError(f"selection_fraction must be in [0, 1), got {self.selection_fraction}")
        if self.train_file is not None and self.dataset_name is not None:
            raise RelearnError("give train_file or dataset_name, not both")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RelearnError(f"{name} must be at least 1 when given, got {value}")
        if self.builtin_corpus not in ("generated", "stdlib"):
            raise RelearnError(f"builtin_corpus must be 'generated' or 'stdlib', got {self.builtin_corpus!r}")
        if self.generated_chars < 1:
            raise RelearnError(f"generated_chars must be at least 1, got {self.generated_chars}")
        if self.seq2seq_task not in SEQ2SEQ_TASKS:
            raise RelearnError(f"seq2seq_task must be one of {', '.join(SEQ2SEQ_TASKS)}, got {self.seq2seq_task!r}")
        target = self.seq2seq_target_tokens
        if target is not None:
            if self.seq2seq_task != "continue":
                raise RelearnError("seq2seq_target_tokens applies to seq2seq_task 'continue' only")
            if not 1 <= target < self.block_size:
                raise RelearnError(f"seq2seq_target_tokens must be in [1, block_size), got {target}")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if not Path(path).is_file():
                raise RelearnError(f"{name} {path!r}: no such file")
            if Path(path).suffix.lower() not in _FILE_BUILDERS:
                raise RelearnError(
                    f"{name} {path!r}: unsupported extension {Path(path).suffix!r}; use one of "
                    f"{', '.join(_FILE_BUILDERS)}"
                )


# --------------------------------------------------------------------------------------------------- text source


def _load_texts(args: DataArguments) -> tuple[Text, Text | None]:
    """The training text and, when the data names one, the validation text."""
    if args.train_file is not None:
        train = load_file(args.train_file, args.text_column)
        validation = None
    elif args.dataset_name is not None:
        train, validation = load_hub(args.dataset_name, args.dataset_config_name, args.text_column)
    else:
        if args.builtin_corpus == "stdlib":
            text, source = stdlib_corpus(args.generated_chars), "the standard library's source"
        else:
            text, source = generated_corpus(args.generated_chars, args.corpus_seed), "the generated corpus"
        rows = datasets.Dataset.from_dict({"text": text.splitlines(keepends=True)})
        train, validation = Text(rows, "text", documents=False, source=source), None
    if args.validation_file is not None:
        validation = load_file(args.validation_file, args.text_column)
    return train, validation


def _split_streams(args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation token streams, each long enough for its blocks (else a RelearnError)."""
    train_text, validation_text = _load_texts(args)
    blocks = validation_blocks_needed(args.selection_fraction)
    return split_streams(train_text, validation_text, tokenizer, args.block_size, args.validation_fraction, blocks)


def validation_blocks_needed(selection_fraction: float) -> int:
    """The fewest validation blocks that give both splits a block (1 without a selection split)."""
    if not selection_fraction:
        return 1
    count = 2
    while (chosen := selection_rows(count, selection_fraction)).all() or not chosen.any():
        count += 1
    return count


# ------------------------------------------------------------------------------------------------------ datasets


@dataclass
class Splits:
    """The datasets of one run: training rows, the selection split (None when ``selection_fraction`` is 0) and the
    evaluation split, with the collator that batches them."""

    train: datasets.Dataset
    selection: datasets.Dataset | None
    evaluation: datasets.Dataset
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]


def selection_rows(count: int, fraction: float) -> np.ndarray:
    """Which of ``count`` validation blocks form the selection split: a boolean mask, True for block i when
    ``floor((i+1)*fraction) > floor(i*fraction)`` (spread evenly: every 2nd block, from block 1, for 0.5).

    Guarantees: deterministic; about ``fraction * count`` True; all False for 0.
    """
    index = np.arange(count)
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def build_splits(args: DataArguments, tokenizer: PreTrainedTokenizerBase, objective: str) -> Splits:
    """Training rows, selection split and evaluation split for ``objective`` (see :func:`build_datasets`).

    The validation blocks are divided by :func:`selection_rows`; each split then keeps its first
    ``max_eval_samples`` blocks. With ``selection_fraction`` 0 there is no selection split and the evaluation split
    is every validation block (the rows then both choose a checkpoint and measure it).
    """
    spec = get_objective(objective)
    spec.check_tokenizer(tokenizer)
    train_stream, eval_stream = _split_streams(args, tokenizer)
    train_blocks = cut_blocks(train_stream, args.block_size)[: args.max_train_samples]
    validation = cut_blocks(eval_stream, args.block_size)
    chosen = selection_rows(len(validation), args.selection_fraction)
    eval_blocks = validation[~chosen][: args.max_eval_samples]
    train_dataset = to_dataset(spec.columns(train_blocks, tokenizer, args.corpus_seed, args))

    def held_out(blocks: np.ndarray, seed: int) -> datasets.Dataset:
        return to_dataset(spec.held_out_columns(blocks, tokenizer, seed, args))

    selection = None
    if args.selection_fraction:  # its own masking / noise draws: nothing of the evaluation rows is reused
        selection = held_out(validation[chosen][: args.max_eval_samples], args.corpus_seed + 7919)
    collator = spec.collator(tokenizer)
    return Splits(train_dataset, selection, held_out(eval_blocks, args.corpus_seed), collator)


def build_datasets(
    args: DataArguments, tokenizer: PreTrainedTokenizerBase, objective: str
) -> tuple[datasets.Dataset, datasets.Dataset, Callable[[list[dict[str, Any]]], dict[str, Any]]]:
    """``(train_dataset, eval_dataset, data_collator)`` for ``objective``, ready for ``transformers.Trainer``; the
    eval dataset is the evaluation split (the rows that measure baselines and recovery; see ``selection_fraction``).

    Text: ``args.train_file``, else ``args.dataset_name`` (its "validation" split when it has one), else
    :func:`generated_corpus`. Rows of a .txt file or the generated corpus are lines and concatenate back to the text;
    rows of json/csv/parquet/Hub data are documents and each is followed by the tokenizer's eos (or sep) token.
    Validation: ``args.validation_file``, else the Hub validation split, else the last ``validation_fraction`` of the
    training token stream, held out contiguously (no token of it is in any training block); its blocks are divided
    into a selection and an evaluation split by :func:`selection_rows`.
    Every example is a ``block_size`` slice of the stream (the remainder is dropped), in stream order; then the
    first ``max_train_samples`` training blocks and ``max_eval_samples`` evaluation blocks are kept.

    Columns per objective (all int64 lists, all examples the same length):

    * ``clm``: input_ids, attention_mask, labels (a copy of input_ids; the model shifts); ``default_data_collator``.
    * ``mlm``: train input_ids, attention_mask, masked (15%) afresh in every batch by the collator; the eval set is
      masked once, from ``args.corpus_seed``, and stored with its labels (-100 where not masked), so an evaluation
      gives the same loss every time; the collator passes such pre-masked examples through unchanged.
    * ``seq2seq``: with ``args.seq2seq_task == "continue"`` (default) input_ids/attention_mask = the first
      ``block_size // 2`` tokens of a block (``block_size - seq2seq_target_tokens`` when that is set), labels = the
      rest (continue the text); with ``"denoise"`` input_ids = the
      whole block with random spans masked (:func:`denoise_source`, fixed per example: train from
      ``args.corpus_seed``, eval from ``args.corpus_seed + 1``), labels = the block; ``default_data_collator``.
    * ``distill``: input_ids, attention_mask (targets come from a teacher); ``default_data_collator``.

    Raises :class:`RelearnError` for an unknown objective, ``mlm`` with a tokenizer without a mask token, an empty
    or unreadable file, a missing text column, text too short for 2 training blocks and 1 validation block, or too
    few validation blocks to split.
    """
    splits = build_splits(args, tokenizer, objective)
    return splits.train, splits.evaluation, splits.collator


# ------------------------------------------------------------------------------------------------------ baseline


def _flat(dataset: datasets.Dataset, column: str) -> np.ndarray:
    if len(dataset) == 0:
        return np.zeros(0, dtype=np.int64)
    return pc.list_flatten(dataset.with_format("arrow")[:][column]).to_numpy().astype(np.int64)


def unigram_loss(train_dataset: datasets.Dataset, eval_dataset: datasets.Dataset, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of an add-one-smoothed unigram model, fitted on the training input_ids,
    on the eval targets (labels other than -100 where the eval set has labels, else its input_ids).

    A trained model whose eval loss is not clearly below this number has learnt nothing beyond token frequencies.
    """
    counts = _flat(train_dataset, "input_ids")
    has_labels = "labels" in eval_dataset.column_names
    targets = _flat(eval_dataset, "labels" if has_labels else "input_ids")
    targets = targets[targets != -100]
    if len(targets) == 0:
        raise RelearnError("the eval set has no target tokens")
    for name, ids in (("train", counts), ("eval", targets)):
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise RelearnError(f"{name} token ids span {ids.min()}..{ids.max()}, outside vocab_size {vocab_size}")
    frequencies = np.bincount(counts, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(frequencies) - np.log(frequencies.sum())
    return float(-log_probs[targets].mean())
