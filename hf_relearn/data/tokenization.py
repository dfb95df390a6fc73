"""Tokenizers: the file-free byte tokenizer, the tokenizer a ``--tokenizer`` spec names, tokenizer-file detection.

Named ``tokenization`` rather than ``tokenizers`` so that it is never mistaken for (or shadows) the 🤗 ``tokenizers``
package it builds on.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import RelearnError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


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


def has_tokenizer_files(path: Path) -> bool:
    """Whether the folder ``path`` holds at least one tokenizer file (any of :data:`TOKENIZER_FILES`).

    Guarantees: only checks that such a file exists (it is not opened); ``False`` for a missing folder or a file.
    """
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _from_pretrained(spec: str, what: str) -> PreTrainedTokenizerBase:
    if not Path(spec).exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise RelearnError(f"{what} {spec!r}: no such folder")
    # a folder without tokenizer files still "loads" (as an empty GPT-2 tokenizer, vocab_size 0): refuse it first
    if Path(spec).is_dir() and not has_tokenizer_files(Path(spec)):
        raise RelearnError(
            f"{what} {spec!r}: the folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
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
        has_own = model_path is not None and Path(model_path).is_dir() and has_tokenizer_files(Path(model_path))
        spec = "model" if has_own else "bytes"
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "model":
        if model_path is None:
            raise RelearnError("tokenizer 'model' needs a model path (the model's own tokenizer is loaded from it)")
        if Path(model_path).is_dir() and not has_tokenizer_files(Path(model_path)):
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
