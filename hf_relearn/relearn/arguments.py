"""The argument dataclasses of every hf-relearn run (HfArgumentParser reads them; a recipe's sections fill them).

``HfRelearnTrainingArguments`` holds the defaults every run needs; ``PretrainArguments`` (a base run, optionally
until converged) and ``RelearnArguments`` (a re-learn run) extend it, TRL-style: one config per method.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, TrainingArguments

from ..data.objectives import OBJECTIVES, get_objective, objective_names
from ..errors import RelearnError
from ..model.arm_registry import ARMS, DEFAULT_ARM, get_arm
from .prefix_plan import MODES as PREFIX_MODES
from .result import read_original_run


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
    objective: str = field(default="clm", metadata={"help": " | ".join(OBJECTIVES)})
    tolerance: float = field(
        default=0.01,
        metadata={"help": "recovered when metric <= baseline*(1+tolerance) (>= baseline*(1-tol) if higher is better)"},
    )
    tolerance_abs: float | None = field(
        default=None, metadata={"help": "absolute tolerance instead: recovered when |metric - baseline| is within it"}
    )
    recovery_metric: str = field(default="eval_loss", metadata={"help": "metric that defines recovery"})
    patience: int = field(default=1, metadata={"help": "consecutive qualifying evaluations needed"})
    recovery_window: int = field(
        default=5,
        metadata={
            "help": "judge recovery on the curve smoothed over this many evaluations (odd; centred mean), so one "
            "evaluation that dips under the line by noise is no recovery; the run goes on window // 2 evaluations "
            "past the crossing to see it. 1: the first evaluation under the line"
        },
    )
    stop_at_recovery: bool = field(default=True, metadata={"help": "stop at recovery (false: train to max_steps)"})
    original_steps: int | None = field(default=None, metadata={"help": "optimizer steps of the original training"})
    max_steps_share: float | None = field(
        default=None,
        metadata={
            "help": "cap the run at this share of the original budget (1.5: 150%% of its steps) instead of max_steps; "
            "needs original_run or original_steps"
        },
    )
    original_tokens: int | None = field(default=None, metadata={"help": "tokens of the original training"})
    original_run: str | None = field(
        default=None, metadata={"help": "folder of the base run (its trainer_state.json gives steps, tokens, curve)"}
    )
    original_checkpoints: str | None = field(
        default=None,
        metadata={
            "help": "the base's published checkpoints, evaluated on this run's validation rows to give the original "
            "curve: a Hub id or folder (with original_revisions), or a glob of checkpoint folders (runs/x/checkpoint-*)"
        },
    )
    original_revisions: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated REVISION[=STEP] of original_checkpoints (step1000,step2000: the step is "
            "the last number in the name)"
        },
    )
    original_tokens_per_step: int | None = field(
        default=None, metadata={"help": "tokens per optimizer step of the original training (for token figures)"}
    )
    original_curve_cache: str | None = field(
        default=None,
        metadata={"help": "folder caching each checkpoint's evaluation (default: HF_HOME/hf_relearn/original_curves)"},
    )
    trainable: str = field(default=DEFAULT_ARM, metadata={"help": " | ".join(ARMS)})
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
    swap_cross_attention: str | None = field(
        default=None,
        metadata={
            "help": "reset | zero (start as if absent) | keep (as trained: one width, or a stitch between them); "
            "default: reset, or keep with swap_stitch"
        },
    )
    swap_freeze: str = field(
        default="decoder-except-cross",
        metadata={"help": "decoder-except-cross | encoder-trainable | all-trainable | stitch-only"},
    )
    swap_stitch: str | None = field(
        default=None,
        metadata={
            "aliases": ["--stitch"],
            "help": "lstsq | procrustes: map the new encoder's output to the old one's with a linear stitch fitted in "
            "closed form on the first training rows, keeping the trained cross-attention (see stitch.py)",
        },
    )
    swap_stitch_rows: int = field(
        default=256,
        metadata={"help": "training rows the stitch is fitted on (a quarter of them held out to check it)"},
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
        get_objective(self.objective)  # an unknown name fails here, naming the registered ones
        get_arm(self.trainable)
        if not self.tolerance > 0:
            raise RelearnError(f"tolerance must be > 0 (a relative tolerance such as 0.01), got {self.tolerance}")
        if self.tolerance_abs is not None and not self.tolerance_abs > 0:
            raise RelearnError(f"tolerance_abs must be > 0, got {self.tolerance_abs}")
        if self.patience < 1:
            raise RelearnError(f"patience must be >= 1, got {self.patience}")
        if self.recovery_window < 1 or self.recovery_window % 2 == 0:
            raise RelearnError(f"recovery_window must be an odd number >= 1, got {self.recovery_window}")
        self.prefix_cache = str(self.prefix_cache).lower()
        if self.prefix_cache not in PREFIX_MODES:
            raise RelearnError(f"prefix_cache must be one of {', '.join(PREFIX_MODES)}, got {self.prefix_cache!r}")
        if self.eval_strategy == "no":
            raise RelearnError("eval_strategy 'no' cannot measure recovery: use steps (and eval_steps)")
        if self.original_run is not None:
            budget = read_original_run(self.original_run)["steps"]  # fail now, not after training
        else:
            budget = None
        if self.max_steps_share is not None:
            budget = self.original_steps or budget
            if not self.max_steps_share > 0 or not budget:
                raise RelearnError(
                    f"max_steps_share {self.max_steps_share}: needs a share > 0 and an original budget (original_run "
                    "or original_steps)"
                )
            self.max_steps = math.ceil(self.max_steps_share * budget)
        if self.original_revisions and not self.original_checkpoints:
            raise RelearnError("original_revisions needs original_checkpoints (the Hub id or folder they belong to)")
        if self.original_checkpoints:
            from .original_curve import parse_checkpoints

            if get_objective(self.objective).distills or self.metric_key != "eval_loss":
                raise RelearnError(
                    f"original_checkpoints give a curve of eval_loss; not with {self.objective} or another metric"
                )
            parse_checkpoints(self.original_checkpoints, self.original_revisions)  # syntax only: no network yet
        check_swap_warmup(self)
        if self.swap_cross_attention is None:
            self.swap_cross_attention = "keep" if self.swap_stitch else "reset"
        if self.swap_stitch and not self.swap_encoder:
            raise RelearnError("swap_stitch needs swap_encoder (it maps a swapped encoder to the old one)")
        if self.swap_stitch_rows < 4:
            raise RelearnError(
                f"swap_stitch_rows must be at least 4 (rows to fit and rows to check), got {self.swap_stitch_rows}"
            )

    @property
    def metric_key(self) -> str:
        return eval_key(self.recovery_metric)

    def refuse_when_sharded(self, sharded: bool) -> None:
        """Raise (``RelearnError``) when ``sharded`` (FSDP / DeepSpeed) and the run swaps an encoder, wraps LoRA or
        distills: the baseline evaluation shards the model before the reset, and these replace, wrap or copy it
        whole, which nothing here does on shards."""
        if not sharded:
            return
        unsupported = [
            flag
            for flag, used in (
                ("--swap_encoder", bool(self.swap_encoder)),
                (f"--trainable {self.trainable}", get_arm(self.trainable).lora_rest),
                (f"--objective {self.objective}", get_objective(self.objective).distills),
            )
            if used
        ]
        if unsupported:
            raise RelearnError(
                f"{', '.join(unsupported)} cannot run under FSDP / DeepSpeed (the model is sharded before the reset, "
                "and these replace, wrap or copy it whole); launch it with DDP instead: "
                "accelerate launch --config_file recipes/accelerate/ddp.yaml -m hf_relearn relearn ..."
            )

    @property
    def higher_is_better(self) -> bool:
        # --greater_is_better declares the direction, unless it belongs to another metric_for_best_model
        best = self.metric_for_best_model
        if self.greater_is_better is not None and best in (None, self.recovery_metric, self.metric_key):
            return bool(self.greater_is_better)
        return not self.metric_key.endswith("loss")


def eval_key(metric: str) -> str:
    """The key under which evaluation reports ``metric`` (``accuracy`` -> ``eval_accuracy``; ``eval_loss`` as is)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def cpu_distributed_default(args: TrainingArguments) -> None:
    """Under a multi-process launch on a machine without GPUs, train on CPU (gloo) instead of silently alone.

    Without ``use_cpu``, transformers 5.24 sets up no process group on a GPU-less machine even when launched with
    ``accelerate launch --multi_gpu --num_processes 2``: every process would run the whole job by itself.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        args.use_cpu = True


def check_world_size(args: TrainingArguments) -> None:
    """Refuse a launch whose processes do not see each other (each would write the same results)."""
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


@dataclass
class ModelArguments:
    """Which model: a local folder, a model type built from config (``gpt2``), or a Hub id."""

    model: str = field(
        default="gpt2", metadata={"help": "local folder, model type (gpt2, llama, t5, bert...) or Hub id"}
    )
    config_overrides: str | None = field(default=None, metadata={"help": "e.g. n_layer=4,n_embd=64 (config builds)"})
    head: str | None = field(default=None, metadata={"help": "causal-lm | masked-lm | seq2seq-lm | base"})
    model_seed: int = field(default=0, metadata={"help": "init seed of a model built from config"})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager | sdpa | flash_attention_2 ...; default: transformers' choice (SDPA where supported)"
        },
    )

    def __post_init__(self) -> None:
        from ..model.modeling import packaged_checkpoint

        self.model = packaged_checkpoint(self.model)  # pkg:MODULE -> the checkpoint folder that package ships

    def load(self, config_overrides: str | dict | None = None) -> PreTrainedModel:
        """The model these arguments name (``modeling.load_model``: head, init seed, attention implementation), with
        ``config_overrides`` in place of the field's when given."""
        from ..model.modeling import load_model

        overrides = self.config_overrides if config_overrides is None else config_overrides
        return load_model(
            self.model, overrides, head=self.head, seed=self.model_seed, attn_implementation=self.attn_implementation
        )


