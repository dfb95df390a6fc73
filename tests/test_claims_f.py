"""README claims backed here: original checkpoints of another model refused (other tensor names, another
model_type); the distill teacher's outputs for evaluation rows computed once across a probe's resets and a relearn's
evaluations; under two processes one process writes results, checkpoints and cards."""

import json
import shutil
from pathlib import Path

import pytest
from documented import says
from test_claims_b import QUIET_GPT2
from test_distributed import launch
from test_relearn import base_run, relearn_run
from transformers import AutoConfig, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_relearn.trainer as trainer_module
from hf_relearn.config import ModelArguments
from hf_relearn.data import DataArguments, build_datasets
from hf_relearn.errors import RelearnError
from hf_relearn.metrics import Teacher
from hf_relearn.probe import ProbeArguments, probe
from hf_relearn.storage import RESULT_FILE
from hf_relearn.tokenization import get_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 3-layer GPT-2 without dropout trained 3 steps (8 evaluation rows)."""
    out = tmp_path_factory.mktemp("claims-f-base")
    base_run(out, "gpt2", QUIET_GPT2, steps=3, generated_chars=20_000, max_eval_samples=8)
    return out


# 1 ------------------------------------------------------------------------------ checkpoints of another model
def _checkpoints(folder: Path, base: Path, other) -> str:
    """``checkpoint-1``: the base's own weights; ``checkpoint-2``: ``other`` saved. Returns their glob."""
    shutil.copytree(base, folder / "checkpoint-1", ignore=shutil.ignore_patterns("checkpoint-*"))
    other.save_pretrained(folder / "checkpoint-2")
    return str(folder / "checkpoint-*")


def test_original_checkpoints_of_another_model_are_refused_before_anything_is_written(base, tmp_path):
    assert says("a revision whose weights are not this model's (other tensor names")
    config = AutoConfig.from_pretrained(base)
    # the same model_type (gpt2), one layer more: every tensor of the base is there with its shape, plus
    # transformer.h.3.*, names the base has not
    deeper = GPT2LMHeadModel(AutoConfig.from_pretrained(base, n_layer=config.n_layer + 1))
    # another architecture altogether (its model_type is checked before its weights are loaded)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    cases = [
        (deeper, r"is not this model at another step: its weights differ in names or shapes \(first: transformer\.h\.3\."),
        (llama, r"checkpoint-2 is a 'llama' model, the run's is 'gpt2'"),
    ]  # fmt: skip
    for i, (other, message) in enumerate(cases):
        glob = _checkpoints(tmp_path / f"published-{i}", base, other)
        with pytest.raises(RelearnError, match=message):
            relearn_run(tmp_path / f"rl-{i}", base, "decoder.1", original_checkpoints=glob, max_steps=2,
                        eval_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)  # fmt: skip
        assert not (tmp_path / f"rl-{i}").exists()  # refused before any surgery or training: nothing written
    # the base's own weights pass the same check: only the other model was refused
    glob = _checkpoints(tmp_path / "published-own", base, GPT2LMHeadModel.from_pretrained(base))
    result = relearn_run(tmp_path / "rl-own", base, "decoder.1", original_checkpoints=glob, max_steps=2,
                         eval_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)  # fmt: skip
    assert [s for s, _ in result.original_curve] == [1, 2]
    assert result.original_curve[0][1] == pytest.approx(result.baseline_eval_loss, rel=1e-5)  # the base itself


