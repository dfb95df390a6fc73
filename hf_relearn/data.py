"""Data: tokenise, chunk and collate text per objective (``clm``, ``mlm``, ``seq2seq``, ``distill``), on 🤗 datasets.

Text comes from a local file, a Hub dataset, or a generated corpus (offline, no download). It is tokenised into
one token stream, the validation part is held out from the end of that stream (or read from its own file), and
both are cut into fixed-length blocks. The collators returned never re-randomise the evaluation set, so the
evaluation loss of a model is the same number every time it is measured.
"""

from __future__ import annotations

import math
import random
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    default_data_collator,
)

from .errors import RelearnError
from .files import OBJECTIVES as _OBJECTIVES

_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)
_MLM_PROBABILITY = 0.15
SEQ2SEQ_TASKS = ("continue", "denoise")
DENOISE_RATIO = 0.3  # share of source tokens masked by the denoise task
DENOISE_MEAN_SPAN = 3.0  # mean length of a masked span (1 + Poisson(2))


# --------------------------------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            # bytes with no printable glyph are moved above 255, in byte order, exactly as the tokenizers crate does
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fast byte-level tokenizer that needs no files: byte ``b`` is token id ``b`` for every text.

    Guarantees: ids 0..255 are the bytes in order; ``<pad>`` = 256, ``<mask>`` = 257, ``</s>`` = 258 (eos and bos);
    ``len(tokenizer) == 259``; encoding adds no special tokens, and a literal ``"</s>"`` or ``"<mask>"`` in the text is
    encoded as its bytes (never as a special id); ``decode(encode(text)) == text`` for any UTF-8 text; the tokenizer
    survives ``save_pretrained`` + ``AutoTokenizer.from_pretrained`` with the same ids. Note ``tokenizer.vocab_size``
    is 256 (the base vocabulary): size a model's embedding with ``len(tokenizer)``.
    """
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<mask>", "</s>"])  # ids 256, 257, 258 in this order
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        mask_token="<mask>",
        eos_token="</s>",
        bos_token="</s>",
        # a corpus that contains the text "</s>" (HTML, source code) must not turn into special ids
        split_special_tokens=True,
    )


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _from_pretrained(spec: str, what: str) -> PreTrainedTokenizerBase:
    if not Path(spec).exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise RelearnError(f"{what} {spec!r}: no such folder")
    # a folder without tokenizer files still "loads" (as an empty GPT-2 tokenizer, vocab_size 0): refuse it first
    if Path(spec).is_dir() and not _has_tokenizer_files(Path(spec)):
        raise RelearnError(
            f"{what} {spec!r}: the folder has no tokenizer files ({', '.join(_TOKENIZER_FILES[:4])}, ...); "
            "use --tokenizer bytes or a tokenizer folder / Hub id"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise RelearnError(
            f"{what} {spec!r} is not 'bytes', 'model' or a tokenizer folder, and could not be fetched from the Hub: {err}"
        ) from err
    if len(tokenizer) == 0 or not tokenizer.get_vocab():
        raise RelearnError(f"{what} {spec!r} loaded with an empty vocabulary; is it a tokenizer folder?")
    return tokenizer


def get_tokenizer(spec: str, model_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer ``spec`` names: ``"bytes"`` (:func:`byte_tokenizer`), ``"model"`` (the one saved with
    ``model_path``), ``"auto"`` (``model`` when ``model_path`` is a folder with tokenizer files, else ``bytes``), or
    any folder / Hub id ``AutoTokenizer`` understands.

    Guarantees: the result has a pad token whenever it has an eos or unk token (pad is set to eos, else unk, when
    missing); a folder without tokenizer files or an unreachable Hub id is a :class:`RelearnError`, never an empty
    tokenizer.
    """
    if spec == "auto":
        has_own = model_path is not None and Path(model_path).is_dir() and _has_tokenizer_files(Path(model_path))
        spec = "model" if has_own else "bytes"
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "model":
        if model_path is None:
            raise RelearnError("tokenizer 'model' needs a model path (the model's own tokenizer is loaded from it)")
        if Path(model_path).is_dir() and not _has_tokenizer_files(Path(model_path)):
            raise RelearnError(
                f"tokenizer 'model': {model_path!r} has no tokenizer files; pass --tokenizer bytes or a tokenizer"
            )
        tokenizer = _from_pretrained(model_path, "tokenizer of model")
    else:
        tokenizer = _from_pretrained(spec, "tokenizer")
    if tokenizer.pad_token is None:
        # blocks are all the same length, so pad is only needed by collators that insist on one
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    return tokenizer


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
        default=None, metadata={"help": "Keep only the first this many validation blocks."}
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


