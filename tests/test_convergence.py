"""Bases trained until converged: the plateau rule, the kept best checkpoint as the budget, the warnings."""

from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from hf_relearn import RelearnError
from hf_relearn.relearn.arguments import PretrainArguments
from hf_relearn.relearn.callbacks import ConvergenceCallback
from hf_relearn.relearn.result import base_run_warnings, read_original_run
from hf_relearn.stats.caveats import OVERFIT, UNDER_TRAINED


def _feed(callback: ConvergenceCallback, losses: list[float]) -> int | None:
    """Evaluate ``losses`` in turn; the 1-based evaluation at which the callback stopped training, or None."""
    args = SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False)
    state, control = TrainerState(), TrainerControl()
    for i, loss in enumerate(losses, start=1):
        state.global_step = 10 * i  # an evaluation every 10 steps
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if control.should_training_stop:
            return i
    return None


def test_converged_when_the_best_improved_less_than_the_threshold_over_the_window():
    # best so far: 3, 2, 1.5, 1.4, 1.399, 1.398, 1.398 -> over the last 3 evaluations 1.4 -> 1.398 (0.14% < 0.5%)
    losses = [3.0, 2.0, 1.5, 1.4, 1.399, 1.398, 1.398, 1.398]
    assert _feed(ConvergenceCallback(patience=3, threshold=0.005), losses) == 7
    # a slow but steady fall of 1% per evaluation never stalls
    assert _feed(ConvergenceCallback(patience=3, threshold=0.005), [2.0 * 0.99**i for i in range(30)]) is None
    # a rise after the best is no improvement: stops once the window holds no new best
    assert _feed(ConvergenceCallback(patience=3, threshold=0.005), [2.0, 1.5, 1.6, 1.7, 1.8]) == 5


def test_a_slow_late_fall_is_not_a_plateau():
    # 5% better per evaluation, then 0.1%: 3 evaluations see 0.3% (< 0.5%), but the last half of the run far more
    fast = [2.0 * 0.95**i for i in range(11)]
    slow = fast + [fast[-1] * 0.999**j for j in range(1, 60)]
    assert _feed(ConvergenceCallback(patience=3, threshold=0.005, window=0.0), slow) == 14
    assert _feed(ConvergenceCallback(patience=3, threshold=0.005, window=0.5), slow) is None


def test_convergence_state_survives_a_resume():
    # the Trainer rebuilds a callback from its checkpoint as type(cb)(**state["args"]) (transformers 5.24)
    first = ConvergenceCallback(patience=3, threshold=0.005)
    _feed(first, [3.0, 2.0, 1.5, 1.4])
    saved = first.state()
    resumed = type(first)(**saved["args"])
    for key, value in saved["attributes"].items():
        setattr(resumed, key, value)
    assert resumed.best_history == [[10, 3.0], [20, 2.0], [30, 1.5], [40, 1.4]] and resumed.window == first.window
    # the window spans the resume: the same stop as an uninterrupted run (steps go on from 50)
    args = SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False)
    state, control = TrainerState(), TrainerControl()
    for step, loss in ((50, 1.399), (60, 1.398), (70, 1.398)):
        state.global_step = step
        resumed.on_evaluate(args, state, control, metrics={"eval_loss": loss})
    assert control.should_training_stop


def test_base_run_warnings_by_code():
    falling = [(100 * i, 3.0 - 0.1 * i) for i in range(1, 11)]  # still falling at the end
    assert [w.code for w in base_run_warnings(falling, 1000)] == [UNDER_TRAINED]
    assert base_run_warnings(falling, 1000, converged=True) == []  # the plateau rule said it stopped improving
    past_best = [(100, 2.0), (200, 1.5), (300, 1.6), (400, 1.8), (500, 1.9)]
    assert [w.code for w in base_run_warnings(past_best, 500)] == [OVERFIT]
    assert base_run_warnings(past_best, 500, kept_best=True) == []  # the kept model is the best one


