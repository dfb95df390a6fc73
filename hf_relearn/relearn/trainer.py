"""RelearnTrainer: baseline eval -> reset a block -> eval -> re-learn with the rest frozen -> stop when recovered.

It stays a normal ``Trainer`` (callbacks, checkpoints, resuming, ``report_to``, ``push_to_hub`` as usual). It adds:

* ``train()`` first measures the intact model (baseline), then applies the surgery and the freezing (before the
  optimizer exists; under FSDP the baseline evaluation has sharded the model already), measures again, and trains;
* ``RecoveryCallback`` stops once the metric, smoothed over ``recovery_window`` evaluations, is back within the
  tolerance (held for ``patience`` evaluations);
* at the end the frozen tensors are proven bit-identical and ``relearn_result.json`` is written (the results
  contract in ``docs/results-contract.md``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path

import torch
from transformers import Trainer

from ..data.objectives import get_objective
from ..errors import RelearnError
from ..hub.cards import relearn_card
from ..hub.plots import plot_curve
from ..model.arms import apply_trainable, digest_int, normalised_fingerprint
from ..model.blocks import BlockMap
from ..model.sharding import numel
from ..model.surgery import SurgeryReport, reset
from ..storage import CURVE_FILE, RESULT_FILE, versions, write_json_atomic
from .arguments import (
    RelearnArguments,
)
from .callbacks import ExamplesSeen, RecoveryCallback
from .metrics import (
    Teacher,
    argmax_logits,
    build_compute_metrics,
    count_shifted_targets,
    eval_row_losses,
    standard_error,
)
from .original_curve import published_curve
from .prefix_cache import PrefixCache
from .prefix_plan import ROW_COLUMN, RowCollator, with_row_index
from .result import (
    RelearnResult,
    read_original_run,
    recovery_figures,
    recovery_threshold,
    unigram_warning,
)
from .trainer_prefix import PrefixCacheMixin
from .trainer_swap import SwapMixin

logger = logging.getLogger("hf_relearn")

ROW_LOSSES = "eval_row_losses"  # the intact model's per-row losses, kept in the measured baseline (never written)


# ----------------------------------------------------------------------------------------------- trainer


class RelearnTrainer(SwapMixin, PrefixCacheMixin, Trainer):
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
        baseline: dict[str, float] | None = None,
        teacher: Teacher | None = None,
        **kwargs,
    ):
        if not isinstance(args, RelearnArguments):
            raise RelearnError("RelearnTrainer needs RelearnArguments (a TrainingArguments subclass)")
        self.model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        # the run's one block map: surgery, arms and the prefix plan all read it; rebuilt only after an encoder swap
        self.block_map = BlockMap(model)
        self.block = self.block_map.resolve(args.block)  # bad names fail before anything runs
        self.objective = get_objective(args.objective)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if args.metrics and kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = build_compute_metrics(args.metrics, args.objective)
            kwargs.setdefault("preprocess_logits_for_metrics", argmax_logits)
        callbacks.append(ExamplesSeen())
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        count_shifted_targets(self)
        args.refuse_when_sharded(self.is_fsdp_enabled or self.is_deepspeed_enabled)
        if self.objective.distills:
            self.label_names = []
        self.teacher: Teacher | None = teacher  # distill: the intact model, made in prepare_relearn unless given
        self.surgery: SurgeryReport | None = None
        # the intact model's metrics, when the caller measured them already on the same data (a study, a probe)
        self.measured: dict[str, dict] = {"baseline": dict(baseline)} if baseline else {}
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
        # the global RNG is left as it was: iterating a DataLoader draws a seed from it, so a run handed its baseline
        # (a study's later runs) would otherwise train with other dropout masks than one that measured it
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
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

    def _row_losses(self) -> torch.Tensor:
        return eval_row_losses(self, causal=self.objective.shifts_labels, skip=(ROW_COLUMN,))

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
        if args.original_checkpoints:  # every revision checked and evaluated before any surgery or training
            self.original_curve = published_curve(self.model, self.eval_dataset, self.data_collator, args)
        distills = self.objective.distills
        if distills and self.teacher is None:
            self.teacher = Teacher(copy.deepcopy(self.model))
        if not distills and "baseline" not in self.measured:
            self.measured["baseline"] = self._measure("relearn: baseline (intact model)")
        if not distills and ROW_LOSSES not in self.measured["baseline"]:
            # kept (not written out) so that the final model's rows can be paired with these at the end
            self.measured["baseline"][ROW_LOSSES] = self._row_losses()
        if not distills and self.measured["baseline"].get("eval_loss_se") is None:
            self.measured["baseline"]["eval_loss_se"] = standard_error(self.measured["baseline"][ROW_LOSSES])
        if args.swap_encoder:
            self._swap_encoder()
        else:
            self.surgery = reset(
                self.model,
                self.block,
                init=args.init,
                seed=args.reset_seed,
                allow_shared=args.allow_shared,
                block_map=self.block_map,
            )
            self._apply_trainable()
        self._setup_prefix_cache()
        if distills and not isinstance(self.data_collator, RowCollator):
            # the teacher keeps its outputs per evaluation row: batches carry their rows' indices without a cache too
            self.eval_dataset = with_row_index(self.eval_dataset)
            self.data_collator = RowCollator(self.data_collator)
        self._frozen_before = normalised_fingerprint(self.model)
        self._reset_digest = digest_int(
            [self._frozen_before[n] for n in sorted(self.surgery.tensors) if n in self._frozen_before]
        )
        self.measured["after_reset"] = self._measure("relearn: after reset")
        if distills:  # the teacher is the intact model: its distill loss is 0
            self.measured["baseline"] = {args.metric_key: 0.0, "eval_loss": 0.0}
        baseline = self.measured["baseline"][args.metric_key]
        after = self.measured["after_reset"][args.metric_key]
        self.threshold = recovery_threshold(baseline, after, args)
        self.data_warnings = self._unigram_warning(baseline)
        self.recovery = RecoveryCallback.for_run(args, self.threshold, start=after)
        self.add_callback(self.recovery)

    def _unigram_warning(self, baseline: float) -> list[str]:
        """A base no better than a unigram model of its data learned nothing a reset could remove."""
        if not self.objective.compares_with_unigram or self.args.metric_key != "eval_loss":
            return []
        from ..data.datasets import unigram_loss

        vocab = self.model.get_input_embeddings().num_embeddings
        return unigram_warning(baseline, unigram_loss(self.train_dataset, self.eval_dataset, vocab))

    def _apply_trainable(self) -> None:
        args = self.args
        model, self._trainable_names = apply_trainable(
            self.model, self.block, args.trainable, args.lora_r, self.block_map
        )
        self.model = self.model_wrapped = model

    # ---------------------------------------------------------------- losses
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ROW_COLUMN, None)
        split = "train" if model.training else "eval"
        serving = rows is not None and self.prefix_cache is not None and split in self._prefix_splits
        with self._serving_prefix(inputs, rows, split) if serving else contextlib.nullcontext():
            loss = self.objective.loss(self, model, inputs, rows if split == "eval" else None)
            if loss is not None:  # the objective's own loss: there are no outputs to return beside it
                return (loss, None) if return_outputs else loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.objective.distills:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # no labels: the Trainer would not compute a loss, so the objective's is the evaluation's only output
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
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
            self.release_prefix_cache()
            self.result = self._build_result(stopped="nan")
            self._write_result()
            last = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been saved"
            raise RelearnError(
                f"{err}: training stopped ({keep}; relearn_result.json records the run). "
                "Lower the learning rate or raise max_grad_norm clipping."
            ) from None
        finally:
            self.release_prefix_cache()
        if self.recovery.recovered_step is None:
            stopped = "max_steps"
        if ROW_LOSSES in self.measured["baseline"]:
            # the recovery compares two models on the same rows: its noise is that of the per-row differences
            change = self._row_losses() - self.measured["baseline"][ROW_LOSSES]
            self.measured["final_minus_baseline_se"] = standard_error(change)
        self.result = self._build_result(stopped=stopped)
        self._write_result()
        if not self.result.frozen_unchanged:  # gathered: a tensor that moved on any process refuses the run
            where = ", ".join(self.result.frozen_changed[:10]) or "on another process (see its log)"
            raise RelearnError(f"frozen tensors changed during training: {where}; relearn_result.json records it")
        return output

    def save_final(self, output_dir: str | None = None) -> None:
        """Save the re-learned model as plain safetensors (a LoRA arm is merged first) and its tokenizer. Under FSDP or
        DeepSpeed every process must call it: the Trainer gathers the shards and the main process writes them."""
        out = output_dir or self.args.output_dir
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            self.save_model(out)
            return
        reason = self._stitch_unsaveable()
        if reason:  # the result stands; a model that would load back as another one is not written
            logger.warning("the re-learned model was not saved: %s", reason)
            return
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
        args, key = self.args, self.args.metric_key
        base, after = self.measured["baseline"], self.measured["after_reset"]
        evals = [e for e in self.state.log_history if key in e]
        moved, frozen_unchanged, same_reset = self._frozen_verdict()
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
            higher_is_better=args.higher_is_better,
            patience=args.patience,
            recovery_window=args.recovery_window,
            baseline_eval_loss=base.get("eval_loss"),
            eval_loss_se=base.get("eval_loss_se"),
            final_minus_baseline_se=self.measured.get("final_minus_baseline_se"),
            base_selected_on=self._original().get("selected_on"),
            after_reset_eval_loss=after.get("eval_loss"),
            final_eval_loss=evals[-1].get("eval_loss") if evals else after.get("eval_loss"),
            baseline_metric=base[key],
            after_reset_metric=after[key],
            recovery_threshold=self.threshold,
            frozen_unchanged=frozen_unchanged,
            frozen_changed=moved,
            trainable_parameters=sum(numel(p) for p in self.model.parameters() if p.requires_grad),
            total_parameters=sum(numel(p) for p in self.model.parameters()),
            steps_trained=self.state.global_step,
            train_curve=[[e["step"], e["loss"]] for e in self.state.log_history if "loss" in e],
            world_size=self.args.world_size,
            reset_identical_across_ranks=same_reset,
            surgery=self.surgery.to_dict(),
            versions=versions(),
            stopped=stopped,
            prefix_cache=dict(self.prefix_cache_info),
            **self._recovery_figures(evals),
        )

    def _original(self) -> dict:
        """The base run's budget, curve, warnings and what chose it (empty without ``original_run``)."""
        if not hasattr(self, "_original_run"):
            self._original_run = read_original_run(self.args.original_run) if self.args.original_run else {}
        return self._original_run

    def _recovery_figures(self, evals: list[dict]) -> dict:
        return recovery_figures(
            self.args,
            evals,
            self.measured,
            self.threshold,
            self._original(),
            self.data_warnings,
            getattr(self, "original_curve", None),
        )

    def _frozen_verdict(self) -> tuple[list[str], bool, bool]:
        """(frozen tensors that moved here, whether none moved on any process, whether every process's reset block
        hashed the same). Every rank checks its own copy; the verdicts are gathered so the result speaks for all."""
        trainable = set(self._trainable_names)
        moved = sorted(
            n
            for n, h in normalised_fingerprint(self.model).items()
            if n not in trainable and self._frozen_before.get(n) != h
        )
        device = self.args.device
        moved_counts = self.accelerator.gather(torch.tensor([len(moved)], device=device)).tolist()
        digests = self.accelerator.gather(torch.tensor([self._reset_digest], device=device)).tolist()
        return moved, not any(moved_counts), len(set(digests)) == 1


class _Diverged(RuntimeError):
    pass