# ------------------------------------------------------------------------------------------------------ corpora

_NAMES = (("Anna", "she"), ("Tom", "he"), ("Lena", "she"), ("Otto", "he"), ("Mira", "she"), ("Paul", "he"))
_PEOPLE = (
    ("miller", "millers"),
    ("baker", "bakers"),
    ("farmer", "farmers"),
    ("weaver", "weavers"),
    ("smith", "smiths"),
    ("sailor", "sailors"),
    ("teacher", "teachers"),
    ("potter", "potters"),
    ("fisherman", "fishermen"),
    ("child", "children"),
)
_PERSON_ADJECTIVES = ("old", "young", "tall", "kind", "clever", "tired", "quiet", "busy")
_THINGS = (
    ("apple", "apples"),
    ("loaf", "loaves"),
    ("basket", "baskets"),
    ("fish", "fish"),
    ("box", "boxes"),
    ("coin", "coins"),
    ("knife", "knives"),
    ("cup", "cups"),
    ("book", "books"),
    ("candle", "candles"),
    ("goose", "geese"),
)
_THING_ADJECTIVES = ("red", "green", "small", "heavy", "fresh", "wooden", "golden", "old", "large")
# (base form, third person singular, past tense)
_GIVING_VERBS = (
    ("sell", "sells", "sold"),
    ("give", "gives", "gave"),
    ("bring", "brings", "brought"),
    ("send", "sends", "sent"),
    ("show", "shows", "showed"),
    ("carry", "carries", "carried"),
)
_RESTING_VERBS = (
    ("sleep", "sleeps", "slept"),
    ("sing", "sings", "sang"),
    ("walk", "walks", "walked"),
    ("wait", "waits", "waited"),
    ("work", "works", "worked"),
    ("eat", "eats", "ate"),
)
_PLACES = ("market", "mill", "harbour", "village", "forest", "river", "bakery", "school")
_TIMES = ("in the morning", "at noon", "every evening", "on monday", "after the rain", "before dawn", "in winter")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def _subject(rng: random.Random) -> tuple[str, bool, str]:
    """A noun phrase, whether it is plural, and its pronoun."""
    if rng.random() < 0.25:
        name, pronoun = rng.choice(_NAMES)
        return name, False, pronoun
    singular, plural = rng.choice(_PEOPLE)
    adjective = f"{rng.choice(_PERSON_ADJECTIVES)} " if rng.random() < 0.5 else ""
    if rng.random() < 0.3:
        return f"the {adjective}{plural}", True, "they"
    return f"the {adjective}{singular}", False, "he" if rng.random() < 0.5 else "she"


