"""RelearnTrainer: baseline eval -> reset a block -> eval -> re-learn with the rest frozen -> stop when recovered.

It stays a normal ``Trainer``: callbacks, checkpoints, ``resume_from_checkpoint``, ``report_to`` and
``push_to_hub`` behave as usual. What it adds:

* ``train()`` first measures the intact model (baseline), then applies the surgery and the freezing (before any
  wrapping or optimizer exists), measures again (after_reset), and trains;
* ``RecoveryCallback`` stops at the first evaluation where the metric is back within the tolerance, held for
  ``patience`` evaluations;
* at the end the frozen tensors are proven bit-identical and ``relearn_result.json`` is written (the results
  contract in ``docs/results-contract.md``).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from .blocks import BlockMap
from .cards import relearn_card
from .caveats import OVERFIT, RESET_BARELY_MATTERED, UNDER_TRAINED, UNIGRAM_LEVEL, Caveat, attach_codes, codes_of
from .errors import RelearnError
from .files import CURVE_FILE, OBJECTIVES, RESULT_FILE, RUN_FILE, TRAINABLE
from .io import versions, write_json_atomic
from .plots import plot_curve
from .prefix_cache import MODES as PREFIX_MODES
from .prefix_cache import ROW_COLUMN, PrefixCache, RowCollator, active_dropout, plan_prefix, with_row_index
from .surgery import SurgeryReport, fingerprint, freeze_except, reset


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class HfRelearnTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the defaults every hf-relearn run needs (base training and re-learning alike)."""

    eval_strategy: str = field(default="steps", metadata={"help": "evaluation schedule"})
    save_strategy: str = field(default="no", metadata={"help": "checkpoints: no | steps | epoch"})
    # transformers 5.24 multiplies the loss by the number of processes when this is on, also for models whose loss
    # ignores num_items_in_batch (BERT, T5, BART): their loss and gradients doubled in a 2-process run
    average_tokens_across_devices: bool = field(
        default=False, metadata={"help": "sum-then-divide the loss over all processes' tokens (off: see README)"}
    )
    # only the block has gradients; frozen parameters are not DDP-tracked, so no unused-parameter search is needed
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP unused-parameter search"})
    dataloader_pin_memory: bool = field(
        default_factory=lambda: torch.cuda.is_available(), metadata={"help": "pin memory (GPU only)"}
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "count tokens: no | all | non_padding"}
    )

    def __post_init__(self) -> None:
        cpu_distributed_default(self)
        super().__post_init__()
        check_world_size(self)


