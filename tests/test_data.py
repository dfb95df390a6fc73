"""Data pipeline: byte tokenizer, corpora, blocks per objective, the fixed MLM eval set, bad input."""

import copy
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast

from hf_relearn import RelearnError
from hf_relearn.data.corpora import generated_corpus, stdlib_corpus
from hf_relearn.data.datasets import DataArguments, build_datasets, build_splits, selection_rows, unigram_loss
from hf_relearn.data.tokenization import byte_tokenizer, get_tokenizer

TEXTS = [
    "plain ascii, with punctuation!?",
    "héllo wörld, naïve café — “quotes” 日本語 🙂👍🏽",
    "tabs\tand\nnew lines\r\nand a NUL \x00 and \x7f and trailing spaces   ",
    "literal specials stay bytes: </s> <mask> <pad>",
    "",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def _args(**kw) -> DataArguments:
    kw.setdefault("generated_chars", 30_000)
    kw.setdefault("block_size", 64)
    return DataArguments(**kw)


def _rows(dataset, column="input_ids") -> list[list[int]]:
    return [list(row) for row in dataset[column]]


def _bytes(blocks: list[list[int]]) -> bytes:
    return bytes(b for block in blocks for b in block)


# ---------------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_maps_each_byte_to_its_id_and_round_trips(tok, text):
    ids = tok(text)["input_ids"]  # default add_special_tokens=True must still add nothing
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_tokens(tok):
    assert len(tok) == 259
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (256, 257, 258, 258)
    assert tok.convert_ids_to_tokens([256, 257, 258]) == ["<pad>", "<mask>", "</s>"]
    assert tok.decode([104, 258, 105], skip_special_tokens=True) == "hi"


def test_byte_tokenizer_survives_save_and_auto_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 259
    assert (loaded.pad_token_id, loaded.mask_token_id, loaded.eos_token_id) == (256, 257, 258)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == list(text.encode("utf-8"))
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_get_tokenizer_sources(tok, tmp_path):
    assert get_tokenizer("bytes")("é")["input_ids"] == [195, 169]
    tok.save_pretrained(tmp_path / "tok")
    assert len(get_tokenizer(str(tmp_path / "tok"))) == 259
    assert len(get_tokenizer("model", str(tmp_path / "tok"))) == 259
    with pytest.raises(RelearnError, match="needs a model path"):
        get_tokenizer("model")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(RelearnError, match="no tokenizer files"):
        get_tokenizer("model", str(tmp_path / "model"))
    with pytest.raises(RelearnError, match="no tokenizer files"):
        get_tokenizer(str(tmp_path / "model"))
    with pytest.raises(RelearnError, match="no such folder"):
        get_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(RelearnError, match="could not be fetched"):
        get_tokenizer("no-such-org/no-such-tokenizer")  # offline in the tests


def test_get_tokenizer_sets_a_missing_pad_token_to_eos(tmp_path):
    no_pad = byte_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    assert get_tokenizer(str(tmp_path)).pad_token_id == 258


# --------------------------------------------------------------------------------------------------- corpora


def test_generated_corpus_is_deterministic_and_exactly_sized():
    for n in (0, 1, 999, 12_345):
        assert len(generated_corpus(n, seed=3)) == n
    text = generated_corpus(20_000, seed=3)
    assert text == generated_corpus(20_000, seed=3)
    assert text != generated_corpus(20_000, seed=4)
    assert generated_corpus(5_000, seed=3) == text[:5_000]
    assert text.isascii() and text.count("\n") > 50 and text.count(".") > 200
    with pytest.raises(RelearnError):
        generated_corpus(-1)


def _context_model_loss(stream: np.ndarray, cut: int, order: int) -> float:
    """Held-out cross-entropy of a lightly smoothed order-``order`` byte model fitted on ``stream[:cut]``."""
    contexts, full = Counter(), Counter()
    for i in range(order, cut):
        contexts[stream[i - order : i].tobytes()] += 1
        full[stream[i - order : i + 1].tobytes()] += 1
    losses = [
        -math.log(
            (full[stream[i - order : i + 1].tobytes()] + 0.01) / (contexts[stream[i - order : i].tobytes()] + 2.56)
        )
        for i in range(cut + order, len(stream))
    ]
    return float(np.mean(losses))


def test_generated_corpus_has_structure_far_below_unigram():
    stream = np.frombuffer(generated_corpus(60_000, seed=1).encode(), dtype=np.uint8)
    cut = 50_000
    counts = np.bincount(stream[:cut], minlength=256) + 1.0
    unigram = float(-np.log(counts[stream[cut:]] / counts.sum()).mean())
    assert 2.5 < unigram < 3.5  # English-like letter frequencies
    assert _context_model_loss(stream, cut, order=4) < 0.4 * unigram


def test_stdlib_corpus_is_real_deterministic_python_source():
    text = stdlib_corpus(50_000)
    assert len(text) == 50_000
    assert text == stdlib_corpus(50_000)
    assert stdlib_corpus(1_000) == text[:1_000]
    assert "def " in text and "import " in text
    assert stdlib_corpus(0) == ""


# ------------------------------------------------------------------------------------------------- arguments


def test_data_arguments_parse_with_hf_argument_parser(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello\n")
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_file", str(path), "--block_size", "32", "--max_eval_samples", "5", "--validation_fraction", "0.2"]
    )
    assert (args.train_file, args.block_size, args.max_eval_samples, args.validation_fraction) == (
        str(path),
        32,
        5,
        0.2,
    )
    assert args.tokenizer == "auto" and args.max_train_samples is None


def test_auto_tokenizer_is_the_model_folders_own_else_bytes(tmp_path, minilm_dir):
    assert len(get_tokenizer("auto", str(minilm_dir))) == 30522  # the folder's WordPiece tokenizer
    (tmp_path / "config.json").write_text("{}")
    assert len(get_tokenizer("auto", str(tmp_path))) == 259  # no tokenizer files there: bytes
    assert len(get_tokenizer("auto", "gpt2")) == 259  # a model built from config


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(block_size=1), "block_size"),
        (dict(validation_fraction=0.0), "validation_fraction"),
        (dict(validation_fraction=0.6), "validation_fraction"),
        (dict(train_file="/no/such/file.txt"), "no such file"),
        (dict(validation_file="/no/such/file.jsonl"), "no such file"),
        (dict(max_train_samples=0), "max_train_samples"),
    ],
)
def test_data_arguments_refuse_bad_values(kw, message):
    with pytest.raises(RelearnError, match=message):
        DataArguments(**kw)