def _things(rng: random.Random) -> tuple[str, str]:
    """``("seven red apples", "apples")``: a count agreeing with its noun, and the noun's plural."""
    index = min(int(rng.expovariate(0.35)), len(_NUMBERS) - 1)  # small counts are the common ones
    singular, plural = rng.choice(_THINGS)
    noun = singular if index == 0 else plural
    adjective = f"{rng.choice(_THING_ADJECTIVES)} " if rng.random() < 0.6 else ""
    return f"{_NUMBERS[index]} {adjective}{noun}", plural


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    subject, plural, pronoun = _subject(rng)
    past = rng.random() < 0.35
    if kind < 0.4:  # the old miller sells seven red apples to the baker.
        base, third, past_form = rng.choice(_GIVING_VERBS)
        verb = past_form if past else base if plural else third
        things, _ = _things(rng)
        other, _, _ = _subject(rng)
        return f"{subject} {verb} {things} to {other}."
    if kind < 0.6:  # the children sing at the river every evening.
        base, third, past_form = rng.choice(_RESTING_VERBS)
        verb = past_form if past else base if plural else third
        time = f" {rng.choice(_TIMES)}" if rng.random() < 0.5 else ""
        return f"{subject} {verb} at the {rng.choice(_PLACES)}{time}."
    if kind < 0.8:  # does the baker sell fresh loaves? yes, she sells two fresh loaves.
        base, third, _ = rng.choice(_GIVING_VERBS)
        things, noun = _things(rng)
        if rng.random() < 0.5:
            return f"{'do' if plural else 'does'} {subject} {base} {noun}? yes, {pronoun} {base if plural else third} {things}."
        return (
            f"{'do' if plural else 'does'} {subject} {base} {noun}? no, {pronoun} {base if plural else third} nothing."
        )
    if kind < 0.9:  # the smith has three cups, and the potter has five.
        _, first_noun = _things(rng)
        count, _ = _things(rng)
        other, other_plural, _ = _subject(rng)
        second = rng.choice(_NUMBERS)
        return f"{subject} {'have' if plural else 'has'} {count}, and {other} {'have' if other_plural else 'has'} {second}."
    start = rng.randrange(len(_NUMBERS) - 3)  # counting: a fully predictable continuation
    stop = rng.randrange(start + 3, len(_NUMBERS) + 1)
    return f"{subject} {'count' if plural else 'counts'}: {', '.join(_NUMBERS[start:stop])}."


def generated_corpus(n_chars: int, seed: int = 0) -> str:
    """Synthetic English-like text from a small probabilistic grammar, exactly ``n_chars`` characters long.

    Sentences such as "The old miller sells seven red apples to the baker." with subject-verb and number-noun
    agreement, questions answered by repeating their noun, counting runs, and paragraphs separated by line breaks.
    Guarantees: ASCII only; the same ``(n_chars, seed)`` gives the same text on every machine (``random.Random``);
    a text ``n`` characters long is a prefix of the text for any longer ``n_chars`` with the same seed; the structure
    lets a small language model get far below the unigram entropy (about 2.9 nats per byte).
    """
    if n_chars < 0:
        raise RelearnError(f"n_chars must be non-negative, got {n_chars}")
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < n_chars:
        sentences = [_sentence(rng) for _ in range(rng.randint(2, 5))]
        paragraph = " ".join(s[0].upper() + s[1:] for s in sentences)
        paragraph += "\n\n" if rng.random() < 0.25 else "\n"
        parts.append(paragraph)
        length += len(paragraph)
    return "".join(parts)[:n_chars]