@dataclass
class RelearnArguments(HfRelearnTrainingArguments):
    """``TrainingArguments`` plus what a re-learn run needs. Every Trainer flag still works."""

    block: str = field(default="decoder.-1", metadata={"help": "block to reset, e.g. decoder.3, encoder.-1.mlp"})
    init: str = field(default="scratch", metadata={"help": "scratch | zero | checkpoint:PATH"})
    reset_seed: int = field(default=0, metadata={"help": "seed of the reset (identical on every rank)"})
    allow_shared: bool = field(default=False, metadata={"help": "reset tied/shared tensors everywhere they are used"})
    objective: str = field(default="clm", metadata={"help": "clm | mlm | seq2seq | distill"})
    tolerance: float = field(
        default=0.01,
        metadata={"help": "recovered when metric <= baseline*(1+tolerance) (>= baseline*(1-tol) if higher is better)"},
    )
    tolerance_abs: float | None = field(
        default=None, metadata={"help": "absolute tolerance instead: recovered when |metric - baseline| is within it"}
    )
    recovery_metric: str = field(default="eval_loss", metadata={"help": "metric that defines recovery"})
    patience: int = field(default=1, metadata={"help": "consecutive qualifying evaluations needed"})
    stop_at_recovery: bool = field(default=True, metadata={"help": "stop at recovery (false: train to max_steps)"})
    original_steps: int | None = field(default=None, metadata={"help": "optimizer steps of the original training"})
    original_tokens: int | None = field(default=None, metadata={"help": "tokens of the original training"})
    original_run: str | None = field(
        default=None, metadata={"help": "folder of the base run (its trainer_state.json gives steps, tokens, curve)"}
    )
    trainable: str = field(default="block", metadata={"help": "block | all | lora-rest | block+lora-rest"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank for the lora-rest arms"})
    swap_encoder: str | None = field(
        default=None,
        metadata={
            "help": "instead of resetting a block: install this encoder (model type, folder or Hub id) in the "
            "encoder-decoder and reset its cross-attention (see swap.py)"
        },
    )
    swap_encoder_overrides: str | None = field(
        default=None, metadata={"help": "config overrides of the new encoder, e.g. d_model=128,num_layers=4"}
    )
    swap_cross_attention: str = field(default="reset", metadata={"help": "reset | zero (start as if absent)"})
    swap_freeze: str = field(
        default="decoder-except-cross", metadata={"help": "decoder-except-cross | encoder-trainable | all-trainable"}
    )
    swap_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "after a swap, train only the cross-attention (and enc_to_dec_proj) for this many steps, then "
            "also what swap_freeze makes trainable (needs swap_freeze encoder-trainable or all-trainable; one process)"
        },
    )
    metrics: list[str] = field(
        default_factory=list,
        metadata={
            "help": "task metrics for evaluation: 'accuracy' (token accuracy, built in) or an `evaluate` module "
            "name / local module path (repeatable); use one as recovery_metric"
        },
    )
    save_final_model: bool = field(
        default=True, metadata={"help": "save the re-learned model (safetensors) in output_dir at the end"}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the distill KL"})
    prefix_cache: str = field(
        default="auto",
        metadata={
            "help": "skip the frozen layers below the block by caching their outputs per example (prefix_cache.py): "
            "auto = on where exact (nothing below trains, no dropout there, fixed inputs), true = on with frozen "
            "layers in eval mode (refused where it cannot be exact), false = off"
        },
    )
    prefix_cache_memory_gb: float | None = field(
        default=None, metadata={"help": "prefix cache memory budget; above it the cache is memory-mapped on disk"}
    )
    prefix_cache_dir: str | None = field(
        default=None, metadata={"help": "folder for an on-disk prefix cache (default: a temporary folder)"}
    )
    # Trainer defaults that suit a re-learn run (recovery is checked at evaluations)
    # constant, so that where recovery happens does not depend on an arbitrary max_steps cap (a decay would)
    lr_scheduler_type: str = field(default="constant", metadata={"help": "learning-rate schedule (default constant)"})
    eval_steps: float | None = field(default=10, metadata={"help": "evaluate every N steps"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    restore_callback_states_from_checkpoint: bool = field(default=True, metadata={"help": "resume counters"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise RelearnError(f"objective {self.objective!r} unknown; choose one of {', '.join(OBJECTIVES)}")
        if self.trainable not in TRAINABLE:
            raise RelearnError(f"trainable {self.trainable!r} unknown; choose one of {', '.join(TRAINABLE)}")
        if not self.tolerance > 0:
            raise RelearnError(f"tolerance must be > 0 (a relative tolerance such as 0.01), got {self.tolerance}")
        if self.tolerance_abs is not None and not self.tolerance_abs > 0:
            raise RelearnError(f"tolerance_abs must be > 0, got {self.tolerance_abs}")
        if self.patience < 1:
            raise RelearnError(f"patience must be >= 1, got {self.patience}")
        self.prefix_cache = str(self.prefix_cache).lower()
        if self.prefix_cache not in PREFIX_MODES:
            raise RelearnError(f"prefix_cache must be one of {', '.join(PREFIX_MODES)}, got {self.prefix_cache!r}")
        if self.eval_strategy == "no":
            raise RelearnError("eval_strategy 'no' cannot measure recovery: use steps (and eval_steps)")
        if self.original_run is not None:
            read_original_run(self.original_run)  # fail now, not after training
        check_swap_warmup(self)

    @property
    def metric_key(self) -> str:
        return self.recovery_metric if self.recovery_metric.startswith("eval_") else f"eval_{self.recovery_metric}"

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None and self.metric_for_best_model == self.recovery_metric:
            return bool(self.greater_is_better)
        return not self.metric_key.endswith("loss")


def cpu_distributed_default(args: TrainingArguments) -> None:
    """Under a multi-process launch on a machine without GPUs, train on CPU (gloo) instead of silently alone.

    Without ``use_cpu``, transformers 5.24 sets up no process group on a GPU-less machine even when launched with
    ``accelerate launch --multi_gpu --num_processes 2``: every process would run the whole job by itself.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        args.use_cpu = True


def check_world_size(args: TrainingArguments) -> None:
    """Refuse a launch whose processes do not see each other (each would write the same results)."""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise RelearnError(
            f"launched {launched} processes but the Trainer sees a world of {args.world_size}: the processes would "
            "each run alone. On CPU use `accelerate launch --multi_gpu --num_processes N` with use_cpu "
            "(recipes/accelerate/cpu-2proc.yaml)."
        )


def check_swap_warmup(args: RelearnArguments) -> None:
    """Refuse a swap warm-up that cannot do what it says (see ``RelearnArguments.swap_warmup_steps``)."""
    steps = args.swap_warmup_steps
    if steps == 0:
        return
    if steps < 0:
        raise RelearnError(f"swap_warmup_steps must be >= 0, got {steps}")
    if not args.swap_encoder:
        raise RelearnError(
            "swap_warmup_steps needs swap_encoder (it warms up the cross-attention of a swapped encoder)"
        )
    if args.swap_freeze == "decoder-except-cross":
        raise RelearnError(
            "swap_warmup_steps with swap_freeze decoder-except-cross changes nothing (only the cross-attention trains "
            "anyway): use swap_freeze encoder-trainable or all-trainable"
        )
    if args.world_size > 1:
        # DDP (and FSDP, DeepSpeed) register the trainable parameters when they wrap the model, before step 0
        raise RelearnError(
            f"swap_warmup_steps is not supported under a {args.world_size}-process launch (the distributed wrapper "
            "fixes which parameters train when it wraps the model); run it in one process"
        )


# ----------------------------------------------------------------------------------------------- original run
def read_original_run(path: str | Path) -> dict[str, Any]:
    """Budget (steps, tokens), validation curve and warnings of a base run folder.

    The curve comes from its ``trainer_state.json``. The budget is the step (and tokens) of the model that was kept:
    for a base trained until converged (``pretrain --until_converged``) the best checkpoint, recorded in
    ``hf_relearn_run.json``; otherwise the run's last step.
    """
    state_file = Path(path) / "trainer_state.json"
    if not state_file.exists():
        raise RelearnError(
            f"original_run {path}: no trainer_state.json there. Point it at the output dir of `hf-relearn pretrain` "
            "(or of a Trainer run that called save_state()), or give original_steps / original_tokens instead."
        )
    state = json.loads(state_file.read_text())
    curve = [(e["step"], e["eval_loss"]) for e in state.get("log_history", []) if "eval_loss" in e]
    run_file = Path(path) / RUN_FILE
    info = json.loads(run_file.read_text()) if run_file.exists() else {}
    return {
        "steps": info.get("budget_steps") or state.get("global_step") or None,
        "tokens": info.get("budget_tokens") or state.get("num_input_tokens_seen") or None,
        "curve": curve,
        "warnings": attach_codes(info["warnings"], info.get("warning_codes"))
        if "warnings" in info
        else base_run_warnings(curve, state.get("global_step") or 0),
    }


def base_run_warnings(
    curve: list[tuple[int, float]],
    total_steps: int,
    tol: float = 0.01,
    converged: bool = False,
    kept_best: bool = False,
) -> list[str]:
    """Flag an under-trained base (val loss still falling at the end) or an overfit one (kept past its best).

    ``converged``: the run stopped because its plateau rule fired (no under-trained warning then); ``kept_best``: the
    model kept is the best checkpoint (so it cannot be past its best).
    """
    if len(curve) < 3 or not total_steps:
        return []
    steps, losses = zip(*curve, strict=True)
    final, best = losses[-1], min(losses)
    best_step = steps[losses.index(best)]
    late = [loss for s, loss in curve if s <= 0.75 * total_steps]
    out = []
    if not converged and late and final < late[-1] * (1 - tol):
        out.append(
            Caveat(
                UNDER_TRAINED,
                f"base model under-trained: its validation loss still fell from {late[-1]:.4f} (step "
                f"{max(s for s in steps if s <= 0.75 * total_steps)}) to {final:.4f} in the last quarter of training; "
                "recovery numbers measured against it mislead",
            )
        )
    if not kept_best and best_step < 0.75 * total_steps and final > best * (1 + tol):
        out.append(
            Caveat(
                OVERFIT,
                f"base model overfit: its best validation loss {best:.4f} came at step {best_step} of {total_steps} and "
                f"ended at {final:.4f}; a reset can look cheap or even help",
            )
        )
    return out


def first_reach(curve: list[tuple[int, float]], threshold: float, higher_is_better: bool, patience: int = 1):
    """The step of the first of ``patience`` consecutive curve points within ``threshold``, or None."""
    run = 0
    for i, (_, value) in enumerate(curve):
        ok = value >= threshold if higher_is_better else value <= threshold
        run = run + 1 if ok and not math.isnan(value) else 0
        if run >= patience:
            return curve[i - patience + 1][0]
    return None


def recovery_threshold(baseline: float, after_reset: float, args: RelearnArguments) -> float:
    """The metric value that counts as recovered (see README: recovery, defined)."""
    sign = 1 if args.higher_is_better else -1
    if args.tolerance_abs is not None:
        return baseline - sign * args.tolerance_abs
    if args.objective == "distill" and args.metric_key == "eval_loss":
        # the teacher is the model itself, so its baseline distill loss is 0: recovered when the damage is
        # repaired to within `tolerance` of how far the reset moved it
        return baseline + args.tolerance * (after_reset - baseline)
    return baseline * (1 - sign * args.tolerance) if baseline >= 0 else baseline * (1 + sign * args.tolerance)


# ----------------------------------------------------------------------------------------------- callbacks
class ConvergenceCallback(EarlyStoppingCallback):
    """Stop a base run once it has converged: over the last ``patience`` evaluations its best validation loss
    improved by less than ``threshold`` (relative), i.e. best_now > best_then x (1 - threshold).

    ``converged`` says whether that rule (not the ``max_steps`` cap) ended the run. The best-so-far history is part
    of the callback's state, so a resumed run judges the same window.
    """

    def __init__(self, patience: int = 8, threshold: float = 0.005, best_history: list[float] | None = None):
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=threshold)
        self.best_history = list(best_history or [])

    def check_metric_value(self, args, state, control, metric_value):
        sign = -1 if args.greater_is_better else 1  # compare as a loss
        value = sign * metric_value
        self.best_history.append(min(value, self.best_history[-1]) if self.best_history else value)
        window = self.early_stopping_patience
        if len(self.best_history) > window:
            then, now = self.best_history[-1 - window], self.best_history[-1]
            stalled = now > then - abs(then) * self.early_stopping_threshold
            self.early_stopping_patience_counter = window if stalled else 0

    @property
    def converged(self) -> bool:
        return self.early_stopping_patience_counter >= self.early_stopping_patience

    def state(self) -> dict:
        # the Trainer rebuilds a resumed callback as type(cb)(**args): the args are __init__'s own parameters
        return {
            "args": {"patience": self.early_stopping_patience, "threshold": self.early_stopping_threshold,
                     "best_history": self.best_history},
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }  # fmt: skip


class ExamplesSeen(TrainerCallback, ExportableState):
    """Counts training examples; saved in checkpoints so a resumed run keeps counting from where it was."""

    def __init__(self, examples_seen: int = 0):
        self.examples_seen = examples_seen

    def state(self) -> dict:
        return {"args": {}, "attributes": {"examples_seen": self.examples_seen}}


class RecoveryCallback(TrainerCallback):
    """Stops training at recovery: the metric within ``threshold`` for ``patience`` consecutive evaluations.

    Stateless apart from its settings: it reads the evaluations so far from ``state.log_history``, which a resumed
    run restores, so an interrupted and resumed run stops at the same step.
    """

    def __init__(self, metric_key: str, threshold: float, higher_is_better: bool, patience: int, stop: bool):
        self.metric_key, self.threshold, self.higher_is_better = metric_key, threshold, higher_is_better
        self.patience, self.stop = patience, stop
        self.recovered_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is None or self.metric_key not in metrics:
            have = ", ".join(sorted(k for k in (metrics or {}) if k.startswith("eval_")))
            raise RelearnError(f"recovery metric {self.metric_key!r} was not computed by evaluation; it gave: {have}")
        curve = [(e["step"], e[self.metric_key]) for e in state.log_history if self.metric_key in e]
        self.recovered_step = first_reach(curve, self.threshold, self.higher_is_better, self.patience)
        if self.recovered_step is not None and self.stop:
            control.should_training_stop = True
        return control


class SwapWarmupCallback(TrainerCallback):
    """Unfreezes ``params`` at the start of the first optimizer step after ``steps`` (the end of a swap warm-up).

    Steps 1..``steps`` train only what was trainable before; from step ``steps + 1`` on, ``params`` train too. It
    reads ``state.global_step``, so a run resumed past the warm-up unfreezes them before its first step.
    """

    def __init__(self, params: list[torch.nn.Parameter], steps: int):
        self.params, self.steps = params, steps
        self.unfrozen_at: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.unfrozen_at is None and state.global_step >= self.steps:
            for p in self.params:
                p.requires_grad_(True)
            self.unfrozen_at = state.global_step
        return control


# ----------------------------------------------------------------------------------------------- result
@dataclass
class RelearnResult:
    """The results contract (``relearn_result.json``); see docs/results-contract.md for every field."""

    model: str
    architecture: str
    block: str
    init: str
    seed: int
    objective: str
    trainable: str
    tolerance: float
    tolerance_abs: float | None
    recovery_metric: str
    patience: int
    baseline_eval_loss: float | None
    after_reset_eval_loss: float | None
    final_eval_loss: float | None
    baseline_metric: float
    after_reset_metric: float
    recovery_threshold: float
    recovered: bool
    steps_to_recover: int | None
    examples_to_recover: int | None
    tokens_to_recover: int | None
    original_steps: int | None
    original_tokens: int | None
    fraction_of_original: float | None
    fraction_of_original_tokens: float | None
    original_steps_to_same_loss: int | None
    frozen_unchanged: bool
    frozen_changed: list[str]
    trainable_parameters: int
    total_parameters: int
    steps_trained: int
    curve: list[list[float]]
    train_curve: list[list[float]]
    world_size: int
    reset_identical_across_ranks: bool
    warnings: list[str]
    warning_codes: list[str]
    surgery: dict
    versions: dict
    stopped: str = "recovered"
    prefix_cache: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: baseline -> after reset -> recovered at N steps = X% of the original."""
        m = self.recovery_metric
        head = f"{self.block}: {m} {self.baseline_metric:.4f} -> {self.after_reset_metric:.4f} after reset -> "
        if not self.recovered:
            return (
                head
                + f"not recovered in {self.steps_trained} steps (final {self.curve[-1][1]:.4f}; stopped: {self.stopped})"
            )
        frac = (
            f" = {100 * self.fraction_of_original:.1f}% of the original {self.original_steps}"
            if self.fraction_of_original is not None
            else ""
        )
        return (
            head
            + f"recovered at {self.steps_to_recover} steps{frac} ({self.examples_to_recover} examples, {self.tokens_to_recover} tokens)"
        )


# ----------------------------------------------------------------------------------------------- trainer
class RelearnTrainer(Trainer):
    """A ``Trainer`` that resets ``args.block``, re-learns it with the rest frozen and reports the cost.

    Guarantees: the baseline is measured on the intact model; surgery and freezing happen before the model is
    wrapped or an optimizer exists; ``relearn_result.json`` is written by the main process at the end of
    ``train()`` (also when training stops on a NaN loss, which then raises ``RelearnError``).
    """

    args: RelearnArguments

    def __init__(
        self,
        model=None,
        args: RelearnArguments | None = None,
        model_name: str | None = None,
        prefix_cache: PrefixCache | None = None,
        **kwargs,
    ):
        if not isinstance(args, RelearnArguments):
            raise RelearnError("RelearnTrainer needs RelearnArguments (a TrainingArguments subclass)")
        self.model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        self.block = BlockMap(model).resolve(args.block)  # bad names fail before anything runs
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if args.metrics and kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = build_compute_metrics(args.metrics, args.objective)
            kwargs.setdefault("preprocess_logits_for_metrics", _argmax_logits)
        callbacks.append(ExamplesSeen())
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        if args.objective == "distill":
            self.label_names = []
        self.teacher = None
        self.surgery: SurgeryReport | None = None
        self.measured: dict[str, dict] = {}
        self.data_warnings: list[str] = []
        self.recovery: RecoveryCallback | None = None
        self._frozen_before: dict[str, str] | None = None
        self._trainable_names: list[str] = []
        # a cache handed in (a study's, shared by the runs over one base) outlives this trainer; our own does not
        self._shared_prefix_cache = prefix_cache
        self.prefix_cache: PrefixCache | None = None
        self.prefix_cache_info: dict = {"enabled": False, "reason": "not planned yet"}
        self._prefix_splits: set[str] = set()

    # ---------------------------------------------------------------- measuring
    def _measure(self, description: str) -> dict[str, float]:
        # loss only unless metrics need predictions (as Trainer.evaluate does): otherwise every batch's logits are
        # gathered and concatenated, which cost more than the forward passes themselves (measured: 43 s of 100)
        out = self.evaluation_loop(
            self.get_eval_dataloader(),
            description=description,
            prediction_loss_only=True if self.compute_metrics is None else None,
            metric_key_prefix="eval",
        )
        metrics = out.metrics
        if self.args.metric_key not in metrics:
            have = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
            raise RelearnError(f"recovery metric {self.args.metric_key!r} is never computed; evaluation gives: {have}")
        if math.isnan(metrics[self.args.metric_key]):
            raise RelearnError(
                f"{description}: {self.args.metric_key} is NaN before any training; check the model and data"
            )
        return metrics

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.state is not None:
            out.metrics["relearn_examples_seen"] = self._examples_seen()
        return out

    def _counter(self) -> ExamplesSeen:
        """The live example counter (a resumed run replaces the instance with one restored from the checkpoint)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, ExamplesSeen))

    def _examples_seen(self) -> int:
        return self._counter().examples_seen

    # ---------------------------------------------------------------- surgery
    def prepare_relearn(self) -> None:
        """Measure the intact model, reset and freeze, measure again. Idempotent; ``train()`` calls it."""
        if self.surgery is not None:
            return
        args = self.args
        self.model.eval()
        if args.objective == "distill":
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        if args.objective != "distill":
            self.measured["baseline"] = self._measure("relearn: baseline (intact model)")
        if args.swap_encoder:
            self._swap_encoder()
        else:
            self.surgery = reset(
                self.model, self.block, init=args.init, seed=args.reset_seed, allow_shared=args.allow_shared
            )
            self._apply_trainable()
        self._setup_prefix_cache()
        self._frozen_before = _normalised_fingerprint(self.model)
        self._reset_digest = _digest_int(
            [self._frozen_before[n] for n in sorted(self.surgery.tensors) if n in self._frozen_before]
        )
        self.measured["after_reset"] = self._measure("relearn: after reset")
        if args.objective == "distill":
            self.measured["baseline"] = {args.metric_key: 0.0, "eval_loss": 0.0}
        baseline = self.measured["baseline"][args.metric_key]
        after = self.measured["after_reset"][args.metric_key]
        self.threshold = recovery_threshold(baseline, after, args)
        self.data_warnings = self._unigram_warning(baseline)
        self.recovery = RecoveryCallback(
            args.metric_key, self.threshold, args.higher_is_better, args.patience, args.stop_at_recovery
        )
        self.add_callback(self.recovery)

    def _swap_encoder(self) -> None:
        """The encoder-swap surgery: a new encoder, the decoder adapted to its width, cross-attention reset."""
        from .blocks import Block
        from .modeling import load_model
        from .swap import swap_encoder

        args = self.args
        new = load_model(args.swap_encoder, args.swap_encoder_overrides, head="base", seed=args.reset_seed)
        encoder = new.get_encoder() if getattr(new.config, "is_encoder_decoder", False) else new
        report = swap_encoder(
            self.model, encoder.to(self.model.device), args.swap_cross_attention, args.swap_freeze, args.reset_seed
        )
        self.surgery = report
        self.block = Block(f"encoder-swap:{args.swap_encoder}", "swap", tuple(report.reset_tensors))
        self._trainable_names = report.trainable  # the warm-up's later ones included: they may change
        self._warmup_params = []
        if args.swap_warmup_steps:
            check_swap_warmup(args)
            first = set(report.reset_tensors)
            self._warmup_params = [p for n, p in self.model.named_parameters() if p.requires_grad and n not in first]
            for p in self._warmup_params:
                p.requires_grad_(False)
            self.add_callback(SwapWarmupCallback(self._warmup_params, args.swap_warmup_steps))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with a swap warm-up's later-unfrozen parameters in it from the start.

        The Trainer takes only parameters with ``requires_grad`` into its optimizer; those a warm-up unfreezes later
        are added now and skipped by the optimizer (no gradient) until they are unfrozen.
        """
        later = [p for p in getattr(self, "_warmup_params", []) if not p.requires_grad]
        for p in later:
            p.requires_grad_(True)
        try:
            return super().create_optimizer(model)
        finally:
            for p in later:
                p.requires_grad_(False)

    # ---------------------------------------------------------------- frozen-prefix cache
    def _prefix_cache_refusal(self) -> tuple[str | None, set[str]]:
        """Why no prefix cache can serve this run (None if one can), and the splits it may serve."""
        args = self.args
        if args.swap_encoder:
            return "an encoder swap changes the encoder itself", set()
        if args.trainable != "block":
            return f"trainable={args.trainable}: layers below the block train too", set()
        if args.objective == "distill":
            return "the distill objective runs a full teacher anyway", set()
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return "FSDP / DeepSpeed shard the frozen layers, so they cannot be run alone to fill the cache", set()
        if args.gradient_checkpointing:
            return "gradient checkpointing re-runs layers in backward; use one or the other", set()
        # training batches of the mlm objective are masked at random each time: only evaluation rows repeat
        splits = {"eval"} if args.objective == "mlm" else {"train", "eval"}
        return None, splits

    def _setup_prefix_cache(self) -> None:
        """Plan the frozen-prefix cache after surgery and freezing; attach it, or record why not (see README)."""
        args = self.args
        if args.prefix_cache == "false":
            self.prefix_cache_info = {"enabled": False, "reason": "prefix_cache=false"}
            return
        reason, splits = self._prefix_cache_refusal()
        plan = None
        if reason is None:
            plan, reason = plan_prefix(self.model, self._trainable_names)
            reason = reason or None
        if reason is None and args.prefix_cache == "auto":
            dropout = active_dropout(self.model, plan.skipped)
            if dropout:
                reason = (
                    f"dropout is active in the frozen layers ({', '.join(dropout[:3])}{', ...' if len(dropout) > 3 else ''}"
                    "): the cache would run them in eval mode; set prefix_cache=true to accept that"
                )
        if reason is not None:
            if args.prefix_cache == "true":
                raise RelearnError(f"prefix_cache=true, but the cache cannot be exact here: {reason}")
            self.prefix_cache_info = {"enabled": False, "reason": reason}
            return
        cache = self._shared_prefix_cache
        if cache is None:
            budget = None if args.prefix_cache_memory_gb is None else int(args.prefix_cache_memory_gb * (1 << 30))
            cache = PrefixCache(budget, args.prefix_cache_dir)
        cache.attach(self.model, plan)
        self.prefix_cache, self._prefix_splits = cache, splits
        self._prefix_fills_before = cache.filled_rows
        if "train" in splits:
            self.train_dataset = with_row_index(self.train_dataset)
        self.eval_dataset = with_row_index(self.eval_dataset)
        self.data_collator = RowCollator(self.data_collator)
        self.prefix_cache_info = {"enabled": True, "splits": sorted(splits), "skipped": plan.describe()}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ROW_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_COLUMN]

    def _release_prefix_cache(self) -> None:
        if self.prefix_cache is None:
            return
        self.prefix_cache_info.update(self.prefix_cache.summary())
        # rows whose prefix this run computed (a shared cache may have had the others from earlier runs)
        self.prefix_cache_info["prefix_forwards"] = self.prefix_cache.filled_rows - self._prefix_fills_before
        if self.prefix_cache is self._shared_prefix_cache:
            self.prefix_cache.detach()
        else:
            self.prefix_cache.close()
        self.prefix_cache = None

    def _unigram_warning(self, baseline: float) -> list[str]:
        """A base no better than a unigram model of its data learned nothing a reset could remove."""
        if self.args.objective not in ("clm", "mlm") or self.args.metric_key != "eval_loss":
            return []
        from .data import unigram_loss

        vocab = self.model.get_input_embeddings().num_embeddings
        uni = unigram_loss(self.train_dataset, self.eval_dataset, vocab)
        if baseline >= 0.98 * uni:
            return [
                Caveat(
                    UNIGRAM_LEVEL,
                    f"the base model is no better than a unigram model of its data (eval loss {baseline:.4f} vs unigram "
                    f"{uni:.4f} nats/token): it has learned little that a reset could remove",
                )
            ]
        return []

    def _apply_trainable(self) -> None:
        args, block = self.args, self.block
        if args.trainable == "all":
            for p in self.model.parameters():
                p.requires_grad_(True)
            names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        else:
            names = (
                freeze_except(self.model, block) if "block" in args.trainable.split("+") else freeze_except(self.model)
            )
        if "lora-rest" in args.trainable:
            train_block = "block" in args.trainable.split("+")
            self.model = self.model_wrapped = _wrap_lora_rest(self.model, block, args.lora_r, train_block)
            names = names + [n for n, p in self.model.named_parameters() if "lora_" in n]
        self._trainable_names = names
        if not any(p.requires_grad for p in self.model.parameters()):
            raise RelearnError(f"nothing to train: block {block.name!r} with trainable={args.trainable!r}")

    # ---------------------------------------------------------------- losses
    def _distill_loss(self, model, inputs) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_out = self.teacher(**inputs)
        student_out = model(**inputs)
        mask = inputs.get("attention_mask")
        if getattr(student_out, "logits", None) is not None:
            t = self.args.distill_temperature
            log_p_student = F.log_softmax(student_out.logits.float() / t, dim=-1)
            log_p_teacher = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
            per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * t * t
        else:  # a model without a head (sentence encoders): match the last hidden states
            per_token = (student_out.last_hidden_state.float() - teacher_out.last_hidden_state.float()).pow(2).mean(-1)
        if mask is None:
            return per_token.mean()
        mask = mask.to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ROW_COLUMN, None)
        split = "train" if model.training else "eval"
        if rows is not None and self.prefix_cache is not None and split in self._prefix_splits:
            dataset = self.train_dataset if split == "train" else self.eval_dataset
            # a run with max_steps meets at most that many batches of training rows: size the cache for those
            args = self.args
            meets = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
            capacity = meets if split == "train" and args.max_steps > 0 else None
            with self.prefix_cache.serving(inputs, rows, split, len(dataset), capacity):
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
        if self.args.objective == "distill":
            loss = self._distill_loss(model, inputs)
            return (loss, None) if return_outputs else loss
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.args.objective != "distill":
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._distill_loss(model, inputs)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise _Diverged(f"the training loss became {loss.item()} at step {self.state.global_step + 1}")
        batch = inputs.get("input_ids", next(iter(inputs.values())))
        self._counter().examples_seen += int(batch.shape[0]) * self.args.world_size
        return loss

    # ---------------------------------------------------------------- the run
    def train(self, resume_from_checkpoint=None, **kwargs):
        """Baseline -> surgery -> after-reset -> train until recovered -> prove frozen -> write the result."""
        self.prepare_relearn()
        stopped = "recovered"
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except _Diverged as err:
            self._release_prefix_cache()
            self.result = self._build_result(stopped="nan")
            self._write_result()
            last = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been saved"
            raise RelearnError(
                f"{err}: training stopped ({keep}; relearn_result.json records the run). "
                "Lower the learning rate or raise max_grad_norm clipping."
            ) from None
        finally:
            self._release_prefix_cache()
        if self.recovery.recovered_step is None:
            stopped = "max_steps"
        self.result = self._build_result(stopped=stopped)
        self._write_result()
        if self.result.frozen_changed:
            raise RelearnError(f"frozen tensors changed during training: {', '.join(self.result.frozen_changed[:10])}")
        return output

    def save_final(self, output_dir: str | None = None) -> None:
        """Save the re-learned model as plain safetensors (a LoRA arm is merged first) and its tokenizer."""
        out = output_dir or self.args.output_dir
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        if self.is_world_process_zero():
            model.save_pretrained(out)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer.push_to_hub writes its card through here: ours carries the recovery metrics (templates/relearn.md)."""
        if getattr(self, "result", None) is None or not self.is_world_process_zero():
            return super().create_model_card(*args, **kwargs)
        out = Path(self.args.output_dir)
        plot_curve(self.result.to_dict(), out / CURVE_FILE)
        relearn_card(out, self.args.hub_model_id).save(out / "README.md")

    def _write_result(self) -> None:
        if self.is_world_process_zero():
            write_json_atomic(Path(self.args.output_dir) / RESULT_FILE, self.result.to_dict())

    def _build_result(self, stopped: str) -> RelearnResult:
        args = self.args
        key = args.metric_key
        base, after = self.measured["baseline"], self.measured["after_reset"]
        evals = [e for e in self.state.log_history if key in e]
        curve = [(0, after[key])] + [(e["step"], e[key]) for e in evals]
        loss_curve = [(0, after.get("eval_loss"))] + [(e["step"], e.get("eval_loss")) for e in evals]
        step = first_reach(curve, self.threshold, args.higher_is_better, args.patience)
        at = {0: {"relearn_examples_seen": 0, "num_input_tokens_seen": 0}} | {e["step"]: e for e in evals}
        tokens_at = at[step].get("num_input_tokens_seen") if step is not None else None
        original = read_original_run(args.original_run) if args.original_run else {}
        orig_steps = args.original_steps or original.get("steps")
        orig_tokens = args.original_tokens or original.get("tokens")
        warnings = list(original.get("warnings", [])) + list(self.data_warnings)
        if first_reach([(0, after[key])], self.threshold, args.higher_is_better) == 0:
            warnings.append(
                Caveat(
                    RESET_BARELY_MATTERED,
                    f"the reset barely mattered: right after it {key} was {after[key]:.4f}, already within the tolerance of "
                    f"the baseline {base[key]:.4f}; this block did little, so its cheap 'recovery' says nothing",
                )
            )
        orig_same = None
        if original.get("curve") and key == "eval_loss":
            orig_same = first_reach(original["curve"], self.threshold, False)
        moved = sorted(
            n
            for n, h in _normalised_fingerprint(self.model).items()
            if n not in set(self._trainable_names) and self._frozen_before.get(n) != h
        )
        # every rank checks its own copy; the verdicts (and the reset's digest) are gathered so that the result,
        # written by the main process, speaks for all of them
        device = self.args.device
        moved_counts = self.accelerator.gather(torch.tensor([len(moved)], device=device)).tolist()
        digests = self.accelerator.gather(torch.tensor([self._reset_digest], device=device)).tolist()
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return RelearnResult(
            model=self.model_name,
            architecture=getattr(getattr(self.model, "config", None), "model_type", ""),
            block=self.block.name,
            init=args.init,
            seed=args.reset_seed,
            objective=args.objective,
            trainable=args.trainable,
            tolerance=args.tolerance,
            tolerance_abs=args.tolerance_abs,
            recovery_metric=key,
            patience=args.patience,
            baseline_eval_loss=base.get("eval_loss"),
            after_reset_eval_loss=after.get("eval_loss"),
            final_eval_loss=loss_curve[-1][1],
            baseline_metric=base[key],
            after_reset_metric=after[key],
            recovery_threshold=self.threshold,
            recovered=step is not None,
            steps_to_recover=step,
            examples_to_recover=at[step]["relearn_examples_seen"] if step is not None else None,
            tokens_to_recover=tokens_at,
            original_steps=orig_steps,
            original_tokens=orig_tokens,
            fraction_of_original=step / orig_steps if step is not None and orig_steps else None,
            fraction_of_original_tokens=tokens_at / orig_tokens if tokens_at is not None and orig_tokens else None,
            original_steps_to_same_loss=orig_same,
            frozen_unchanged=not any(moved_counts),
            frozen_changed=moved,
            trainable_parameters=trainable,
            total_parameters=total,
            steps_trained=self.state.global_step,
            curve=[[s, v] for s, v in curve],
            train_curve=[[e["step"], e["loss"]] for e in self.state.log_history if "loss" in e],
            world_size=self.args.world_size,
            reset_identical_across_ranks=len(set(digests)) == 1,
            warnings=warnings,
            warning_codes=codes_of(warnings),
            surgery=self.surgery.to_dict(),
            versions=versions(),
            stopped=stopped,
            prefix_cache=dict(self.prefix_cache_info),
        )


def _argmax_logits(logits, labels):
    """Keep only predicted ids, not the full logits, between evaluation batches (memory)."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def build_compute_metrics(names: list[str], objective: str):
    """A ``compute_metrics`` over predicted vs reference tokens (positions with label -100 left out).

    ``accuracy`` is built in (token accuracy); any other name is loaded with ``evaluate.load`` (a local module folder
    or file works offline; a Hub name needs the network) and called as ``compute(predictions=..., references=...)``.
    For ``clm`` the prediction at position t is compared with the label at t+1, as the model's loss does.
    """
    if objective == "distill":
        raise RelearnError("metrics need labels; the distill objective has none (its recovery metric is the loss)")
    modules = []
    for name in names:
        if name == "accuracy":
            modules.append(None)
            continue
        import evaluate

        try:
            modules.append(evaluate.load(name))
        except Exception as err:  # evaluate raises many types (FileNotFoundError, ConnectionError, ...)
            raise RelearnError(
                f"metric {name!r} could not be loaded with evaluate.load ({type(err).__name__}: {err}); offline, pass "
                "the path of a local metric module, or use the built-in 'accuracy'"
            ) from err

    def compute(eval_pred) -> dict[str, float]:
        import numpy as np

        preds, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        if objective == "clm":
            preds, labels = preds[..., :-1], labels[..., 1:]
        keep = labels != -100
        preds, labels = preds[keep], labels[keep]
        out: dict[str, float] = {}
        for module in modules:
            if module is None:
                out["accuracy"] = float((preds == labels).mean()) if labels.size else float("nan")
            else:
                result = module.compute(predictions=preds.tolist(), references=labels.tolist())
                out.update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
        return out

    return compute


class _Diverged(RuntimeError):
    pass


def _digest_int(hexdigests: list[str]) -> int:
    """A 60-bit integer summary of some tensor digests (gatherable as an int64 tensor)."""
    import hashlib

    return int(hashlib.blake2b("".join(hexdigests).encode(), digest_size=8).hexdigest(), 16) >> 4


def _normalised_fingerprint(model) -> dict[str, str]:
    """Fingerprint keyed by the original parameter names, also through a peft wrapper (LoRA tensors left out)."""
    fp = fingerprint(model)
    out = {}
    for name, digest in fp.items():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = digest
    return out


def _wrap_lora_rest(model, block, r: int, train_block: bool):
    """peft LoRA on every linear layer of every stack layer outside ``block`` (the block itself left as it is)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    bmap = BlockMap(model)
    in_block = set(block.params)
    targets = []
    for stack in bmap.stacks.values():
        for layer in stack.layers:
            for path, module in model.named_modules():
                if not path.startswith(layer.path + ".") or not isinstance(module, (torch.nn.Linear, Conv1D)):
                    continue
                if any(n.startswith(path + ".") for n in in_block):
                    continue
                targets.append(path)
    if not targets:
        raise RelearnError(f"lora-rest: no linear layer outside {block.name!r} to put LoRA on")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=False)
    peft_model = get_peft_model(model, config)
    # get_peft_model freezes everything but LoRA; a block that trains keeps its own requires_grad
    for n, p in peft_model.named_parameters():
        base = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if base in in_block and "lora_" not in n:
            p.requires_grad_(train_block)
    return peft_model
