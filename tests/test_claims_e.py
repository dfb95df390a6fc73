"""Documented claims backed here: the prefix cache's training storage size, its refusal under FSDP / DeepSpeed, its
memory budget and folder through a relearn; an optimizer that holds exactly the trainable parameters; warnings on
the console; launches refused before anything is written; `reset --allow-shared` on the command line; defaults."""

import json
import logging
import re
import tempfile
from pathlib import Path

import pytest
from documented import says
from test_claims_b import QUIET_GPT2
from test_relearn import base_run, relearn_run
from transformers import TrainerCallback, TrainingArguments

import hf_relearn.cli as cli
import hf_relearn.config as config_module
import hf_relearn.runner as runner_module
import hf_relearn.trainer_prefix as trainer_prefix
from hf_relearn import RelearnError
from hf_relearn.config import RelearnArguments
from hf_relearn.prefix_cache import PrefixCache
from hf_relearn.probe import ProbeArguments
from hf_relearn.storage import RUN_FILE
from hf_relearn.trainer import RelearnTrainer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 3-layer GPT-2 without dropout trained 3 steps: far from trained, so its relearns warn (unigram level)."""
    out = tmp_path_factory.mktemp("claims-e-base")
    base_run(out, "gpt2", QUIET_GPT2, steps=3, generated_chars=20_000, max_eval_samples=8)
    return out


class StopAfter(TrainerCallback):
    """End training after ``steps`` optimizer steps (enough to size and fill the training store)."""

    def __init__(self, steps: int = 1):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True


# 1 ------------------------------------------------------------------------------ training storage size
ROWS_LOGGED = re.compile(r"^prefix cache: output of (\S+) for (\d+) rows x ")


@pytest.mark.parametrize(
    "max_steps, accumulation, expected",
    [(20, 1, 80), (20, 2, 160), (10_000, 1, None)],  # None: the whole training set (fewer than 10,000 x 4 rows)
    ids=["steps-x-batch", "x-accumulation", "whole-set"],
)
def test_training_storage_is_sized_for_the_rows_the_run_can_meet(base, tmp_path, caplog, max_steps, accumulation,
                                                                 expected):  # fmt: skip
    train_rows = json.loads((base / RUN_FILE).read_text())["train_examples"]
    assert 160 < train_rows < 10_000 * 4  # so each case tells the formula's terms apart
    caplog.set_level(logging.INFO, logger="hf_relearn")
    result = relearn_run(
        tmp_path / "rl", base, "decoder.2", max_steps=max_steps, gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=4, eval_steps=1000, stop_at_recovery=False, callbacks=[StopAfter()],
    )  # fmt: skip
    assert result.prefix_cache["enabled"] and result.prefix_cache["splits"] == ["eval", "train"]
    logged = [ROWS_LOGGED.match(r.getMessage()) for r in caplog.records if r.name.startswith("hf_relearn")]
    sizes = [int(m.group(2)) for m in logged if m]
    # the evaluation rows are stored first (the after-reset measurement): all 8; then the training rows
    assert sizes == [8, expected or train_rows]
    assert result.prefix_cache["rows_filled"] == {"eval": 8, "train": 4 * accumulation}


# 2 ------------------------------------------------------------------------------ auto is off when sharded
@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_auto_prefix_cache_is_off_under_fsdp_or_deepspeed(base, tmp_path, monkeypatch, flag):
    class Sharded(RelearnTrainer):
        """The trainer as an FSDP / DeepSpeed launch sets it up, while it plans the cache (after surgery); the
        measurements and the training around that run unsharded, as this one process can."""

        def _setup_prefix_cache(self):
            setattr(self, flag, True)
            try:
                super()._setup_prefix_cache()
            finally:
                setattr(self, flag, False)

    monkeypatch.setattr(runner_module, "RelearnTrainer", Sharded)
    result = relearn_run(tmp_path / flag, base, "decoder.2", max_steps=2, eval_steps=1, stop_at_recovery=False,
                         per_device_train_batch_size=4)  # fmt: skip
    assert result.prefix_cache == {
        "enabled": False,
        "reason": "FSDP / DeepSpeed shard the frozen layers, so they cannot be run alone to fill the cache",
    }
    # the same run unsharded gets the cache: the sharding alone turned it off
    monkeypatch.setattr(runner_module, "RelearnTrainer", RelearnTrainer)
    plain = relearn_run(tmp_path / "plain", base, "decoder.2", max_steps=2, eval_steps=1, stop_at_recovery=False,
                        per_device_train_batch_size=4)  # fmt: skip
    assert plain.prefix_cache["enabled"] is True


# 3 ------------------------------------------------------------------------------ memory budget and folder
class FilesDuringTraining(TrainerCallback):
    """The files under ``folder`` matching ``pattern`` at the end of each training step."""

    def __init__(self, folder: Path, pattern: str):
        self.folder, self.pattern, self.seen = folder, pattern, set()

    def on_step_end(self, args, state, control, **kwargs):
        self.seen |= {p for p in self.folder.glob(self.pattern) if p.is_file()}


def test_a_zero_memory_budget_puts_the_cache_on_disk_and_the_run_removes_it(base, tmp_path, monkeypatch):
    # every cache the runs make is kept alive here, so what removes its files is the run, not the garbage collector
    # (a TemporaryDirectory left behind is removed when it is collected)
    caches: list[PrefixCache] = []

    class Kept(PrefixCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(trainer_prefix, "PrefixCache", Kept)
    run = dict(max_steps=4, eval_steps=2, logging_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)
    plain = relearn_run(tmp_path / "plain", base, "decoder.2", prefix_cache="false", **run)
    assert plain.prefix_cache == {"enabled": False, "reason": "prefix_cache=false"}

    # --prefix_cache_dir: the stores are files in that folder while the run lasts, none after it
    folder = tmp_path / "cache-dir"
    watch = FilesDuringTraining(folder, "*")
    given = relearn_run(tmp_path / "given", base, "decoder.2", callbacks=[watch], prefix_cache_memory_gb=0,
                        prefix_cache_dir=str(folder), **run)  # fmt: skip
    info = given.prefix_cache
    assert info["enabled"] and info["splits"] == ["eval", "train"] and info["disk_bytes"] > 0
    assert len(watch.seen) >= 2  # one store of evaluation rows, one of training rows
    assert list(folder.iterdir()) == []  # the folder itself stays (it is the user's)

    # no folder given: a temporary one (hf-relearn-prefix-*), removed at the end
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    watch = FilesDuringTraining(temp, "hf-relearn-prefix-*/*")
    default = relearn_run(tmp_path / "default", base, "decoder.2", callbacks=[watch], prefix_cache_memory_gb=0, **run)
    assert default.prefix_cache["disk_bytes"] == info["disk_bytes"] and len(watch.seen) >= 2
    assert list(temp.iterdir()) == []
    assert len(caches) == 2 and caches[1].max_memory_bytes == 0

    # served from disk, the run is the run without the cache
    for cached in (given, default):
        assert cached.curve == plain.curve and len(plain.curve) == 3
        assert cached.train_curve == plain.train_curve and len(plain.train_curve) == 4
        assert cached.after_reset_eval_loss == plain.after_reset_eval_loss


# 6 ------------------------------------------------------------------------------ the optimizer
def test_the_optimizer_holds_exactly_the_trainable_parameters(tmp_path):
    from tiny import tiny

    from hf_relearn.data import DataArguments, build_datasets
    from hf_relearn.tokenization import byte_tokenizer

    data = DataArguments(generated_chars=20_000, block_size=32, max_eval_samples=8)
    train, evals, collator = build_datasets(data, byte_tokenizer(), "clm")
    model = tiny("gpt2", n_positions=32, n_embd=32)
    args = RelearnArguments(
        output_dir=str(tmp_path), block="decoder.1", max_steps=2, eval_steps=1, stop_at_recovery=False,
        report_to=[], save_final_model=False, disable_tqdm=True, per_device_train_batch_size=4,
    )  # fmt: skip
    trainer = RelearnTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collator)
    trainer.train()
    params = dict(model.named_parameters())
    block = {id(params[n]) for n in trainer.block.params}
    assert block and {id(p) for p in params.values() if p.requires_grad} == block
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(block) and {id(p) for p in in_optimizer} == block  # no frozen tensor in it
    assert {id(p) for p in trainer.optimizer.state} == block  # and it stepped exactly those
    assert trainer.result.frozen_unchanged and trainer.result.trainable_parameters == sum(
        params[n].numel() for n in trainer.block.params
    )


# 7 ------------------------------------------------------------------------------ warnings on the console
def test_relearn_prints_the_runs_warnings_on_the_console(base, tmp_path, capsys):
    argv = ["relearn", "--model", str(base), "--original_run", str(base), "--block", "decoder.2", "--max_steps", "2",
            "--eval_steps", "1", "--per_device_train_batch_size", "4", "--stop_at_recovery", "false",
            "--disable_tqdm", "true", "--output_dir", str(tmp_path / "rl")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "rl" / "relearn_result.json").read_text())
    assert "unigram_level" in result["warning_codes"]  # a 3-step base is no better than a unigram model
    assert result["warnings"]
    for warning in result["warnings"]:
        assert f"warning: {warning}\n" in out


# 8 ------------------------------------------------------------------------------ refused launches
def test_a_launch_the_trainer_does_not_join_is_refused_before_anything_is_written(base, tmp_path, monkeypatch, capsys):
    # two processes launched (WORLD_SIZE=2) but no process group formed, as transformers does on a machine without
    # GPUs unless use_cpu is set: the Trainer sees a world of one, and every process would run the whole job alone
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(config_module, "cpu_distributed_default", lambda args: None)
    out = tmp_path / "rl"
    argv = ["relearn", "--model", str(base), "--original_run", str(base), "--block", "decoder.2", "--max_steps", "1",
            "--eval_steps", "1", "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: launched 2 processes but the Trainer sees a world of 1" in err
    assert not out.exists()
    with pytest.raises(RelearnError, match="launched 2 processes but the Trainer sees a world of 1"):
        RelearnArguments(output_dir=str(out))
    assert not out.exists()


def test_a_swap_warm_up_is_refused_under_a_multi_process_launch(tmp_path, monkeypatch):
    # a launch of two processes that formed its group: the Trainer sees a world of two
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    kw = dict(block="decoder.0", swap_encoder="t5", swap_freeze="encoder-trainable")
    assert RelearnArguments(output_dir=str(tmp_path / "plain"), **kw).world_size == 2  # the launch itself is fine
    with pytest.raises(RelearnError, match="swap_warmup_steps is not supported under a 2-process launch"):
        RelearnArguments(output_dir=str(tmp_path / "warm"), swap_warmup_steps=3, **kw)
    assert not (tmp_path / "warm").exists()


# 9 ------------------------------------------------------------------------------ reset --allow-shared
def test_cli_reset_of_a_tied_head_needs_allow_shared_and_records_what_shares_it(tmp_path, capsys):
    argv = ["reset", "gpt2", "head", "--config-overrides", "n_layer=2,n_embd=32,n_head=2,n_positions=64"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "refused")]) == 2
    assert "transformer.wte.weight is the same tensor" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out"), "--allow-shared"]) == 0
    capsys.readouterr()
    surgery = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert surgery["block"] == "head" and surgery["shared_with"] == ["transformer.wte.weight"]
    assert any("tied tensors reset too" in note for note in surgery["notes"])


# 10 ----------------------------------------------------------------------------- defaults
def test_defaults_are_what_the_readme_states(tmp_path, monkeypatch):
    args = RelearnArguments(output_dir=str(tmp_path))
    assert args.block == "decoder.-1" and says("| `--block` | `decoder.-1` |")
    assert args.eval_steps == 10 and says("| `--eval_steps` | 10 |")
    assert ProbeArguments(output_dir=str(tmp_path)).blocks == "layers,parts"
    assert says("`--blocks` takes `layers`, `parts` or any names (default `layers,parts`)")
    parser = cli.build_parser()
    assert parser.parse_args(["study", "demo"]).parallel == "data"
    assert says("`--parallel data` (default)")
    # `hf-relearn demo` runs the shipped demo recipe into relearn-demo/
    studied = []
    monkeypatch.setattr(
        cli,
        "cmd_study",
        lambda a: studied.append((a.recipe, a.output_dir, a.parallel, a.workers, a.threads_per_worker)) or 0,
    )
    assert cli.main(["demo"]) == 0
    recipe = Path(cli.__file__).resolve().parent / "recipes" / "demo.yaml"
    # 2 workers of 1 thread each: the published numbers on any machine (they depend on a run's threads)
    assert studied == [(str(recipe), "relearn-demo", "data", 2, 1)]
    assert says("2 worker processes of 1 thread each")
    assert parser.parse_args(["study", "demo"]).workers == 1 and says("`--workers N`")
    assert says("`relearn-demo/report.md`") and says("delete `relearn-demo/` to redo")
