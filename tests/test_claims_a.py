"""README claims not backed by another test: blocks' parameter counts, reset's tokenizer, the probe's shared prefix
cache, the relearn console, argument defaults and directions, file formats, shipped recipes."""

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerCallback

import hf_relearn
import hf_relearn.probe as probe_module
from hf_relearn.blocks import BlockMap
from hf_relearn.cli import _recipe_path, main
from hf_relearn.config import ModelArguments, PretrainArguments, RelearnArguments
from hf_relearn.data import DataArguments, build_datasets
from hf_relearn.modeling import load_model
from hf_relearn.prefix_cache import PrefixCache
from hf_relearn.probe import ProbeArguments, probe
from hf_relearn.runner import relearn
from hf_relearn.tokenization import get_tokenizer

TINY = "n_layer=4,n_embd=32,n_head=2,n_positions=64"
NO_DROPOUT = f"{TINY},resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"


def _distinct_numel(model, names) -> int:
    """Parameters of the named tensors, a tensor shared by several names counted once (by storage)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum({params[n].data_ptr(): params[n].numel() for n in names}.values())


# 1 --------------------------------------------------------------------------------------------- blocks MODEL
T5 = "num_layers=2,num_decoder_layers=2,d_model=32,d_ff=64,num_heads=2,d_kv=16"


@pytest.mark.parametrize("model_type, overrides", [("gpt2", TINY), ("t5", T5)])
def test_blocks_prints_every_valid_name_with_its_distinct_parameter_count(model_type, overrides, capsys):
    model = load_model(model_type, overrides, seed=0)
    bmap = BlockMap(model)
    expected = {b.name: _distinct_numel(model, bmap.resolve(b.name).params) for b in bmap.names()}
    if model_type == "t5":  # tied tensors once: shared, encoder.embed_tokens and decoder.embed_tokens are one tensor
        assert len(bmap.resolve("embeddings").params) == 3 and expected["embeddings"] == model.shared.weight.numel()
    else:
        assert expected["decoder"] == sum(expected[f"decoder.{i}"] for i in range(4))

    assert main(["blocks", model_type, "--config-overrides", overrides, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"]: b["parameters"] for b in data["blocks"]} == expected

    assert main(["blocks", model_type, "--config-overrides", overrides]) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in expected:  # "  NAME  KIND  COUNT"
            printed[parts[0]] = int(parts[2].replace(",", ""))
    assert printed == expected


# 2 --------------------------------------------------------------------------------------------- reset's tokenizer
def _tiny_folder(path: Path, tokenizer: bool) -> Path:
    load_model("gpt2", TINY, seed=0).save_pretrained(path)
    if tokenizer:
        get_tokenizer("bytes").save_pretrained(path)
    assert (path / "tokenizer.json").exists() == tokenizer
    return path


def test_reset_saves_the_tokenizer_of_a_source_folder_that_has_one(tmp_path, capsys):
    source = _tiny_folder(tmp_path / "with", tokenizer=True)
    assert main(["reset", str(source), "decoder.1", "--output-dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert saved["model"]["vocab"] == json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    assert (
        get_tokenizer("auto", str(tmp_path / "out"))("abc")["input_ids"] == get_tokenizer("bytes")("abc")["input_ids"]
    )


def test_reset_saves_no_tokenizer_when_the_source_folder_has_none(tmp_path, capsys):
    source = _tiny_folder(tmp_path / "without", tokenizer=False)
    assert main(["reset", str(source), "decoder.1", "--output-dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "surgery.json").exists()
    assert not list((tmp_path / "out").glob("tokenizer*"))


# 3 --------------------------------------------------------------------------------------------- probe's cache
def test_probe_computes_each_layer_boundary_once(tmp_path, monkeypatch):
    caches: list[PrefixCache] = []

    class Recording(PrefixCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(probe_module, "PrefixCache", Recording)
    data = DataArguments(block_size=32, generated_chars=20_000, max_eval_samples=12, tokenizer="bytes")
    args = ProbeArguments(output_dir=str(tmp_path), blocks="layers", seeds="0,1", per_device_eval_batch_size=4)
    rows = probe(ModelArguments(model="gpt2", config_overrides=NO_DROPOUT), data, args, progress=False)
    assert len(rows) == 4 * 2  # 4 layers x 2 seeds = 8 resets
    _, evals, _ = build_datasets(data, get_tokenizer("bytes"), "clm")
    assert len(evals) == 12
    (cache,) = caches
    # the first reset (decoder.3, deepest) computes every boundary below it for each evaluation row; the other 5
    # resets with a prefix (decoder.3 seed 1, decoder.2 and decoder.1 twice) are served; decoder.0 has no prefix
    assert cache.filled_rows == len(evals)  # not 6 x 12 = 72: one fill per evaluation row, not one per reset


# 4, 5 ------------------------------------------------------------------------------------ the relearn console
RELEARN_ARGV = ["--max_steps", "10", "--eval_steps", "5", "--stop_at_recovery", "false", "--disable_tqdm", "true"]


def test_log_level_info_shows_the_trainers_dictionaries_like_verbose(gpt2_base, tmp_path, capsys):
    argv = ["relearn", "--model", str(gpt2_base), "--original_run", str(gpt2_base), "--block", "decoder.2",
            *RELEARN_ARGV]  # fmt: skip
    assert main([*argv, "--output_dir", str(tmp_path / "info"), "--log_level", "info"]) == 0
    out = capsys.readouterr().out
    assert "'eval_loss'" in out and "{'loss'" in out
    assert "step 5: eval_loss" not in out and "step 10: eval_loss" not in out
    assert not out.startswith("relearn decoder.2: at most")  # no cost line either: the console is off


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_callbacks_receive_the_same_logs_with_the_console(gpt2_base, tmp_path, capsys):
    received = {}
    for console in (False, True):
        cb = LogRecorder()
        args = RelearnArguments(output_dir=str(tmp_path / str(console)), block="decoder.2", original_run=str(gpt2_base),
                                max_steps=10, eval_steps=5, stop_at_recovery=False, per_device_train_batch_size=16,
                                learning_rate=3e-3, disable_tqdm=True, seed=0, logging_steps=5)  # fmt: skip
        relearn(ModelArguments(model=str(gpt2_base)), DataArguments(), args, callbacks=[cb], console=console)
        received[console] = cb.logs
    assert "step 5: eval_loss" in capsys.readouterr().out  # the console was on in the second run
    evals = {
        c: [(log["epoch"], log["eval_loss"]) for log in logs if "eval_loss" in log] for c, logs in received.items()
    }
    assert len(evals[True]) == 2 and evals[True] == evals[False]
    keys = {c: [sorted(k for k in log if not k.endswith(("runtime", "per_second"))) for log in logs]
            for c, logs in received.items()}  # fmt: skip
    assert keys[True] == keys[False]  # the same log entries, the training ones included


# 6 --------------------------------------------------------------------------------------------- direction
def test_greater_is_better_flips_the_direction_of_the_recovery_metric(tmp_path):
    def args(**kw):
        return RelearnArguments(output_dir=str(tmp_path), recovery_metric="perplexity_loss", **kw)

    assert args().higher_is_better is False  # from the name: a loss falls
    # --greater_is_better alone declares the direction; so it does for metric_for_best_model naming the same metric
    assert args(greater_is_better=True).higher_is_better is True
    assert args(greater_is_better=True, metric_for_best_model="perplexity_loss").higher_is_better is True
    assert args(greater_is_better=True, metric_for_best_model="eval_perplexity_loss").higher_is_better is True
    # and the other way round: a metric that rises by its name, declared lower-is-better
    rising = RelearnArguments(output_dir=str(tmp_path), recovery_metric="accuracy")
    assert rising.higher_is_better is True
    declared = RelearnArguments(output_dir=str(tmp_path), recovery_metric="accuracy", greater_is_better=False,
                                metric_for_best_model="accuracy")  # fmt: skip
    assert declared.higher_is_better is False


# 7 --------------------------------------------------------------------------------------------- file formats
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


# 8 --------------------------------------------------------------------------------------------- convergence
def test_convergence_defaults_are_what_the_readme_states(tmp_path):
    plain = PretrainArguments(output_dir=str(tmp_path))
    assert (plain.convergence_patience, plain.convergence_threshold, plain.convergence_window) == (8, 0.005, 0.25)
    assert plain.until_converged is False
    converged = PretrainArguments(output_dir=str(tmp_path), until_converged=True, max_steps=100)
    # "the learning rate halves whenever the loss has not improved by 0.2% for five evaluations in a row":
    # torch's ReduceLROnPlateau cuts once the bad evaluations exceed patience, i.e. at the fifth
    assert str(converged.lr_scheduler_type) in ("reduce_lr_on_plateau", "SchedulerType.REDUCE_ON_PLATEAU")
    assert converged.lr_scheduler_kwargs == {"factor": 0.5, "patience": 4, "threshold": 0.002, "threshold_mode": "rel"}
    # "the best checkpoint is the base", "checkpoints are written at each evaluation"
    assert converged.load_best_model_at_end and converged.metric_for_best_model == "eval_loss"
    assert converged.greater_is_better is False and str(converged.save_strategy).endswith(("steps", "STEPS"))
    assert converged.save_steps == converged.eval_steps
    # "unless you pick another schedule"
    cosine = PretrainArguments(output_dir=str(tmp_path), until_converged=True, lr_scheduler_type="cosine")
    assert str(cosine.lr_scheduler_type) in ("cosine", "SchedulerType.COSINE")


# 9 --------------------------------------------------------------------------------------------- shipped recipes
def test_study_finds_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called demo here
    shipped = Path(hf_relearn.__file__).resolve().parent / "recipes" / "demo.yaml"
    assert shipped.is_file()
    assert _recipe_path("demo") == str(shipped)
    assert _recipe_path("demo.yaml") == str(shipped)
    own = tmp_path / "demo.yaml"
    own.write_text("name: mine\n")
    assert _recipe_path(str(own)) == str(own)  # a path that exists is returned unchanged
    assert _recipe_path("demo.yaml") == "demo.yaml"  # ... also when it shadows a shipped name
    assert _recipe_path("no-such-recipe") == "no-such-recipe"


# 10 -------------------------------------------------------------------------------------------- DDP defaults
@pytest.mark.parametrize("cls", [RelearnArguments, PretrainArguments])
def test_ddp_defaults_are_off(cls, tmp_path):
    args = cls(output_dir=str(tmp_path))
    assert args.ddp_find_unused_parameters is False
    assert args.average_tokens_across_devices is False
