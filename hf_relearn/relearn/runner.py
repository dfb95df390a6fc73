"""The two runs a user starts: ``pretrain`` a base model with a known budget, and ``relearn`` one block of it.

Both are thin: they load the model and the data, hand them to a (Relearn)Trainer and save what it made. The CLI
and the study call these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from pathlib import Path

from transformers import Trainer

from ..data.datasets import DataArguments, build_datasets, build_splits
from ..data.tokenization import get_tokenizer
from ..errors import RelearnError
from ..model.modeling import is_config_name, parse_overrides
from ..stats.caveats import codes_of
from ..storage import DATA_FILE, RUN_FILE, versions, write_json_atomic
from .arguments import ModelArguments, PretrainArguments, RelearnArguments
from .callbacks import ConsoleCallback, ConvergenceCallback
from .metrics import count_shifted_targets
from .prefix_cache import PrefixCache
from .result import RelearnResult, base_run_warnings, selected_on
from .trainer import RelearnTrainer


def _tokenizer_overrides(tokenizer, model_spec: str, objective: str) -> dict:
    """Config fields a model built from config needs to match its tokenizer (vocab size, special ids)."""
    from ..model.modeling import build_config

    config = build_config(model_spec)
    out = {"vocab_size": len(tokenizer)}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None and hasattr(config, key):
            out[key] = value
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_start_token_id"] = tokenizer.pad_token_id
    return out


def _check_positions(model, block_size: int, objective: str) -> None:
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings"):
        limit = getattr(cfg, key, None)
        if isinstance(limit, int) and block_size > limit:
            raise RelearnError(
                f"block_size {block_size} exceeds the model's {key}={limit}: lower --block_size or raise it "
                f"(--config-overrides {key}=...)"
            )


def _quiet(trainer: Trainer) -> None:
    """No per-step log lines on the console (a study shows one progress bar and one line per run instead)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


SELECTION_KEY = "eval_selection_loss"  # a base run's loss on its selection split (the evaluation split's is eval_loss)


class SelectionTrainer(Trainer):
    """A ``Trainer`` that also evaluates a selection split at every evaluation and reports it as
    ``eval_selection_loss`` beside ``eval_loss`` (the evaluation split), in the same metrics and log entry: the
    checkpoint choice, the plateau schedule and the convergence rule read the former, baselines the latter."""

    def __init__(self, *args, selection_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        count_shifted_targets(self)
        self.selection_dataset = selection_dataset

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.selection_dataset is not None and metric_key_prefix == "eval":
            loader = self.get_eval_dataloader(self.selection_dataset)
            selection = super().evaluation_loop(loader, "selection", True, ignore_keys, "eval_selection")
            out.metrics[SELECTION_KEY] = selection.metrics[SELECTION_KEY]
        return out


def pretrain(
    model_args: ModelArguments, data_args: DataArguments, args: PretrainArguments, quiet: bool = False
) -> dict:
    """Train a base model from config with a known budget; save model, tokenizer, trainer_state.json, run info.

    Returns the run info (also written to ``OUTPUT_DIR/hf_relearn_run.json``): final validation loss, steps,
    tokens, and warnings for an under-trained or overfit base.
    """
    tokenizer = get_tokenizer(data_args.tokenizer, model_args.model)
    overrides = parse_overrides(model_args.config_overrides)
    if is_config_name(model_args.model):
        overrides = {**_tokenizer_overrides(tokenizer, model_args.model, args.objective), **overrides}
    model = model_args.load(overrides)
    _check_positions(model, data_args.block_size, args.objective)
    splits = build_splits(data_args, tokenizer, args.objective)
    train, evals, collator = splits.train, splits.evaluation, splits.collator
    if splits.selection is not None and args.until_converged:
        args.metric_for_best_model = SELECTION_KEY  # the checkpoint is chosen on rows no baseline is measured on
    convergence = (
        ConvergenceCallback(args.convergence_patience, args.convergence_threshold, args.convergence_window)
        if args.until_converged
        else None
    )
    trainer = SelectionTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        selection_dataset=splits.selection,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[convergence] if convergence else None,
    )
    if quiet:
        _quiet(trainer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if not args.until_converged and not any(
        e.get("step") == trainer.state.global_step and "eval_loss" in e for e in trainer.state.log_history
    ):
        trainer.evaluate()  # (a converged run ends on an evaluation; its kept model is the best one evaluated)
    out = Path(args.output_dir)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    trainer.save_state()
    # a resumed run replaces the callback with one rebuilt from its checkpoint: read the live one
    live = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ConvergenceCallback)), None)
    info = _run_info(trainer, model_args, data_args, args, splits, live)
    if trainer.is_world_process_zero():
        write_json_atomic(out / RUN_FILE, info)
        if args.until_converged:  # the checkpoints only served to keep the best model; it is saved in out now
            for checkpoint in out.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return info


