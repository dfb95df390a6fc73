"""The frozen-prefix cache's wiring into ``RelearnTrainer`` (a mixin): whether a run may use one, attaching it after
surgery, serving batches through it, and releasing it. The cache itself lives in ``prefix_cache.py``."""

from __future__ import annotations

from ..data.objectives import get_objective
from ..errors import RelearnError
from ..model.arm_registry import get_arm
from .prefix_cache import PrefixCache
from .prefix_plan import ROW_COLUMN, RowCollator, active_dropout, plan_prefix, with_row_index


class PrefixCacheMixin:
    """Methods of ``RelearnTrainer`` (a ``Trainer``) that plan, attach, serve and release the frozen-prefix cache."""

    def _prefix_cache_refusal(self) -> tuple[str | None, set[str]]:
        """Why no prefix cache can serve this run (None if one can), and the splits it may serve."""
        args = self.args
        if args.swap_encoder:
            return "an encoder swap changes the encoder itself", set()
        if not get_arm(args.trainable).only_the_block:
            return f"trainable={args.trainable}: layers below the block train too", set()
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return "FSDP / DeepSpeed shard the frozen layers, so they cannot be run alone to fill the cache", set()
        if args.gradient_checkpointing:
            return "gradient checkpointing re-runs layers in backward; use one or the other", set()
        # training batches masked at random each time (mlm) never repeat: only evaluation rows do
        splits = {"eval"} if get_objective(args.objective).masks_each_batch else {"train", "eval"}
        return None, splits

    def _setup_prefix_cache(self) -> None:
        """Plan the frozen-prefix cache after surgery and freezing; attach it, or record why not (see README)."""
        args = self.args
        if args.prefix_cache == "false":
            self.prefix_cache_info = {"enabled": False, "reason": "prefix_cache=false"}
            return
        reason, splits = self._prefix_cache_refusal()
        plan, train_off = None, None
        if reason is None:
            plan, reason = plan_prefix(self.model, self._trainable_names, block_map=self.block_map)
            reason = reason or None
        if reason is None and args.prefix_cache == "auto":
            dropout = active_dropout(self.model, plan.skipped)
            if dropout and "train" in splits:
                # evaluation runs in eval mode anyway, so its rows stay exact; training rows would lose the dropout
                splits = splits - {"train"}
                train_off = (
                    f"dropout is active in the frozen layers ({', '.join(dropout[:3])}{', ...' if len(dropout) > 3 else ''}"
                    "): cached training rows would run them in eval mode; set prefix_cache=true to accept that"
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
        if train_off:
            self.prefix_cache_info["train_rows"] = train_off

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ROW_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_COLUMN]

    def release_prefix_cache(self) -> None:
        """Detach this run's frozen-prefix cache (a shared one stays filled for the next run) or close its own, and
        record what it served in ``prefix_cache_info``. ``train()`` calls it; so must a caller that runs
        ``prepare_relearn()`` alone. Idempotent."""
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

    def _serving_prefix(self, inputs: dict, rows, split: str):
        """A context in which the skipped frozen layers return their cached outputs for ``rows``."""
        dataset = self.train_dataset if split == "train" else self.eval_dataset
        # a run with max_steps meets at most that many batches of training rows: size the cache for those
        args = self.args
        meets = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        capacity = meets if split == "train" and args.max_steps > 0 else None
        return self.prefix_cache.serving(inputs, rows, split, len(dataset), capacity)
