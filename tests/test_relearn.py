"""RelearnTrainer end to end: pretrain a tiny base, reset a layer, re-learn, check the result contract."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_relearn.cli.main import main
from hf_relearn.data.datasets import DataArguments
from hf_relearn.errors import RelearnError
from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments, RelearnArguments
from hf_relearn.relearn.result import first_reach, smoothed
from hf_relearn.relearn.runner import pretrain, relearn
from hf_relearn.relearn.trainer import RelearnTrainer

CONTRACT = {
    "model", "block", "init", "seed", "objective", "tolerance", "baseline_eval_loss", "after_reset_eval_loss",
    "final_eval_loss", "recovered", "steps_to_recover", "examples_to_recover", "tokens_to_recover",
    "original_steps", "original_tokens", "fraction_of_original", "frozen_unchanged", "trainable_parameters",
    "curve", "versions",
}  # fmt: skip
GPT2 = "n_layer=4,n_embd=64,n_head=2,n_positions=128"
BERT = "num_hidden_layers=4,hidden_size=64,num_attention_heads=2,intermediate_size=256,max_position_embeddings=128"
T5 = "num_layers=3,num_decoder_layers=3,d_model=64,d_ff=256,num_heads=2,d_kv=32"
# no dropout: the frozen-prefix cache serves training rows too (the quiet_gpt2_base fixture trains it 3 steps)
QUIET_GPT2 = "n_layer=3,n_embd=32,n_head=2,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"
FEW = dict(max_steps=2, eval_steps=1, stop_at_recovery=False, per_device_train_batch_size=4)


def base_run(
    out: Path, model: str, overrides: str, objective: str = "clm", steps: int = 300, lr: float = 3e-3, **data
):
    data_args = DataArguments(block_size=64, generated_chars=data.pop("generated_chars", 150_000), **data)
    args = PretrainArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=lr, eval_steps=50,
        objective=objective, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return pretrain(ModelArguments(model=model, config_overrides=overrides), data_args, args)


def relearn_run(out: Path, base: Path, block: str, callbacks=None, **kw):
    defaults = dict(
        max_steps=300, per_device_train_batch_size=16, learning_rate=3e-3, eval_steps=10, disable_tqdm=True, seed=0,
    )  # fmt: skip
    args = RelearnArguments(output_dir=str(out), block=block, original_run=str(base), **{**defaults, **kw})
    return relearn(ModelArguments(model=str(base)), DataArguments(), args, callbacks=callbacks)


def assert_recovered(result, out: Path, tokens_per_example: int = 64):
    data = json.loads((out / "relearn_result.json").read_text())
    assert CONTRACT <= set(data) and data == json.loads(json.dumps(result.to_dict()))
    assert result.after_reset_eval_loss > result.recovery_threshold > result.baseline_eval_loss  # the reset hurt
    assert result.recovered and result.steps_to_recover > 0
    # recovered where the curve smoothed over recovery_window evaluations is within the threshold
    assert dict(smoothed(result.curve, result.recovery_window))[result.steps_to_recover] <= result.recovery_threshold
    assert result.recovery_threshold == pytest.approx(result.baseline_eval_loss * (1 + result.tolerance))
    assert result.frozen_unchanged and result.frozen_changed == []
    assert result.examples_to_recover == result.steps_to_recover * 16
    assert result.tokens_to_recover == result.examples_to_recover * tokens_per_example
    assert result.fraction_of_original == pytest.approx(result.steps_to_recover / result.original_steps)
    assert 0 < result.trainable_parameters < result.total_parameters


def test_gpt2_on_generated_text(gpt2_base, tmp_path):
    info = json.loads((gpt2_base / "hf_relearn_run.json").read_text())
    # (on the evaluation split: every 2nd held-out block; 0.701 of the first evaluation measured there)
    assert info["steps"] == 300 and info["final_eval_loss"] < 0.72 * info["curve"][0][1]
    result = relearn_run(tmp_path, gpt2_base, "decoder.1")
    assert_recovered(result, tmp_path)
    assert result.original_steps == 300 and result.original_tokens == info["tokens"]
    assert 0.99 * 300 * 16 * 64 < info["tokens"] <= 300 * 16 * 64  # an epoch's last batch may be short
    assert result.steps_trained == result.steps_to_recover + 2 * 10  # stopped once the smoothed curve showed it
    # the base's own curve first reached the recovery threshold at this step (its evaluations every 50 steps)
    expected = next(step for step, loss in info["curve"] if loss <= result.recovery_threshold)
    assert result.original_steps_to_same_loss == expected


def test_bert_mlm_on_generated_text(tmp_path):
    # a tiny post-LN BERT learns slowly and its middle layers matter little: resetting encoder.2 raises the loss by
    # about 0.5% (measured), so the tolerance must be tighter than the default 1% for the test to mean anything
    base_run(tmp_path / "base", "bert", BERT, objective="mlm", steps=600, lr=1e-3)
    result = relearn_run(
        tmp_path / "rl",
        tmp_path / "base",
        "encoder.2",
        objective="mlm",
        max_steps=400,
        learning_rate=1e-3,
        tolerance=0.002,
    )
    assert_recovered(result, tmp_path / "rl")


def test_t5_seq2seq(tmp_path):
    base_run(tmp_path / "base", "t5", T5, objective="seq2seq", steps=250)
    result = relearn_run(tmp_path / "rl", tmp_path / "base", "decoder.1", objective="seq2seq", max_steps=400)
    assert_recovered(result, tmp_path / "rl", tokens_per_example=32)  # tokens = encoder inputs (half a block)
    assert result.surgery["num_tensors"] == 13  # self-attention, cross-attention, FFN and 3 norms


@pytest.mark.parametrize(
    "model, overrides, objective, block, steps, lr, tolerance",
    [("gpt2", GPT2, "clm", "decoder.2", 300, 3e-3, 0.002), ("bert", BERT, "mlm", "encoder.2", 600, 1e-3, 0.001)],
)
def test_real_text_tinyshakespeare(shared_data, tmp_path, model, overrides, objective, block, steps, lr, tolerance):
    # measured jumps from resetting these middle layers: GPT-2 +0.5%, BERT +0.3%; the tolerance sits below them
    data = dict(train_file=str(shared_data / "tinyshakespeare.txt"), max_train_samples=3000, max_eval_samples=64)
    base_run(tmp_path / "base", model, overrides, objective=objective, steps=steps, lr=lr, **data)
    result = relearn_run(
        tmp_path / "rl",
        tmp_path / "base",
        block,
        objective=objective,
        max_steps=600,
        learning_rate=lr,
        tolerance=tolerance,
    )
    assert_recovered(result, tmp_path / "rl")


def test_distill_on_real_minilm(minilm_dir, tmp_path):
    data_args = DataArguments(block_size=32, generated_chars=60_000, max_train_samples=400, max_eval_samples=16)
    args = RelearnArguments(
        output_dir=str(tmp_path), block="encoder.3", objective="distill", tolerance=0.3, max_steps=120,
        per_device_train_batch_size=8, learning_rate=1e-3, eval_steps=10, disable_tqdm=True,
    )  # fmt: skip
    result = relearn(ModelArguments(model=str(minilm_dir)), data_args, args)
    assert result.baseline_eval_loss == 0 and result.after_reset_eval_loss > 0
    assert result.recovery_threshold == pytest.approx(0.3 * result.after_reset_eval_loss)
    assert result.recovered and result.steps_to_recover > 0 and result.frozen_unchanged
    assert result.trainable_parameters == 1_774_464  # one MiniLM layer (384 wide)


def test_first_reach():
    curve = [(0, 3.0), (10, 2.0), (20, 1.0), (30, 2.0), (40, 1.0), (50, 1.0)]
    assert first_reach(curve, 1.5, False) == 20
    assert first_reach(curve, 1.5, False, patience=2) == 40
    assert first_reach(curve, 1.5, False, patience=3) is None
    assert first_reach([(0, 0.5), (5, 0.9)], 0.8, True) == 5
    assert first_reach([(0, float("nan")), (5, 1.0)], 1.5, False) == 5


def test_stop_rule_is_exact_and_patience_holds(gpt2_base, tmp_path):
    kw = dict(learning_rate=1e-3, eval_steps=5, tolerance=0.005, recovery_window=1)  # the raw rule first
    stopped = relearn_run(tmp_path / "a", gpt2_base, "decoder.2", **kw)
    full = relearn_run(
        tmp_path / "b", gpt2_base, "decoder.2", stop_at_recovery=False, max_steps=stopped.steps_trained + 40, **kw
    )
    assert stopped.recovered and stopped.steps_to_recover == stopped.steps_trained
    assert full.curve[: len(stopped.curve)] == stopped.curve  # same run up to the stop
    assert full.steps_to_recover == stopped.steps_to_recover and full.steps_trained > stopped.steps_trained
    # recovery is the FIRST qualifying evaluation: none before it qualifies
    assert all(v > full.recovery_threshold for s, v in full.curve if s < full.steps_to_recover)
    patient = relearn_run(tmp_path / "c", gpt2_base, "decoder.2", patience=2, **kw)
    # patience 2: the first qualifying evaluation whose next one qualifies too, read off the full run's curve
    within = [(s, v <= full.recovery_threshold) for s, v in full.curve]
    expected = next(s for (s, ok), (_, next_ok) in zip(within, within[1:], strict=False) if ok and next_ok)
    assert patient.steps_to_recover == expected >= full.steps_to_recover
    assert patient.steps_trained == expected + 5  # stopped at the second qualifying evaluation
    # the default rule: the mean of 5 evaluations around a point, read off a longer run's curve
    kw["recovery_window"] = 5
    smooth = relearn_run(tmp_path / "d", gpt2_base, "decoder.2", **kw)
    longer = relearn_run(tmp_path / "e", gpt2_base, "decoder.2", stop_at_recovery=False,
                         max_steps=smooth.steps_trained + 20, **kw)  # fmt: skip
    expected = first_reach(longer.curve, longer.recovery_threshold, False, 1, 5)
    assert smooth.steps_to_recover == longer.steps_to_recover == expected >= full.steps_to_recover
    assert smooth.steps_trained == expected + 2 * 5  # two evaluations past the point: its window's end
    assert longer.curve[: len(smooth.curve)] == smooth.curve


class Interrupt(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_gives_the_same_recovery(gpt2_base, tmp_path):
    kw = dict(learning_rate=1e-3, eval_steps=5, tolerance=0.005)
    whole = relearn_run(tmp_path / "whole", gpt2_base, "decoder.2", **kw)
    assert whole.steps_to_recover > 10
    with pytest.raises(KeyboardInterrupt):
        relearn_run(
            tmp_path / "cut",
            gpt2_base,
            "decoder.2",
            save_strategy="steps",
            save_steps=10,
            callbacks=[Interrupt(13)],
            **kw,
        )
    assert not (tmp_path / "cut" / "relearn_result.json").exists()
    resumed = relearn_run(
        tmp_path / "cut", gpt2_base, "decoder.2", save_strategy="steps", save_steps=10,
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-10"), **kw,
    )  # fmt: skip
    for key in ("steps_to_recover", "examples_to_recover", "tokens_to_recover", "curve", "steps_trained"):
        assert getattr(resumed, key) == getattr(whole, key), key
    assert resumed.frozen_unchanged


def test_arms_all_and_lora_rest(gpt2_base, tmp_path):
    everything = relearn_run(tmp_path / "all", gpt2_base, "decoder.1", trainable="all", learning_rate=1e-3)
    assert everything.trainable_parameters == everything.total_parameters and everything.frozen_unchanged
    lora = relearn_run(
        tmp_path / "lora", gpt2_base, "decoder.1", trainable="lora-rest", max_steps=30, stop_at_recovery=False
    )
    assert lora.frozen_unchanged and lora.steps_trained == 30
    # LoRA r=8 on c_attn, attn.c_proj, c_fc, mlp.c_proj of the three other layers: r * (fan_in + fan_out) each
    assert lora.trainable_parameters == sum(8 * (i + o) for i, o in [(64, 192), (64, 64), (64, 256), (256, 64)]) * 3
    both = relearn_run(
        tmp_path / "both", gpt2_base, "decoder.1", trainable="block+lora-rest", max_steps=20, stop_at_recovery=False
    )
    assert both.trainable_parameters == lora.trainable_parameters + 49_984 and both.frozen_unchanged


class NanAfter(TrainerCallback):
    """Poisons the block's output from a given step on, as a diverging run would."""

    def __init__(self, at: int):
        self.at, self.handle = at, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.at and self.handle is None:
            self.handle = model.transformer.h[1].register_forward_hook(lambda m, i, o: o * float("nan"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(gpt2_base, tmp_path):
    with pytest.raises(RelearnError, match=r"loss became nan at step 13.*last good checkpoint is .*checkpoint-10"):
        relearn_run(
            tmp_path,
            gpt2_base,
            "decoder.1",
            save_strategy="steps",
            save_steps=5,
            learning_rate=1e-4,
            callbacks=[NanAfter(12)],
        )
    data = json.loads((tmp_path / "relearn_result.json").read_text())
    assert data["stopped"] == "nan" and not data["recovered"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    # the last good checkpoint is whole: its step, every tensor of the model (all finite), the RNG states to resume
    last = tmp_path / "checkpoint-10"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 10
    weights = load_file(last / "model.safetensors")
    assert set(weights) == set(load_file(gpt2_base / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert {"python", "numpy", "cpu"} <= set(torch.load(last / "rng_state.pth", weights_only=False))


def test_bad_input_gets_one_clear_error(gpt2_base, tmp_path, capsys):
    base = ["relearn", "--model", str(gpt2_base), "--block", "decoder.1", "--max_steps", "5", "--disable_tqdm", "true"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    no_state = tmp_path / "no_state"
    no_state.mkdir()
    cases = [
        (["--train_file", str(empty)], "empty"),
        (["--train_file", str(short)], "block_size"),
        (["--tolerance", "0"], "tolerance must be > 0"),
        (["--tolerance", "-0.1"], "tolerance must be > 0"),
        (["--recovery_metric", "accuracy"], "'eval_accuracy' is never computed; evaluation gives: eval_loss"),
        (["--original_run", str(no_state)], "no trainer_state.json"),
        (["--block", "decoder.7"], "layer 7 out of range"),
        (["--objective", "ranking"], "objective 'ranking' unknown"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*base, *extra, "--output_dir", str(out)]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, (extra, err)
        assert not (out / "relearn_result.json").exists()


def test_cli_pretrain_and_relearn_print_one_line_summaries(tmp_path, capsys):
    common = [
        "--block_size",
        "64",
        "--generated_chars",
        "60000",
        "--per_device_train_batch_size",
        "16",
        "--disable_tqdm",
        "true",
    ]
    assert (
        main(
            [
                "pretrain",
                "--model",
                "gpt2",
                "--config_overrides",
                GPT2,
                "--max_steps",
                "120",
                "--learning_rate",
                "3e-3",
                "--output_dir",
                str(tmp_path / "base"),
                *common,
            ]
        )
        == 0
    )
    assert "pretrained gpt2: 120 steps, 12" in capsys.readouterr().out
    assert (
        main(
            [
                "relearn",
                "--model",
                str(tmp_path / "base"),
                "--original_run",
                str(tmp_path / "base"),
                "--block",
                "decoder.-1",
                "--max_steps",
                "200",
                "--learning_rate",
                "3e-3",
                "--output_dir",
                str(tmp_path / "rl"),
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "decoder.3: eval_loss" in out and "after reset -> recovered at" in out and "% of the original 120" in out


LOCAL_METRIC = """
import datasets
import evaluate


class ExactShare(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of exactly predicted tokens", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"exact_share": sum(p == r for p, r in zip(predictions, references)) / len(references)}
"""


def test_recovery_on_a_task_metric(gpt2_base, tmp_path):
    module = tmp_path / "exact_share"
    module.mkdir()
    (module / "exact_share.py").write_text(LOCAL_METRIC)
    result = relearn_run(
        tmp_path / "rl", gpt2_base, "decoder.1", metrics=["accuracy", str(module)], recovery_metric="accuracy"
    )
    assert result.recovery_metric == "eval_accuracy"
    assert 0.3 < result.baseline_metric < 1 and result.after_reset_metric < result.recovery_threshold
    assert result.recovery_threshold == pytest.approx(result.baseline_metric * (1 - 0.01))  # higher is better
    smooth = dict(smoothed(result.curve, result.recovery_window))
    assert result.recovered and smooth[result.steps_to_recover] >= result.recovery_threshold
    # the local evaluate module computes the same number as the built-in accuracy
    other = relearn_run(
        tmp_path / "x", gpt2_base, "decoder.1", metrics=[str(module)], recovery_metric="exact_share", max_steps=1
    )
    assert other.recovery_metric == "eval_exact_share"
    assert other.baseline_metric == pytest.approx(result.baseline_metric)


def test_unloadable_metric_is_one_clear_error(gpt2_base, tmp_path):
    with pytest.raises(RelearnError, match="could not be loaded with evaluate.load"):
        relearn_run(tmp_path, gpt2_base, "decoder.1", metrics=[str(tmp_path / "no_such_metric")], max_steps=1)


def test_the_relearn_console_is_one_bar_and_one_line_per_evaluation(gpt2_base, tmp_path, capsys):
    argv = ["relearn", "--model", str(gpt2_base), "--original_run", str(gpt2_base), "--block", "decoder.2",
            "--max_steps", "10", "--eval_steps", "5", "--stop_at_recovery", "false", "--disable_tqdm", "true"]  # fmt: skip
    assert main([*argv, "--output_dir", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "plain" / "relearn_result.json").read_text())
    # before training: what the run will cost; then one line per evaluation with its distance to the threshold
    assert out.startswith(
        "relearn decoder.2: at most 10 steps x 8 examples (80 rows, stops at recovery); 2 evaluations x 117 "
    )
    threshold = result["recovery_threshold"]
    for i, (step, value) in enumerate(result["curve"][1:]):
        gap = value - threshold
        where = "within the threshold" if gap <= 0 else f"{gap:.4f} above the threshold {threshold:.4f}"
        # the first evaluation also says what the rest will take at the pace so far
        end = "; at this pace the remaining 5 steps take about " if i == 0 else "\n"
        assert f"step {step}: eval_loss {value:.4f} ({where}){end}" in out
    assert "{'loss'" not in out and "'eval_loss'" not in out  # none of the Trainer's raw dictionaries
    assert "evaluation outweighs training: raise --eval_steps or lower --max_eval_samples" in out
    # --verbose: the Trainer's own log lines, as a plain Trainer prints them
    assert main([*argv, "--output_dir", str(tmp_path / "verbose"), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "'eval_loss'" in out and "step 5: eval_loss" not in out


def test_a_run_handed_its_baseline_trains_exactly_like_one_that_measured_it(gpt2_base, tmp_path):
    # gpt2_base has dropout: the training depends on the RNG, which measuring the baseline must not move
    measured = relearn_run(tmp_path / "a", gpt2_base, "decoder.2", max_steps=10, eval_steps=5)
    args = RelearnArguments(output_dir=str(tmp_path / "b"), block="decoder.2", original_run=str(gpt2_base),
                            max_steps=10, per_device_train_batch_size=16, learning_rate=3e-3, eval_steps=5,
                            disable_tqdm=True, seed=0)  # fmt: skip
    handed = relearn(ModelArguments(model=str(gpt2_base)), DataArguments(), args,
                     baseline={"eval_loss": measured.baseline_eval_loss})  # fmt: skip
    assert handed.train_curve == measured.train_curve and handed.curve == measured.curve
    assert handed.baseline_eval_loss == measured.baseline_eval_loss


def test_the_noise_of_a_recovery_comes_from_paired_per_row_losses(gpt2_base, tmp_path):
    from hf_relearn.data.datasets import build_datasets
    from hf_relearn.data.tokenization import get_tokenizer
    from hf_relearn.model.modeling import load_model
    from hf_relearn.stats.caveats import NOISY_BASELINE

    result = relearn_run(tmp_path / "a", gpt2_base, "decoder.1", max_steps=40, eval_steps=5, save_final_model=True)
    # each evaluation row through the model alone, with the model's own loss: nothing shared with the run's code path
    data = json.loads((tmp_path / "a" / "hf_relearn_data.json").read_text())
    _, evaluation, _ = build_datasets(DataArguments(**data), get_tokenizer("auto", str(gpt2_base)), "clm")
    rows = torch.tensor(evaluation["input_ids"])

    def per_row(folder):
        model = load_model(str(folder)).eval()
        with torch.no_grad():
            return torch.stack([model(input_ids=r[None], labels=r[None]).loss for r in rows]).double()

    intact, final = per_row(gpt2_base), per_row(tmp_path / "a")
    assert result.baseline_eval_loss == pytest.approx(intact.mean().item(), rel=1e-5)
    assert result.final_eval_loss == pytest.approx(final.mean().item(), rel=1e-5)
    assert result.eval_loss_se == pytest.approx((intact.std() / len(rows) ** 0.5).item(), rel=1e-4)
    change = final - intact
    assert result.final_minus_baseline_se == pytest.approx((change.std() / len(rows) ** 0.5).item(), rel=1e-4)
    # rows differ far more from each other than the two models differ on a row: pairing removes that spread
    assert result.final_minus_baseline_se < 0.5 * result.eval_loss_se
    assert result.base_selected_on == "last step"  # a fixed-budget base: nothing was chosen
    paired = result.final_minus_baseline_se / result.baseline_eval_loss
    assert (NOISY_BASELINE in result.warning_codes) == (result.tolerance < 2 * paired)
    # a tolerance inside the paired noise is said so; one well outside it is not, even inside the unpaired one
    unpaired = result.eval_loss_se / result.baseline_eval_loss
    kw = dict(max_steps=40, eval_steps=5)
    tight = relearn_run(tmp_path / "b", gpt2_base, "decoder.1", tolerance=paired, **kw)
    loose = relearn_run(tmp_path / "c", gpt2_base, "decoder.1", tolerance=min(3 * paired, unpaired), **kw)
    assert NOISY_BASELINE in tight.warning_codes and NOISY_BASELINE not in loose.warning_codes
    assert tight.eval_loss_se == loose.eval_loss_se == result.eval_loss_se


def test_baseline_warnings_name_a_biased_or_noisy_baseline():
    from hf_relearn.relearn.result import baseline_warnings, selected_on
    from hf_relearn.stats.caveats import NOISY_BASELINE, SELECTED_ON_EVALUATION

    def info(until_converged, fraction):
        return {"kind": "pretrain", "until_converged": until_converged, "data_args": {"selection_fraction": fraction}}

    assert selected_on(info(True, 0.5)) == "selection split"
    assert selected_on(info(True, 0.0)) == "evaluation split"
    assert selected_on({"kind": "pretrain", "until_converged": True, "data_args": {}}) == "evaluation split"
    assert selected_on(info(False, 0.5)) == "last step"
    assert selected_on({}) is None
    codes = [w.code for w in baseline_warnings("evaluation split", 2.0, 0.001, 0.01)]
    assert codes == [SELECTED_ON_EVALUATION]
    assert [w.code for w in baseline_warnings("selection split", 2.0, 0.011, 0.01)] == [NOISY_BASELINE]
    assert baseline_warnings("selection split", 2.0, 0.0099, 0.01) == []  # 2 x 0.495% < 1%
    assert baseline_warnings("selection split", 2.0, None, 0.01) == baseline_warnings(None, 2.0, 0.5, None) == []
    # the paired standard error decides when a result has one; the baseline's own is only a fallback
    assert baseline_warnings("selection split", 2.0, 0.011, 0.01, paired_se=0.0099) == []
    paired = baseline_warnings("selection split", 2.0, 0.001, 0.01, paired_se=0.011)
    assert [w.code for w in paired] == [NOISY_BASELINE] and "final-minus-intact" in paired[0]


# --------------------------------------------------------------------------------- the relearn console and callbacks
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


def test_relearn_prints_the_runs_warnings_on_the_console(quiet_gpt2_base, tmp_path, capsys):
    argv = ["relearn", "--model", str(quiet_gpt2_base), "--original_run", str(quiet_gpt2_base), "--block", "decoder.2",
            "--max_steps", "2", "--eval_steps", "1", "--per_device_train_batch_size", "4", "--stop_at_recovery",
            "false", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "rl")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "rl" / "relearn_result.json").read_text())
    assert "unigram_level" in result["warning_codes"]  # a 3-step base is no better than a unigram model
    assert result["warnings"]
    for warning in result["warnings"]:
        assert f"warning: {warning}\n" in out


# ----------------------------------------------------------------------------------------------------- the optimizer
def test_the_optimizer_holds_exactly_the_trainable_parameters(tmp_path):
    from tiny import tiny

    from hf_relearn.data.datasets import DataArguments, build_datasets
    from hf_relearn.data.tokenization import byte_tokenizer

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