# a tiny model on generated text: halve the rate after two flat evaluations, so the test converges in seconds
FAST_PLATEAU = {"factor": 0.5, "patience": 1, "threshold": 0.002, "threshold_mode": "rel"}


def _tiny_converging_run(out):
    """(model, data, pretrain settings) of the tiny base these tests train until converged."""
    from hf_relearn.data.datasets import DataArguments
    from hf_relearn.relearn.arguments import ModelArguments

    model = ModelArguments(model="gpt2", config_overrides="n_layer=2,n_embd=32,n_head=2,n_positions=32")
    data = DataArguments(generated_chars=30_000, block_size=32, max_eval_samples=32)
    settings = dict(
        output_dir=str(out), until_converged=True, convergence_patience=3, convergence_threshold=0.02,
        max_steps=3000, eval_steps=20, learning_rate=1e-2, per_device_train_batch_size=16, report_to=[],
        disable_tqdm=True, logging_steps=1000, lr_scheduler_kwargs=FAST_PLATEAU,
    )  # fmt: skip
    return model, data, settings


@pytest.fixture(scope="module")
def converged_base(tmp_path_factory):
    from hf_relearn.relearn.arguments import PretrainArguments
    from hf_relearn.relearn.runner import pretrain

    out = tmp_path_factory.mktemp("converged")
    model, data, settings = _tiny_converging_run(out)
    return out, pretrain(model, data, PretrainArguments(**settings), quiet=True)


def test_pretrain_until_converged_keeps_the_best_checkpoint_as_the_budget(converged_base):
    out, info = converged_base
    assert info["stopped"] == "converged" and info["steps"] < 3000
    # the checkpoint is chosen on the selection split; its loss is reported on the evaluation split
    steps, losses = zip(*info["selection_curve"], strict=True)
    best = min(losses)
    assert info["budget_steps"] == steps[losses.index(best)] <= info["steps"]
    assert info["final_eval_loss"] == dict(info["curve"])[info["budget_steps"]]
    assert [s for s, _ in info["curve"]] == list(steps) and info["curve"] != info["selection_curve"]
    assert info["selected_on"] == "selection split" and info["selection_examples"] == info["eval_examples"] == 32
    assert info["warnings"] == [] and info["warning_codes"] == []
    assert not list(out.glob("checkpoint-*"))  # they only served to keep the best model
    original = read_original_run(out)  # what a relearn against this base reads
    assert original["steps"] == info["budget_steps"] and original["tokens"] == info["budget_tokens"]
    assert 0 < info["budget_tokens"] <= info["tokens"]


def test_a_relearn_baseline_is_the_kept_best_model(converged_base, tmp_path):
    from hf_relearn.data.datasets import DataArguments
    from hf_relearn.relearn.arguments import ModelArguments, RelearnArguments
    from hf_relearn.relearn.runner import relearn

    out, info = converged_base
    args = RelearnArguments(
        output_dir=str(tmp_path / "r"), original_run=str(out), block="decoder.1", max_steps=1, eval_steps=1,
        report_to=[], disable_tqdm=True, save_final_model=False,
    )  # fmt: skip
    result = relearn(ModelArguments(model=str(out)), DataArguments(), args, quiet=True)
    # data settings inherited from the base run: the same evaluation rows, so the same loss as the kept model
    assert result.baseline_eval_loss == pytest.approx(info["final_eval_loss"], rel=1e-6)
    assert result.base_selected_on == "selection split" and 0 < result.eval_loss_se < 0.1 * result.baseline_eval_loss
    assert result.original_steps == info["budget_steps"]