def test_data_arguments_refuse_unsupported_extension(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("some text\n")
    with pytest.raises(RelearnError, match=r"unsupported extension '\.md'.*\.txt"):
        DataArguments(train_file=str(path))


# ------------------------------------------------------------------------------------------- build_datasets


@pytest.mark.parametrize(
    "objective, train_columns, eval_columns, width",
    [
        ("clm", ["input_ids", "attention_mask", "labels"], ["input_ids", "attention_mask", "labels"], 64),
        ("mlm", ["input_ids", "attention_mask"], ["input_ids", "attention_mask", "labels"], 64),
        ("seq2seq", ["input_ids", "attention_mask", "labels"], ["input_ids", "attention_mask", "labels"], 32),
        ("distill", ["input_ids", "attention_mask"], ["input_ids", "attention_mask"], 64),
    ],
)
def test_build_datasets_shapes_per_objective(tok, objective, train_columns, eval_columns, width):
    train, evaluation, collate = build_datasets(_args(), tok, objective)
    assert train.column_names == train_columns and evaluation.column_names == eval_columns
    # 30,000 bytes: the last 10% (3,000) held out -> 46 validation blocks of 64, every 2nd of them (23) selects and
    # the other 23 evaluate; 27,000 -> 421 train blocks
    assert (len(train), len(evaluation)) == (421, 23)
    for dataset in (train, evaluation):
        batch = collate([dataset[i] for i in range(3)])
        assert set(batch) == set(dataset.column_names) | ({"labels"} if objective == "mlm" else set())
        assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long
        assert batch["attention_mask"].shape == (3, width) and bool(batch["attention_mask"].all())
        if objective == "seq2seq":
            assert batch["labels"].shape == (3, 64 - width)


def test_clm_and_seq2seq_labels(tok):
    clm, clm_eval, _ = build_datasets(_args(block_size=65), tok, "clm")
    s2s, s2s_eval, _ = build_datasets(_args(block_size=65), tok, "seq2seq")
    assert _rows(clm, "labels") == _rows(clm)
    for blocks, halves in ((clm, s2s), (clm_eval, s2s_eval)):
        inputs, labels = _rows(halves), _rows(halves, "labels")
        assert {len(r) for r in inputs} == {32} and {len(r) for r in labels} == {33}
        assert [a + b for a, b in zip(inputs, labels, strict=True)] == _rows(blocks)


def test_holdout_is_the_contiguous_end_of_the_stream(tok):
    args = _args(generated_chars=30_001, validation_fraction=0.2, corpus_seed=5, selection_fraction=0)
    text = generated_corpus(30_001, seed=5).encode()
    train, evaluation, _ = build_datasets(args, tok, "clm")
    train_bytes, eval_bytes = _bytes(_rows(train)), _bytes(_rows(evaluation))
    assert text.startswith(train_bytes)  # every training block, in stream order
    start = len(text) - round(len(text) * 0.2)
    assert text[start:].startswith(eval_bytes)  # the eval blocks are the last 20%
    assert len(train_bytes) <= start  # no token in both
    assert not {tuple(r) for r in _rows(train)} & {tuple(r) for r in _rows(evaluation)}


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_selection_and_evaluation_splits_divide_the_validation_blocks(tok, objective):
    whole = build_splits(_args(selection_fraction=0), tok, "clm")
    assert whole.selection is None
    blocks = _rows(whole.evaluation)  # 46 validation blocks
    split = build_splits(_args(), tok, objective)
    column = "labels" if objective == "mlm" else "input_ids"
    evaluation, selection = _rows(split.evaluation, column), _rows(split.selection, column)
    if objective == "mlm":  # masked rows: their labels are the original tokens where masked
        evaluation = [[t for t in row if t != -100] for row in evaluation]
        assert all(set(row) <= set(blocks[2 * i]) for i, row in enumerate(evaluation))
        assert _rows(split.evaluation) != _rows(split.selection)[: len(evaluation)]
    else:  # even blocks evaluate, odd blocks select; nothing in both, nothing lost
        assert evaluation == blocks[0::2] and selection == blocks[1::2]
    assert len(split.evaluation) + len(split.selection) == len(blocks)
    third = build_splits(_args(selection_fraction=1 / 3), tok, "clm")
    assert _rows(third.selection) == [b for i, b in enumerate(blocks) if i % 3 == 2]
    assert selection_rows(6, 0.5).tolist() == [False, True, False, True, False, True]
    assert not selection_rows(5, 0.0).any()
    capped = build_splits(_args(max_eval_samples=4), tok, "clm")
    assert _rows(capped.evaluation) == blocks[0:8:2] and _rows(capped.selection) == blocks[1:8:2]
    with pytest.raises(RelearnError, match=r"selection_fraction must be in \[0, 1\)"):
        _args(selection_fraction=1.0)


def test_max_samples_keep_the_first_blocks(tok):
    full_train, full_eval, _ = build_datasets(_args(), tok, "distill")
    train, evaluation, _ = build_datasets(_args(max_train_samples=7, max_eval_samples=3), tok, "distill")
    assert _rows(train) == _rows(full_train)[:7] and _rows(evaluation) == _rows(full_eval)[:3]


def test_mlm_eval_set_is_masked_once_and_never_again(tok):
    rng_before = torch.get_rng_state()
    train, evaluation, collate = build_datasets(_args(corpus_seed=11), tok, "mlm")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the fixed masking has its own generator
    _, again, _ = build_datasets(_args(corpus_seed=11), tok, "mlm")
    assert evaluation[:] == again[:]
    _, other_seed, _ = build_datasets(_args(corpus_seed=12), tok, "mlm")
    assert evaluation[:]["input_ids"] != other_seed[:]["input_ids"]

    _, plain, _ = build_datasets(_args(corpus_seed=11), tok, "clm")
    original = torch.tensor(_rows(plain))
    inputs, labels = torch.tensor(_rows(evaluation)), torch.tensor(_rows(evaluation, "labels"))
    masked = labels != -100
    assert 0.12 < masked.float().mean().item() < 0.18
    assert torch.equal(labels[masked], original[masked])  # labels are the original tokens
    assert torch.equal(inputs[~masked], original[~masked])  # unmasked positions are untouched
    assert (inputs[masked] == tok.mask_token_id).float().mean().item() > 0.7

    examples = [evaluation[i] for i in range(8)]
    first, second = collate(examples), collate(examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(first[key], second[key])
        assert torch.equal(first[key], torch.tensor(_rows(evaluation, key)[:8]))


def test_mlm_train_batches_are_masked_afresh_and_mixed_batches_keep_eval_masks(tok):
    train, evaluation, collate = build_datasets(_args(), tok, "mlm")
    examples = [train[i] for i in range(16)]
    torch.manual_seed(0)
    first, second = collate(examples), collate(examples)
    assert not torch.equal(first["labels"], second["labels"])
    original = torch.tensor([e["input_ids"] for e in examples])
    masked = first["labels"] != -100
    assert 0.08 < masked.float().mean().item() < 0.22
    assert torch.equal(first["labels"][masked], original[masked])

    mixed = collate([evaluation[0], train[0], evaluation[1]])
    assert torch.equal(mixed["labels"][0], torch.tensor(evaluation[0]["labels"]))
    assert torch.equal(mixed["input_ids"][2], torch.tensor(evaluation[1]["input_ids"]))
    assert (mixed["labels"][1] != -100).any()


def test_mlm_needs_a_mask_token():
    no_mask = byte_tokenizer()
    no_mask.mask_token = None
    with pytest.raises(RelearnError, match="mask token"):
        build_datasets(_args(), no_mask, "mlm")


def test_mlm_with_the_real_minilm_tokenizer(minilm_dir):
    tokenizer = get_tokenizer("model", str(minilm_dir))
    train, evaluation, collate = build_datasets(_args(block_size=32), tokenizer, "mlm")
    batch = collate([evaluation[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 32) and (batch["input_ids"] == tokenizer.mask_token_id).any()
    assert "the" in tokenizer.decode(train[0]["input_ids"])


def test_unknown_objective_lists_the_valid_ones(tok):
    with pytest.raises(RelearnError, match="clm, mlm, seq2seq, distill"):
        build_datasets(_args(), tok, "ctc")


# ------------------------------------------------------------------------------------------------ file input


def test_txt_train_file_is_read_as_one_stream_with_line_breaks(tok, tmp_path):
    text = "".join(f"Zeile {i}: grüße aus köln, ünd noch ein satz.\n" for i in range(200))
    path = tmp_path / "train.txt"
    path.write_text(text, encoding="utf-8")
    args = _args(train_file=str(path), block_size=50, selection_fraction=0)
    train, evaluation, _ = build_datasets(args, tok, "clm")
    stream = text.encode()
    assert stream.startswith(_bytes(_rows(train)))
    assert _bytes(_rows(evaluation)) in stream[len(stream) - round(0.1 * len(stream)) :]


def test_jsonl_documents_are_separated_by_eos(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    docs = [f"document number {i} says hello." for i in range(300)]
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    train, _, _ = build_datasets(_args(train_file=str(path), text_column="body", block_size=40), tok, "distill")
    expected = [t for d in docs for t in (*d.encode(), tok.eos_token_id)]
    got = [t for row in _rows(train) for t in row]
    assert len(got) > 0.8 * len(expected) and got == expected[: len(got)]


def test_validation_file_replaces_the_holdout(tok, tmp_path):
    train_path, valid_path = tmp_path / "train.txt", tmp_path / "valid.csv"
    train_path.write_text(generated_corpus(10_000, seed=0))
    valid_path.write_text("text,other\n" + "".join(f"validation row {i},x\n" for i in range(40)))
    args = _args(train_file=str(train_path), validation_file=str(valid_path), selection_fraction=0)
    train, evaluation, _ = build_datasets(args, tok, "clm")
    assert len(train) == 10_000 // 64  # nothing held out
    expected = [t for i in range(40) for t in (*f"validation row {i}".encode(), tok.eos_token_id)]
    got = [t for row in _rows(evaluation) for t in row]
    assert got == expected[: len(got)] and len(got) == len(expected) // 64 * 64


def test_a_local_dataset_folder_uses_its_validation_split(tok, tmp_path):
    for split, n in (("train", 400), ("validation", 60)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": f"{split} doc {i}."}) + "\n" for i in range(n))
    args = _args(dataset_name=str(tmp_path), block_size=32, selection_fraction=0)
    train, evaluation, _ = build_datasets(args, tok, "clm")
    assert len(train) == len(_tokens_of_docs(tok, "train", 400)) // 32  # nothing held out of train
    for dataset, split, n in ((train, "train", 400), (evaluation, "validation", 60)):
        got = [t for row in _rows(dataset) for t in row]
        assert got == _tokens_of_docs(tok, split, n)[: len(got)]


def _tokens_of_docs(tok, split: str, n: int) -> list[int]:
    return [t for i in range(n) for t in (*f"{split} doc {i}.".encode(), tok.eos_token_id)]


def test_tinyshakespeare(tok, shared_data):
    path = shared_data / "tinyshakespeare.txt"
    train, evaluation, _ = build_datasets(DataArguments(train_file=str(path), selection_fraction=0), tok, "clm")
    stream = path.read_bytes()
    assert (len(train), len(evaluation)) == ((len(stream) - round(0.1 * len(stream))) // 128, 871)
    assert stream.startswith(_bytes(_rows(train)))
    assert stream[len(stream) - round(0.1 * len(stream)) :].startswith(_bytes(_rows(evaluation)))
    split = build_splits(DataArguments(train_file=str(path)), tok, "clm")  # 871 validation blocks: 435 + 436
    assert (len(split.evaluation), len(split.selection)) == (436, 435)
    assert _rows(split.evaluation) == _rows(evaluation)[0::2] and _rows(split.selection) == _rows(evaluation)[1::2]
    assert 3.0 < unigram_loss(train, evaluation, len(tok)) < 3.7


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_file_is_named(tok, tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    with pytest.raises(RelearnError, match=f"{name} is empty"):
        build_datasets(_args(train_file=str(path)), tok, "clm")


def test_too_short_text_says_how_many_tokens_it_needs(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300)
    with pytest.raises(RelearnError, match=r"300 tokens: block_size 64 .* needs at least (\d+)") as info:
        build_datasets(_args(train_file=str(path)), tok, "clm")
    needed = int(re.search(r"needs at least (\d+)", str(info.value)).group(1))
    path.write_text("x" * needed)  # the stated minimum is exactly enough
    train, evaluation, _ = build_datasets(_args(train_file=str(path)), tok, "clm")
    assert len(train) >= 2 and len(evaluation) == 1  # 2 validation blocks: one selects, one evaluates
    path.write_text("x" * (needed - 1))
    with pytest.raises(RelearnError, match=f"{needed - 1} tokens: block_size 64 .* needs at least {needed}"):
        build_datasets(_args(train_file=str(path)), tok, "clm")
    valid = tmp_path / "valid.txt"
    valid.write_text("y" * 20)
    with pytest.raises(RelearnError, match=r"valid.txt has 20 tokens: block_size 64 needs at least 128 \(2 held-out"):
        build_datasets(_args(validation_file=str(valid)), tok, "clm")
    with pytest.raises(RelearnError, match=r"valid.txt has 20 tokens: block_size 64 needs at least 64 \(1 held-out"):
        build_datasets(_args(validation_file=str(valid), selection_fraction=0), tok, "clm")


def test_missing_column_lists_the_columns(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"body": "a", "title": "b"}) + "\n" for _ in range(5)))
    with pytest.raises(RelearnError, match="no column 'text'; its columns are body, title"):
        build_datasets(_args(train_file=str(path)), tok, "clm")


def test_unreadable_file_is_named(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(RelearnError, match="could not read .*broken.jsonl as json"):
        build_datasets(_args(train_file=str(path)), tok, "clm")


def test_unreachable_hub_dataset(tok):
    with pytest.raises(RelearnError, match="could not be loaded"):
        build_datasets(_args(dataset_name="no-such-org/no-such-dataset"), tok, "clm")


# ---------------------------------------------------------------------------------------------------- unigram


def test_unigram_loss_by_hand():
    from datasets import Dataset

    train = Dataset.from_dict({"input_ids": [[0, 0, 1]]})
    # add-one counts 3, 2, 1 of 6
    assert unigram_loss(train, Dataset.from_dict({"input_ids": [[0, 2]]}), 3) == pytest.approx(
        -(math.log(3 / 6) + math.log(1 / 6)) / 2
    )
    with_labels = Dataset.from_dict({"input_ids": [[2, 2]], "labels": [[-100, 1]]})
    assert unigram_loss(train, with_labels, 3) == pytest.approx(-math.log(2 / 6))
    with pytest.raises(RelearnError, match="outside vocab_size"):
        unigram_loss(train, Dataset.from_dict({"input_ids": [[5]]}), 3)


@pytest.mark.parametrize("objective", ["clm", "mlm", "seq2seq", "distill"])
def test_unigram_loss_of_generated_text(tok, objective):
    train, evaluation, _ = build_datasets(_args(), tok, objective)
    assert 1.0 < unigram_loss(train, evaluation, len(tok)) < math.log(259)


def test_seq2seq_denoise_masks_spans_of_the_source_and_keeps_the_block_as_target(tok):
    clm, clm_eval, _ = build_datasets(_args(), tok, "clm")
    train, evaluation, _ = build_datasets(_args(seq2seq_task="denoise"), tok, "seq2seq")
    again, _, _ = build_datasets(_args(seq2seq_task="denoise"), tok, "seq2seq")
    mask = tok.mask_token_id
    for blocks, noisy in ((clm, train), (clm_eval, evaluation)):
        source, target = np.array(_rows(noisy)), np.array(_rows(noisy, "labels"))
        assert source.shape == target.shape == np.array(_rows(blocks)).shape  # whole block in, whole block out
        assert (target == np.array(_rows(blocks))).all()
        masked = source == mask
        assert (source[~masked] == target[~masked]).all()  # only masking, nothing else changed
        assert 0.2 < masked.mean() < 0.32 and not masked[:, 0].any()
        runs = np.diff(
            np.concatenate([np.zeros((len(masked), 1)), masked, np.zeros((len(masked), 1))], axis=1), axis=1
        )
        assert masked.sum() / (runs == 1).sum() > 2.0  # spans, not single tokens
    assert _rows(train) == _rows(again)  # the same corruption every build
    assert _rows(train)[0] != _rows(evaluation)[0]
    assert build_datasets(_args(), tok, "seq2seq")[0].column_names == train.column_names  # continue stays default
    with pytest.raises(RelearnError, match="seq2seq_task must be one of continue, denoise"):
        DataArguments(seq2seq_task="shuffle")


def test_seq2seq_target_tokens_sets_the_split_of_a_continue_block(tok):
    blocks, _, _ = build_datasets(_args(), tok, "clm")
    short, _, _ = build_datasets(_args(seq2seq_target_tokens=8), tok, "seq2seq")
    inputs, labels = _rows(short), _rows(short, "labels")
    assert {len(r) for r in inputs} == {56} and {len(r) for r in labels} == {8}
    assert [a + b for a, b in zip(inputs, labels, strict=True)] == _rows(blocks)
    with pytest.raises(RelearnError, match="must be in \\[1, block_size\\)"):
        DataArguments(seq2seq_target_tokens=64, block_size=64)
    with pytest.raises(RelearnError, match="applies to seq2seq_task 'continue' only"):
        DataArguments(seq2seq_target_tokens=8, seq2seq_task="denoise")


def test_a_token_stream_is_read_back_for_the_same_text_and_tokenizer_only(tok, tmp_path, monkeypatch):
    from hf_relearn.data import texts

    monkeypatch.setattr(texts, "_stream_cache", lambda: tmp_path / "streams")
    path = tmp_path / "a.txt"
    path.write_text("to be or not to be\nthat is the question\n" * 50)
    first = texts.token_stream(texts.load_file(str(path), "text"), tok)
    assert len(list((tmp_path / "streams").glob("*.npy"))) == 1
    # a second read comes from the cache (the tokenizer is not called) and is the same int64 stream
    monkeypatch.setattr(texts, "_tokenize_rows", lambda *a: pytest.fail("tokenised the same text again"))
    again = texts.token_stream(texts.load_file(str(path), "text"), tok)
    assert again.dtype == np.int64 and np.array_equal(again, first)
    monkeypatch.undo()
    monkeypatch.setattr(texts, "_stream_cache", lambda: tmp_path / "streams")
    # the same length of other text, or another tokenizer, is tokenised afresh
    path.write_text("to be or not to be\nthat is the questioN\n" * 50)
    changed = texts.token_stream(texts.load_file(str(path), "text"), tok)
    assert len(changed) == len(first) and not np.array_equal(changed, first)
    other = copy.deepcopy(tok)
    other.add_tokens(["be"])  # another tokenizer: "be" is one token now
    with_other = texts.token_stream(texts.load_file(str(path), "text"), other)
    assert len(with_other) < len(changed) and len(list((tmp_path / "streams").glob("*.npy"))) == 3


# -------------------------------------------------------------------------------------------- json and parquet files
DOCS = ["The first document.\nIt has two lines.", "A second, shorter one.", "Ünïcode and a tab\there.", "Last!"] * 6


def _train_stream(path: Path) -> np.ndarray:
    data = DataArguments(train_file=str(path), validation_file=str(path), block_size=8, tokenizer="bytes")
    train, _, _ = build_datasets(data, get_tokenizer("bytes"), "clm")
    return np.asarray(train["input_ids"]).reshape(-1)


def test_json_and_parquet_training_files_are_read_as_documents(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"id": range(len(DOCS)), "text": DOCS})
    frame.to_json(tmp_path / "docs.jsonl", orient="records", lines=True, force_ascii=False)
    frame.to_json(tmp_path / "docs.json", orient="records", lines=True, force_ascii=False)
    frame.to_parquet(tmp_path / "docs.parquet")
    tokenizer = get_tokenizer("bytes")
    expected = [
        i for d in DOCS for i in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ]
    expected = np.asarray(expected[: len(expected) // 8 * 8])  # whole blocks of 8, the remainder dropped
    jsonl = _train_stream(tmp_path / "docs.jsonl")
    assert np.array_equal(jsonl, expected)
    assert np.array_equal(_train_stream(tmp_path / "docs.json"), jsonl)
    assert np.array_equal(_train_stream(tmp_path / "docs.parquet"), jsonl)
