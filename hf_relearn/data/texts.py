"""Text into token blocks: load rows of text (a local file or a Hub dataset), tokenise them into one token stream,
hold out the validation part, and cut streams into fixed-length blocks.

Knows nothing of ``DataArguments``: ``data.py`` reads the settings and passes the values in.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from ..errors import RelearnError
from ..storage import cache_dir

FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Text:
    """Rows of text plus how to read them: ``documents`` rows get an eos separator, line rows do not."""

    rows: datasets.Dataset
    column: str
    documents: bool
    source: str


def load_file(path: str, text_column: str) -> Text:
    """The rows of the local file ``path``, read by the 🤗 builder its extension names (:data:`FILE_BUILDERS`).

    Guarantees: a ``.txt`` file gives line rows in column ``"text"`` with their line breaks kept (they concatenate
    back to the file; ``\\r\\n`` is read as ``\\n``); json, jsonl, csv and parquet give document rows from
    ``text_column``. An empty or unreadable file, or a missing or non-text column, is a :class:`RelearnError`.
    """
    builder = FILE_BUILDERS[Path(path).suffix.lower()]
    if Path(path).stat().st_size == 0:
        raise RelearnError(f"{path} is empty")
    # the text builder keeps line breaks so the rows concatenate back to the file (\r\n is read as \n)
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        cause = err.__cause__ or err  # DatasetGenerationError's own message says nothing about the file
        raise RelearnError(f"could not read {path} as {builder}: {cause}") from err
    column = "text" if builder == "text" else text_column
    _check_column(rows, column, path)
    return Text(rows, column, documents=builder != "text", source=path)


def _check_column(rows: datasets.Dataset, column: str, source: str) -> None:
    if column not in rows.column_names:
        raise RelearnError(
            f"{source} has no column {column!r}; its columns are {', '.join(rows.column_names)} (set --text_column)"
        )
    feature = rows.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise RelearnError(f"{source}: column {column!r} holds {feature}, not text")


def load_hub(name: str, config_name: str | None, text_column: str) -> tuple[Text, Text | None]:
    """The ``train`` split of the Hub dataset ``name`` (configuration ``config_name``) and its ``validation`` split
    when it has one, as document rows of ``text_column``.

    Guarantees: a dataset that cannot be loaded (not found, offline, a missing configuration), has no ``train``
    split, or lacks a text column ``text_column`` in a split it returns is a :class:`RelearnError`.
    """
    source = name if config_name is None else f"{name} ({config_name})"
    try:
        splits = datasets.load_dataset(name, config_name)
    except (OSError, ValueError) as err:  # not found, offline, missing config name: all end up here
        raise RelearnError(f"dataset {source!r} could not be loaded: {err}") from err
    if "train" not in splits:
        raise RelearnError(f"dataset {source!r} has no 'train' split; its splits are {', '.join(splits)}")
    _check_column(splits["train"], text_column, source)
    train = Text(splits["train"], text_column, documents=True, source=f"{source} train split")
    if "validation" not in splits:
        return train, None
    _check_column(splits["validation"], text_column, source)
    return train, Text(splits["validation"], text_column, documents=True, source=f"{source} validation split")


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def _stream_key(text: Text, tokenizer: PreTrainedTokenizerBase, separator: int | None) -> str | None:
    """What a token stream depends on: the rows' text (hashed from its Arrow buffers), the column, the separator and
    the whole tokenizer (its serialised form). None for a tokenizer without one (a slow tokenizer: not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or text.rows._indices is not None:  # a selection's buffers hold rows it does not show
        return None
    h = hashlib.sha256(f"v1|{text.documents}|{separator}|".encode())
    h.update(backend.to_str().encode())
    for chunk in text.rows.data.column(text.column).chunks:
        h.update(f"|{chunk.offset}:{len(chunk)}|".encode())
        for buffer in chunk.buffers():
            if buffer is not None:
                h.update(buffer)
    return h.hexdigest()[:40]


def _stream_cache() -> Path:
    return cache_dir("token_streams")


def token_stream(text: Text, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All rows tokenised and concatenated into one int64 array (documents end with eos, lines stay as they are).

    Guarantees: rows in their order, no special tokens added; each non-empty document row is followed by the
    tokenizer's eos (else sep) token when it has one; line rows are joined as they are; an empty int64 array when
    there are no rows. The stream of the same text and tokenizer is read back from ``HF_HOME/hf_relearn/token_streams``
    (keyed on the text's content and the serialised tokenizer) instead of tokenising again.
    """
    separator = _separator_id(tokenizer) if text.documents else None
    key = _stream_key(text, tokenizer, separator)
    cached = _stream_cache() / f"{key}.npy"
    if key is not None and cached.exists():
        return np.load(cached).astype(np.int64)
    stream = _tokenize_rows(text, tokenizer, separator)
    if key is not None and len(stream):
        cached.parent.mkdir(parents=True, exist_ok=True)
        small = stream.astype(np.int32) if stream.max() < 2**31 else stream
        tmp = cached.with_name(f".{key}.{os.getpid()}.npy")
        np.save(tmp, small)
        os.replace(tmp, cached)  # atomic: a concurrent run reads the whole file or none
    return stream


def _tokenize_rows(text: Text, tokenizer: PreTrainedTokenizerBase, separator: int | None) -> np.ndarray:

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # verbose=False: rows longer than model_max_length are fine here, they are cut into blocks afterwards
        ids = tokenizer(
            [t or "" for t in batch[text.column]], add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        if separator is not None:
            ids = [row + [separator] if row else row for row in ids]
        return {"input_ids": ids}

    tokenized = text.rows.map(
        tokenize,
        batched=True,
        remove_columns=text.rows.column_names,
        keep_in_memory=True,
        num_proc=None,
        desc=f"tokenising {text.source}",
    )
    if len(tokenized) == 0:
        return np.zeros(0, dtype=np.int64)
    return pc.list_flatten(tokenized.with_format("arrow")[:]["input_ids"]).to_numpy().astype(np.int64)


def cut_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """``stream`` as consecutive rows of ``block_size`` tokens, in stream order; the remainder is dropped.

    Guarantees: shape ``(len(stream) // block_size, block_size)``, a view of ``stream`` (no copy).
    """
    count = len(stream) // block_size
    return stream[: count * block_size].reshape(count, block_size)


def _min_tokens_for_holdout(block_size: int, fraction: float, blocks: int = 1) -> int:
    """The shortest stream whose held-out end gives ``blocks`` validation blocks and whose rest gives 2 training
    blocks."""
    need = blocks * block_size
    n = max(need + 2 * block_size, math.ceil((need - 0.5) / fraction) - 1)
    while not (_held_out(n, fraction) >= need and n - _held_out(n, fraction) >= 2 * block_size):
        n += 1
    return n


def _held_out(n_tokens: int, fraction: float) -> int:
    return int(round(n_tokens * fraction))


def split_streams(
    train_text: Text,
    validation_text: Text | None,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    validation_fraction: float,
    validation_blocks: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation token streams, each long enough for its blocks (else a RelearnError): 2 training
    blocks and ``validation_blocks`` validation blocks at least.

    Guarantees: without ``validation_text`` the validation stream is the last ``validation_fraction`` of the
    training stream, held out contiguously (no validation token is in the training stream returned), and the rest
    holds at least 2 blocks of ``block_size`` tokens; with ``validation_text`` the training stream is the whole
    training text and the validation stream that text's.
    """
    stream = token_stream(train_text, tokenizer)
    if len(stream) == 0:
        raise RelearnError(f"{train_text.source} contains no text")
    block, need = block_size, validation_blocks
    held = f"{need} held-out validation block" + ("s" if need > 1 else "")
    if validation_text is None:
        n_eval = _held_out(len(stream), validation_fraction)
        if n_eval < need * block or len(stream) - n_eval < 2 * block:
            raise RelearnError(
                f"{train_text.source} has {len(stream)} tokens: block_size {block} with validation_fraction "
                f"{validation_fraction} needs at least {_min_tokens_for_holdout(block, validation_fraction, need)} "
                f"(2 training blocks and {held}); use a smaller block_size or more text"
            )
        # contiguous hold-out from the end: no validation token is ever seen in training
        return stream[: len(stream) - n_eval], stream[len(stream) - n_eval :]
    if len(stream) < 2 * block:
        raise RelearnError(
            f"{train_text.source} has {len(stream)} tokens: block_size {block} needs at least {2 * block} "
            "(2 training blocks); use a smaller block_size or more text"
        )
    eval_stream = token_stream(validation_text, tokenizer)
    if len(eval_stream) == 0:
        raise RelearnError(f"{validation_text.source} contains no text")
    if len(eval_stream) < need * block:
        raise RelearnError(
            f"{validation_text.source} has {len(eval_stream)} tokens: block_size {block} needs at least "
            f"{need * block} ({held}); use a smaller block_size or more text"
        )
    return stream, eval_stream