@dataclass
class PretrainArguments(HfRelearnTrainingArguments):
    """``TrainingArguments`` for a base run whose budget and validation curve are recorded."""

    objective: str = field(default="clm", metadata={"help": " | ".join(objective_names(pretrainable=True))})
    eval_steps: float | None = field(default=50, metadata={"help": "evaluate every N steps"})
    logging_steps: float = field(default=50, metadata={"help": "log every N steps"})
    until_converged: bool = field(
        default=False,
        metadata={
            "help": "train until the validation loss stops improving (max_steps is then a cap): keeps the best "
            "checkpoint, whose step is the base's budget; the learning rate halves on each plateau (see README)"
        },
    )
    convergence_patience: int = field(
        default=8, metadata={"help": "convergence window: the last N evaluations (see convergence_threshold)"}
    )
    convergence_threshold: float = field(
        default=0.005,
        metadata={"help": "converged when the best eval loss improved by less than this share over the window"},
    )
    convergence_window: float = field(
        default=0.25,
        metadata={
            "help": "the window is also at least this share of the steps so far (a quarter: a slow late fall "
            "is not a plateau)"
        },
    )

    def __post_init__(self) -> None:
        if self.until_converged:
            self._converge_settings()
        super().__post_init__()
        if not get_objective(self.objective).pretrainable:
            raise RelearnError(
                f"pretrain objective {self.objective!r}: choose one of {', '.join(objective_names(pretrainable=True))}"
            )

    def _converge_settings(self) -> None:
        """Trainer settings of a run to convergence: keep the best checkpoint, a plateau-driven schedule."""
        if self.convergence_patience < 2:
            raise RelearnError(f"convergence_patience must be >= 2 evaluations, got {self.convergence_patience}")
        if not 0 <= self.convergence_window < 1:
            raise RelearnError(f"convergence_window must be in [0, 1), got {self.convergence_window}")
        if not 0 <= self.convergence_threshold < 0.5:
            raise RelearnError(f"convergence_threshold must be in [0, 0.5), got {self.convergence_threshold}")
        if str(self.eval_strategy) not in ("steps", "IntervalStrategy.STEPS"):
            raise RelearnError("until_converged judges the eval curve: use eval_strategy steps (and eval_steps)")
        self.load_best_model_at_end = True
        self.restore_callback_states_from_checkpoint = True  # a resumed run judges the same convergence window
        self.metric_for_best_model = "eval_loss"
        self.greater_is_better = False
        self.save_strategy = "steps"
        self.save_steps = self.eval_steps
        self.save_total_limit = self.save_total_limit or 1  # with load_best the Trainer keeps best + latest
        if str(self.lr_scheduler_type) in ("linear", "SchedulerType.LINEAR"):
            # the default linear decay would end at max_steps, a cap here: halve the rate on each plateau instead,
            # so that by the time the stop rule fires the rate has been cut several times ("ends low")
            self.lr_scheduler_type = "reduce_lr_on_plateau"
            self.lr_scheduler_kwargs = self.lr_scheduler_kwargs or {
                "factor": 0.5,
                # halve after 5 evaluations in a row without a 0.2% gain: one noisy evaluation (a few tenths of a
                # percent) must not anneal a run early (patience 1 left one seed's base 4% worse than its siblings)
                "patience": 4,
                "threshold": 0.002,
                "threshold_mode": "rel",
            }