def stdlib_corpus(max_chars: int) -> str:
    """Real text that exists on every machine without a download: the source of Python's own standard library.

    The top-level ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, in sorted file-name order, concatenated
    (each ending in a line break) and truncated to ``max_chars``. Deterministic for a given Python installation;
    another Python version gives other text. Shorter than ``max_chars`` only when the whole library is shorter.
    """
    if max_chars < 0:
        raise RelearnError(f"max_chars must be non-negative, got {max_chars}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.glob("*.py") if path.is_file())
    if not files:
        raise RelearnError(f"no standard-library sources (*.py) found in {root}")
    parts: list[str] = []
    length = 0
    for path in files:
        if length >= max_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        text = text if text.endswith("\n") else text + "\n"
        parts.append(text)
        length += len(text)
    return "".join(parts)[:max_chars]


# --------------------------------------------------------------------------------------------------- text source


@dataclass
class _Text:
    """Rows of text plus how to read them: ``documents`` rows get an eos separator, line rows do not."""

    rows: datasets.Dataset
    column: str
    documents: bool
    source: str


def _load_file(path: str, text_column: str) -> _Text:
    builder = _FILE_BUILDERS[Path(path).suffix.lower()]
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
    return _Text(rows, column, documents=builder != "text", source=path)


def _check_column(rows: datasets.Dataset, column: str, source: str) -> None:
    if column not in rows.column_names:
        raise RelearnError(
            f"{source} has no column {column!r}; its columns are {', '.join(rows.column_names)} (set --text_column)"
        )
    feature = rows.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise RelearnError(f"{source}: column {column!r} holds {feature}, not text")


def _load_hub(args: DataArguments) -> tuple[_Text, _Text | None]:
    name = args.dataset_name
    assert name is not None
    source = name if args.dataset_config_name is None else f"{name} ({args.dataset_config_name})"
    try:
        splits = datasets.load_dataset(name, args.dataset_config_name)
    except (OSError, ValueError) as err:  # not found, offline, missing config name: all end up here
        raise RelearnError(f"dataset {source!r} could not be loaded: {err}") from err
    if "train" not in splits:
        raise RelearnError(f"dataset {source!r} has no 'train' split; its splits are {', '.join(splits)}")
    _check_column(splits["train"], args.text_column, source)
    train = _Text(splits["train"], args.text_column, documents=True, source=f"{source} train split")
    if "validation" not in splits:
        return train, None
    _check_column(splits["validation"], args.text_column, source)
    return train, _Text(splits["validation"], args.text_column, documents=True, source=f"{source} validation split")


def _load_texts(args: DataArguments) -> tuple[_Text, _Text | None]:
    """The training text and, when the data names one, the validation text."""
    if args.train_file is not None:
        train = _load_file(args.train_file, args.text_column)
        validation = None
    elif args.dataset_name is not None:
        train, validation = _load_hub(args)
    else:
        if args.builtin_corpus == "stdlib":
            text, source = stdlib_corpus(args.generated_chars), "the standard library's source"
        else:
            text, source = generated_corpus(args.generated_chars, args.corpus_seed), "the generated corpus"
        rows = datasets.Dataset.from_dict({"text": text.splitlines(keepends=True)})
        train, validation = _Text(rows, "text", documents=False, source=source), None
    if args.validation_file is not None:
        validation = _load_file(args.validation_file, args.text_column)
    return train, validation


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def _token_stream(text: _Text, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All rows tokenised and concatenated into one int64 array (documents end with eos, lines stay as they are)."""
    separator = _separator_id(tokenizer) if text.documents else None

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


def _blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    count = len(stream) // block_size
    return stream[: count * block_size].reshape(count, block_size)


def _min_tokens_for_holdout(block_size: int, fraction: float) -> int:
    """The shortest stream whose held-out end gives 1 validation block and whose rest gives 2 training blocks."""
    n = max(3 * block_size, math.ceil((block_size - 0.5) / fraction) - 1)
    while not (_held_out(n, fraction) >= block_size and n - _held_out(n, fraction) >= 2 * block_size):
        n += 1
    return n


def _held_out(n_tokens: int, fraction: float) -> int:
    return int(round(n_tokens * fraction))


def _split_streams(args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation token streams, each long enough for its blocks (else a RelearnError)."""
    train_text, validation_text = _load_texts(args)
    stream = _token_stream(train_text, tokenizer)
    if len(stream) == 0:
        raise RelearnError(f"{train_text.source} contains no text")
    block = args.block_size
    if validation_text is None:
        n_eval = _held_out(len(stream), args.validation_fraction)
        if n_eval < block or len(stream) - n_eval < 2 * block:
            raise RelearnError(
                f"{train_text.source} has {len(stream)} tokens: block_size {block} with validation_fraction "
                f"{args.validation_fraction} needs at least {_min_tokens_for_holdout(block, args.validation_fraction)} "
                "(2 training blocks and 1 held-out validation block); use a smaller block_size or more text"
            )
        # contiguous hold-out from the end: no validation token is ever seen in training
        return stream[: len(stream) - n_eval], stream[len(stream) - n_eval :]
    if len(stream) < 2 * block:
        raise RelearnError(
            f"{train_text.source} has {len(stream)} tokens: block_size {block} needs at least {2 * block} "
            "(2 training blocks); use a smaller block_size or more text"
        )
    eval_stream = _token_stream(validation_text, tokenizer)
    if len(eval_stream) == 0:
        raise RelearnError(f"{validation_text.source} contains no text")
    if len(eval_stream) < block:
        raise RelearnError(
            f"{validation_text.source} has {len(eval_stream)} tokens: block_size {block} needs at least {block} "
            "(1 validation block); use a smaller block_size or more text"
        )
    return stream, eval_stream


# --------------------------------------------------------------------------------------------------- collation


class _MaskedLMCollator:
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


def _mask_once(blocks: np.ndarray, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked inputs and labels for ``blocks``, drawn from their own generator: the global RNG is not touched."""
    masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=_MLM_PROBABILITY, seed=seed)
    batch = masker([{"input_ids": row} for row in blocks.tolist()])
    return batch["input_ids"].numpy().astype(np.int64), batch["labels"].numpy().astype(np.int64)


def _dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    # int64 explicitly: datasets would store a column called input_ids as int32, and int32 labels break the loss
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int64")) for name in columns})
    return datasets.Dataset.from_dict({name: array.astype(np.int64) for name, array in columns.items()}, features)


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


def _mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.mask_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return int(token_id)
    raise RelearnError(
        f"seq2seq_task 'denoise' needs a tokenizer with a mask (or unk) token; {type(tokenizer).__name__} has none "
        "(use --tokenizer bytes)"
    )


def _objective_columns(
    blocks: np.ndarray,
    objective: str,
    task: str = "continue",
    mask_id: int | None = None,
    seed: int = 0,
    target_tokens: int | None = None,
) -> dict[str, np.ndarray]:
    ones = np.ones_like(blocks)
    if objective == "clm":
        return {"input_ids": blocks, "attention_mask": ones, "labels": blocks.copy()}
    if objective == "seq2seq" and task == "denoise":
        assert mask_id is not None
        return {"input_ids": denoise_source(blocks, mask_id, seed), "attention_mask": ones, "labels": blocks.copy()}
    if objective == "seq2seq":
        half = blocks.shape[1] // 2 if target_tokens is None else blocks.shape[1] - target_tokens
        return {"input_ids": blocks[:, :half], "attention_mask": ones[:, :half], "labels": blocks[:, half:]}
    return {"input_ids": blocks, "attention_mask": ones}  # distill, and mlm before masking


def build_datasets(
    args: DataArguments, tokenizer: PreTrainedTokenizerBase, objective: str
) -> tuple[datasets.Dataset, datasets.Dataset, Callable[[list[dict[str, Any]]], dict[str, Any]]]:
    """``(train_dataset, eval_dataset, data_collator)`` for ``objective``, ready for ``transformers.Trainer``.

    Text: ``args.train_file``, else ``args.dataset_name`` (its "validation" split when it has one), else
    :func:`generated_corpus`. Rows of a .txt file or the generated corpus are lines and concatenate back to the text;
    rows of json/csv/parquet/Hub data are documents and each is followed by the tokenizer's eos (or sep) token.
    Validation: ``args.validation_file``, else the Hub validation split, else the last ``validation_fraction`` of the
    training token stream, held out contiguously (no token of it is in any training block).
    Every example is a ``block_size`` slice of the stream (the remainder is dropped), in stream order; then the
    first ``max_train_samples`` / ``max_eval_samples`` blocks are kept.

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
    or unreadable file, a missing text column, or text too short for 2 training blocks and 1 validation block.
    """
    if objective not in _OBJECTIVES:
        raise RelearnError(f"unknown objective {objective!r}; choose one of {', '.join(_OBJECTIVES)}")
    if objective == "mlm" and tokenizer.mask_token is None:
        raise RelearnError(
            f"objective 'mlm' needs a tokenizer with a mask token; {type(tokenizer).__name__} "
            f"({tokenizer.name_or_path or 'unnamed'}) has none (use --tokenizer bytes or an MLM model's tokenizer)"
        )
    train_stream, eval_stream = _split_streams(args, tokenizer)
    train_blocks = _blocks(train_stream, args.block_size)[: args.max_train_samples]
    eval_blocks = _blocks(eval_stream, args.block_size)[: args.max_eval_samples]

    task, mask_id = args.seq2seq_task, None
    if objective == "seq2seq" and task == "denoise":
        mask_id = _mask_token_id(tokenizer)
    target = args.seq2seq_target_tokens
    train_dataset = _dataset(_objective_columns(train_blocks, objective, task, mask_id, args.corpus_seed, target))
    if objective != "mlm":
        evals = _dataset(_objective_columns(eval_blocks, objective, task, mask_id, args.corpus_seed + 1, target))
        return train_dataset, evals, default_data_collator
    masked, labels = _mask_once(eval_blocks, tokenizer, args.corpus_seed)
    eval_dataset = _dataset({"input_ids": masked, "attention_mask": np.ones_like(masked), "labels": labels})
    return train_dataset, eval_dataset, _MaskedLMCollator(tokenizer)


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
