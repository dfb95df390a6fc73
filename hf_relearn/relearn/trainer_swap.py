"""An encoder swap's wiring into ``RelearnTrainer`` (a mixin): the swap surgery (with its stitch, fitted on training
rows), the warm-up's later-unfrozen parameters in the optimizer, and what may be saved. The swap itself lives in
``model/swap.py``, the stitch in ``model/stitch.py``."""

from __future__ import annotations

from ..errors import RelearnError
from .arguments import check_swap_warmup
from .callbacks import SwapWarmupCallback


class SwapMixin:
    """Methods of ``RelearnTrainer`` (a ``Trainer``) for runs with ``swap_encoder``."""

    def _swap_encoder(self) -> None:
        """The encoder-swap surgery: a new encoder, the decoder adapted to its width (or a stitch fitted to it), the
        cross-attention reset or kept."""
        from ..model.blocks import Block
        from ..model.swap import load_encoder, swap_encoder

        args = self.args
        encoder = load_encoder(args.swap_encoder, args.swap_encoder_overrides, seed=args.reset_seed)
        report = swap_encoder(
            self.model,
            encoder.to(self.model.device),
            args.swap_cross_attention,
            args.swap_freeze,
            args.reset_seed,
            block_map=self.block_map,
            stitch=args.swap_stitch,
            stitch_batches=self._stitch_batches() if args.swap_stitch else None,
        )
        self.block_map = report.block_map  # the swap changed the model and built its one new map
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

    def _stitch_batches(self) -> list[dict]:
        """The first ``swap_stitch_rows`` training rows, collated in evaluation-sized batches: the stitch's sample."""
        rows = self.args.swap_stitch_rows
        if not hasattr(self.train_dataset, "__len__"):
            raise RelearnError("a stitch is fitted on the first training rows: the training set must have a length")
        take = [self.train_dataset[i] for i in range(min(rows, len(self.train_dataset)))]
        size = self.args.per_device_eval_batch_size
        return [self.data_collator(take[i : i + size]) for i in range(0, len(take), size)]

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

    def _stitch_unsaveable(self) -> str | None:
        """Why a stitched model is not saved (None without a stitch): ``save_pretrained`` keeps the stitch's tensors
        but not the hook that applies it, so the folder would load back as another model."""
        from ..model.stitch import is_stitched
        from ..model.swap import unsaveable_reason

        if self.surgery is None or not is_stitched(self.model):
            return None
        return unsaveable_reason(self.model, self.surgery)