def _run_info(trainer, model_args, data_args, args, splits, convergence) -> dict:
    """What a base run leaves for the runs measured against it: budget, curve (evaluation split), selection curve,
    what chose the kept model, stop reason, warnings (judged on the curve that chose)."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    curve = [(e["step"], e["eval_loss"]) for e in evals]
    selection_curve = [(e["step"], e[SELECTION_KEY]) for e in evals if SELECTION_KEY in e]
    kept = trainer.state.best_global_step if args.until_converged else trainer.state.global_step
    kept_eval = next((e for e in evals if e["step"] == kept), evals[-1])
    converged = bool(convergence and convergence.converged)
    if args.until_converged:
        stopped = "converged" if converged else "max_steps"
    else:
        stopped = "max_steps"
    judged = selection_curve or curve
    warnings = base_run_warnings(
        judged, trainer.state.global_step, converged=converged, kept_best=args.until_converged
    )
    info = {
        "kind": "pretrain",
        "model_args": dataclasses.asdict(model_args),
        "data_args": dataclasses.asdict(data_args),
        "objective": args.objective,
        "steps": trainer.state.global_step,
        "tokens": trainer.state.num_input_tokens_seen,
        "budget_steps": kept,
        "budget_tokens": kept_eval.get("num_input_tokens_seen") or trainer.state.num_input_tokens_seen,
        "stopped": stopped,
        "until_converged": args.until_converged,
        "convergence_rule": (
            {
                "patience": args.convergence_patience,
                "threshold": args.convergence_threshold,
                "window": args.convergence_window,
            }
            if args.until_converged
            else None
        ),
        "train_examples": len(splits.train),
        "eval_examples": len(splits.evaluation),
        "selection_examples": len(splits.selection) if splits.selection is not None else 0,
        "final_eval_loss": kept_eval["eval_loss"],
        "best_eval_loss": min(v for _, v in curve),
        "curve": curve,
        "selection_curve": selection_curve or None,
        "warnings": warnings,
        "warning_codes": codes_of(warnings),
        "versions": versions(),
    }
    info["selected_on"] = selected_on(info)
    return info


def inherit_data_args(data_args: DataArguments, original_run: str | None) -> DataArguments:
    """The data settings of a run measured against ``original_run``: with no data source given, the base run's own
    (so the validation set is the same); always the base's selection split, so that the evaluation rows are ones
    that took no part in choosing the base (a base made before the split existed had none: 0)."""
    if original_run is None:
        return data_args
    run_file = Path(original_run) / RUN_FILE
    if not run_file.exists():
        return data_args
    saved = json.loads(run_file.read_text()).get("data_args", {})
    split = {"selection_fraction": saved.get("selection_fraction", 0.0)}
    if data_args.train_file or data_args.dataset_name:
        return dataclasses.replace(data_args, **split)
    defaults = DataArguments()
    merged = {
        f.name: getattr(data_args, f.name)
        if getattr(data_args, f.name) != getattr(defaults, f.name)
        else saved.get(f.name, getattr(defaults, f.name))
        for f in dataclasses.fields(DataArguments)
    }
    return DataArguments(**{**merged, **split})


def _cost_line(args: RelearnArguments, train_rows: int, eval_rows: int) -> str:
    """What the run will cost before it starts: steps, evaluations and their rows, and the flag to change where
    evaluation would outweigh training."""
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * train_rows / batch)
    every = args.eval_steps if args.eval_steps >= 1 else max(1, int(args.eval_steps * steps))
    evaluations = steps // int(every)
    line = (
        f"relearn {args.block}: at most {steps} steps x {batch} examples ({steps * batch:,} rows, stops at recovery); "
        f"{evaluations} evaluations x {eval_rows} rows ({evaluations * eval_rows:,} rows)"
    )
    if evaluations * eval_rows > steps * batch:
        line += "; evaluation outweighs training: raise --eval_steps or lower --max_eval_samples"
    return line


def relearn(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: RelearnArguments,
    callbacks=None,
    quiet: bool = False,
    prefix_cache: PrefixCache | None = None,
    console: bool = False,
    baseline: dict[str, float] | None = None,
) -> RelearnResult:
    """Run one re-learn: load, reset ``args.block``, train until recovered; returns (and writes) the result.

    ``prefix_cache``: a cache shared with other runs over the same base and data (a study); by default the run
    makes its own where ``args.prefix_cache`` allows one. ``baseline``: the intact model's metrics on the same data
    and evaluation settings, measured by an earlier run (a study's first run of this base), instead of measuring again.
    """
    data_args = inherit_data_args(data_args, args.original_run)
    tokenizer = get_tokenizer(data_args.tokenizer, model_args.model)
    model = model_args.load()
    _check_positions(model, data_args.block_size, args.objective)
    objective = args.objective
    train, evals, collator = build_datasets(data_args, tokenizer, objective)
    out = Path(args.output_dir)
    fresh = not out.exists()  # the Trainer creates output_dir; a refused run removes it again if it made it
    # surgery first (train() would do it anyway): a run refused by the trainer, its reset or its prefix cache leaves
    # no output folder behind
    try:
        trainer = RelearnTrainer(
            model=model,
            args=args,
            model_name=model_args.model,
            train_dataset=train,
            eval_dataset=evals,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=callbacks,
            prefix_cache=prefix_cache,
            baseline=baseline,
        )
        if quiet:
            _quiet(trainer)
        trainer.prepare_relearn()
    except RelearnError:
        if fresh and out.is_dir() and not any(out.iterdir()):
            with contextlib.suppress(OSError):  # another process of the launch may have removed it first
                out.rmdir()
        raise
    if trainer.is_world_process_zero():
        write_json_atomic(out / DATA_FILE, dataclasses.asdict(data_args))
    if console:  # one bar and one line per evaluation instead of the Trainer's dictionaries and nested bars
        _quiet(trainer)
        trainer.add_callback(ConsoleCallback(args.metric_key, trainer.threshold, args.higher_is_better))
        if trainer.is_world_process_zero():
            print(_cost_line(args, len(train), len(evals)))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if args.save_final_model:
        trainer.save_final()
    if args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()  # no process leaves while another still writes
    return trainer.result