# 2 ------------------------------------------------------------------------------ one teacher, computed once
class _CountingTeachers(list):
    """Every ``Teacher`` made while installed, its model's forward calls counted in ``calls``."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls = 0
        made = self

        class Counted(Teacher):
            def __init__(self, model, *a, **kw):
                super().__init__(model, *a, **kw)
                made.append(self)
                own = self.model.forward

                def counted(*args, **kwargs):
                    made.calls += 1
                    return own(*args, **kwargs)

                self.model.forward = counted

        monkeypatch.setattr(trainer_module, "Teacher", Counted)


def test_probe_distill_computes_the_teachers_outputs_once_across_its_resets(tmp_path, monkeypatch):
    assert says("The runs share the frozen-prefix cache (deepest block first, so every layer boundary is "
                        "computed once) and, for `distill`, the teacher's outputs.")  # fmt: skip
    teachers = _CountingTeachers(monkeypatch)
    data = DataArguments(block_size=32, generated_chars=20_000, max_eval_samples=12, tokenizer="bytes")
    args = ProbeArguments(output_dir=str(tmp_path), blocks="layers", seeds="0,1", objective="distill",
                          per_device_eval_batch_size=4)  # fmt: skip
    rows = probe(ModelArguments(model="gpt2", config_overrides=QUIET_GPT2), data, args, progress=False)
    assert len(rows) == 3 * 2  # 6 resets, each measured against the intact model's outputs
    assert all(r["baseline_loss"] == 0 and r["loss"] > 0 for r in rows)
    _, evals, _ = build_datasets(data, get_tokenizer("bytes"), "distill")
    assert len(evals) == 12  # 3 evaluation batches of 4
    # one teacher for the whole probe, run once per evaluation batch: 3 calls, not 6 resets x 3 = 18
    assert len(teachers) == 1 and teachers.calls == 3


# decoder.1 runs with the frozen-prefix cache; decoder.0 has nothing below it to cache: the teacher keeps its
# outputs all the same
@pytest.mark.parametrize("block, cached", [("decoder.1", True), ("decoder.0", False)])
def test_relearn_distill_computes_the_teachers_evaluation_outputs_once(base, tmp_path, monkeypatch, block, cached):
    assert says("With `--objective distill` the teacher's outputs for evaluation rows are computed once too")
    teachers = _CountingTeachers(monkeypatch)
    result = relearn_run(tmp_path / "rl", base, block, objective="distill", max_steps=6, eval_steps=2,
                         stop_at_recovery=False, per_device_train_batch_size=4, per_device_eval_batch_size=4)  # fmt: skip
    assert result.prefix_cache["enabled"] is cached
    # the after-reset evaluation and one every 2 steps: 4 evaluations of the base's 8 rows (2 batches each)
    assert [s for s, _ in result.curve] == [0, 2, 4, 6] and result.steps_trained == 6
    # the teacher runs on each training batch (new rows every step) and once per evaluation batch: 6 + 2, not 6 + 8
    assert len(teachers) == 1 and teachers.calls == 6 + 2


# 3 ------------------------------------------------------------------------------ two processes, one writer
WRITER = r'''
"""hf_relearn ARGV under accelerate, recording which files under OUTPUT_DIR this process writes (Python opens for
writing and renames, torch.save, safetensors) in WRITES_LOG/writes-RANK.json; the Hub stubbed (a push writes its
card locally, uploads nothing)."""
import json, os, sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

log, out = Path(sys.argv[1]), os.path.realpath(sys.argv[sys.argv.index("--output_dir") + 1])
writes = []


def record(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith(out + os.sep):
            writes.append(os.path.relpath(path, out))


def hook(event, args):
    if event == "open" and (args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                            or args[1] is not None and set(args[1]) & set("wax+")):
        record(args[0])
    elif event == "os.rename":  # also os.replace
        record(args[1])


import safetensors.torch, torch, transformers.modeling_utils, transformers.trainer

for module, name in [(torch, "save"), (safetensors.torch, "save_file"), (transformers.modeling_utils, "safe_save_file")]:
    own = getattr(module, name)
    setattr(module, name, lambda obj, f, *a, _own=own, **kw: record(f) or _own(obj, f, *a, **kw))


class Hub:
    def create_repo(self, repo_id, **kw):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kw):
        done = Future()
        done.set_result(None)
        return done


transformers.trainer.hf_api = Hub
sys.addaudithook(hook)
from hf_relearn.cli import main

try:
    code = main(sys.argv[2:])
finally:
    (log / f"writes-{os.environ['RANK']}.json").write_text(json.dumps(writes))
sys.exit(code)
'''


def test_two_processes_one_writes_results_checkpoints_and_cards(base, tmp_path):
    assert says("One process writes results, checkpoints and cards.")
    script, log, out = tmp_path / "writer.py", tmp_path / "log", tmp_path / "two"
    script.write_text(WRITER)
    log.mkdir()
    argv = ["relearn", "--model", str(base), "--original_run", str(base), "--block", "decoder.1", "--output_dir",
            str(out), "--max_steps", "10", "--eval_steps", "5", "--save_strategy", "steps", "--save_steps", "5",
            "--save_final_model", "true", "--stop_at_recovery", "false", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true", "--push_to_hub", "true", "--hub_model_id", "me/two"]  # fmt: skip
    proc = launch([str(log), *argv], script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["world_size"] == 2
    # the folder: one result, one card and its plot, the final model, exactly the two checkpoints, nothing half-written
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-10", "checkpoint-5"]
    assert sorted(p.name for p in out.glob("relearn_result*")) == [RESULT_FILE]
    assert sorted(p.name for p in out.glob("README*")) == ["README.md"] and (out / "relearn_curve.png").exists()
    assert "steps_to_recover" in (out / "README.md").read_text()  # our card, with the recovery metrics
    assert (out / "model.safetensors").exists() and not list(out.rglob("*.tmp"))
    for checkpoint in ("checkpoint-5", "checkpoint-10"):  # each process's RNG state, for an exact resume: by design
        assert sorted(p.name for p in (out / checkpoint).glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    # who wrote: process 0 everything; process 1 only its own RNG state in each checkpoint
    main, other = (json.loads((log / f"writes-{rank}.json").read_text()) for rank in (0, 1))
    assert sorted(set(other)) == ["checkpoint-10/rng_state_1.pth", "checkpoint-5/rng_state_1.pth"], other
    wrote = set(main)
    assert {RESULT_FILE, "README.md", "relearn_curve.png", "model.safetensors", "checkpoint-5/model.safetensors",
            "checkpoint-10/trainer_state.json", "checkpoint-10/optimizer.pt"} <= wrote, sorted(wrote)  # fmt: skip
    assert main.count(RESULT_FILE) == 1  # the result written once, at the end