def test_a_capped_run_is_flagged_under_trained(tmp_path):
    from hf_relearn.data.datasets import DataArguments
    from hf_relearn.relearn.arguments import ModelArguments, PretrainArguments
    from hf_relearn.relearn.runner import pretrain

    model = ModelArguments(model="gpt2", config_overrides="n_layer=2,n_embd=32,n_head=2,n_positions=32")
    data = DataArguments(generated_chars=30_000, block_size=32, max_eval_samples=32)
    args = PretrainArguments(
        output_dir=str(tmp_path), until_converged=True, max_steps=60, eval_steps=10, learning_rate=1e-2,
        per_device_train_batch_size=16, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    info = pretrain(model, data, args, quiet=True)
    assert info["stopped"] == "max_steps"
    assert info["warning_codes"] == [UNDER_TRAINED]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(convergence_patience=1), "convergence_patience"),
        (dict(convergence_threshold=0.7), "convergence_threshold"),
        (dict(convergence_window=1.0), "convergence_window"),
        (dict(eval_strategy="no"), "eval_strategy steps"),
    ],
)
def test_bad_convergence_settings_are_refused(tmp_path, kw, match):
    from hf_relearn.relearn.arguments import PretrainArguments

    with pytest.raises(RelearnError, match=match):
        PretrainArguments(output_dir=str(tmp_path), until_converged=True, **kw)


class _Killed(Exception):
    pass


def test_a_killed_base_resumes_to_the_same_converged_model(converged_base, tmp_path):
    """Killed mid-run (after a checkpoint), resumed from it: the same curve, budget and stop reason as the run
    that was never interrupted (the convergence window is part of the checkpoint)."""
    from transformers import TrainerCallback

    from hf_relearn.relearn.arguments import PretrainArguments
    from hf_relearn.relearn.runner import pretrain

    _, whole = converged_base
    kill_at = whole["curve"][len(whole["curve"]) // 2][0]

    class KillAt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                raise _Killed

    model, data, settings = _tiny_converging_run(tmp_path)
    import hf_relearn.relearn.runner as runner

    original = runner.SelectionTrainer

    class KilledTrainer(original):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), KillAt()], **kwargs)

    runner.SelectionTrainer = KilledTrainer
    try:
        with pytest.raises(_Killed):
            pretrain(model, data, PretrainArguments(**settings), quiet=True)
    finally:
        runner.SelectionTrainer = original
    last = tmp_path / f"checkpoint-{kill_at}"
    assert last.is_dir()
    resumed = pretrain(model, data, PretrainArguments(**settings, resume_from_checkpoint=str(last)), quiet=True)
    assert resumed["stopped"] == whole["stopped"] == "converged"
    assert resumed["budget_steps"] == whole["budget_steps"] and resumed["steps"] == whole["steps"]
    assert [s for s, _ in resumed["curve"]] == [s for s, _ in whole["curve"]]
    assert resumed["final_eval_loss"] == pytest.approx(whole["final_eval_loss"], rel=1e-4)


# ------------------------------------------------------------------------------------------- the documented defaults
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


# ----------------------------------------------------------- the under-trained rule: a 1% fall over the last quarter
TOTAL = 1000  # the base run's steps in the under-trained curves below


@pytest.mark.parametrize(
    "final, fires",
    [(1.979, True), (1.981, False)],  # 2.0 -> 1.979 fell 1.05% over the last quarter; 2.0 -> 1.981 fell 0.95%
)
def test_the_under_trained_warning_fires_above_a_1_percent_fall_over_the_last_quarter(final, fires):
    curve = [(250, 2.6), (500, 2.2), (750, 2.0), (1000, final)]
    codes = [w.code for w in base_run_warnings(curve, TOTAL)]
    assert codes == ([UNDER_TRAINED] if fires else [])


def test_the_under_trained_window_is_the_last_quarter():
    # a 20% fall in the third quarter and 0.25% in the last: trained enough
    assert base_run_warnings([(250, 3.0), (500, 2.5), (750, 2.0), (1000, 1.995)], TOTAL) == []
    # 0.5% then 0.6% within the last quarter: each step under 1%, the quarter over it
    (warning,) = base_run_warnings([(500, 2.2), (750, 2.0), (875, 1.99), (1000, 1.978)], TOTAL)
    assert warning.code == UNDER_TRAINED and "from 2.0000 (step 750) to 1.9780 in the last quarter" in warning
