"""Training objectives: one object per objective, found by name in one registry.

An objective owns what its rows hold, how they are batched, its loss when it is not the model's own, and what the
rest of the package must know about it (is there a baseline loss, do logits predict the next token, which Hub task a
card declares). Nothing outside this module compares an objective's name. Importing it loads neither torch nor
transformers, so reports and cards can read the registry.

Adding one (see CONTRIBUTING.md): subclass :class:`Objective` in your own module and call
:func:`register_objective` with an instance; ``--objective NAME`` then works everywhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import RelearnError


class Objective:
    """What one objective means to the package. Subclasses set the class attributes and override what differs.

    The defaults describe an objective whose rows carry token-level ``labels`` and whose loss is the model's own.
    """

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown in ``--help`` and errors
    card_task: ClassVar[str] = "text-generation"  # the Hub task a model card files its eval results under
    pipeline_tag: ClassVar[str | None] = None  # the pipeline a model card declares (None: no pipeline serves it)
    auto_class: ClassVar[str] = "AutoModel"  # the transformers class a card's usage snippet loads the model with
    shifts_labels: ClassVar[bool] = False  # logits at position t predict the label at t+1 (a causal LM's loss)
    masks_each_batch: ClassVar[bool] = False  # training rows are masked afresh by the collator in every batch
    compares_with_unigram: ClassVar[bool] = False  # a base no better than a unigram model of its data is warned
    pretrainable: ClassVar[bool] = True  # ``hf-relearn pretrain`` can train a base with it
    # the intact model itself is the target (a teacher): there are no labels and the intact model's loss is 0, so
    # recovery is judged against the damage the reset did, task metrics do not apply and the model is copied whole
    distills: ClassVar[bool] = False

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``RelearnError`` when ``tokenizer`` cannot make this objective's rows."""

    def columns(self, blocks: np.ndarray, tokenizer: Any, seed: int, options: Any) -> dict[str, np.ndarray]:
        """The training columns made from ``blocks`` (rows of token ids); ``options``: the ``DataArguments``.

        Default: ``input_ids`` and ``attention_mask`` (all ones), and ``labels`` equal to ``input_ids``.
        """
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()}

    def held_out_columns(self, blocks: np.ndarray, tokenizer: Any, seed: int, options: Any) -> dict[str, np.ndarray]:
        """The columns of selection and evaluation rows: fixed, so that every measurement sees the same rows.
        Default: :meth:`columns` with ``seed + 1``."""
        return self.columns(blocks, tokenizer, seed + 1, options)

    def collator(self, tokenizer: Any):
        """The data collator for this objective's rows (default: transformers' ``default_data_collator``)."""
        from transformers import default_data_collator

        return default_data_collator

    def loss(self, trainer: Any, model: Any, inputs: dict, rows: Any = None):
        """The training and evaluation loss of ``model`` on ``inputs``, or None for the model's own loss.
        ``trainer``: the ``RelearnTrainer`` (its ``args`` carry this objective's options); ``rows``: the evaluation
        rows' indices, or None for training batches."""
        return None


class CausalLM(Objective):
    name = "clm"
    description = "causal language modelling: predict each next token"
    card_task = pipeline_tag = "text-generation"
    auto_class = "AutoModelForCausalLM"
    shifts_labels = True
    compares_with_unigram = True


class MaskedLM(Objective):
    name = "mlm"
    description = "masked language modelling: 15% of the tokens masked, predict them"
    card_task = pipeline_tag = "fill-mask"
    auto_class = "AutoModelForMaskedLM"
    masks_each_batch = True
    compares_with_unigram = True

    def check_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer.mask_token is None:
            raise RelearnError(
                f"objective 'mlm' needs a tokenizer with a mask token; {type(tokenizer).__name__} "
                f"({tokenizer.name_or_path or 'unnamed'}) has none (use --tokenizer bytes or an MLM model's tokenizer)"
            )

    def columns(self, blocks, tokenizer, seed, options):
        # masked by the collator in every batch
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}

    def held_out_columns(self, blocks, tokenizer, seed, options):
        from .collators import mask_once

        masked, labels = mask_once(blocks, tokenizer, seed)  # masked once, from a seed: the same rows every time
        return {"input_ids": masked, "attention_mask": np.ones_like(masked), "labels": labels}

    def collator(self, tokenizer):
        from .collators import MaskedLMCollator

        return MaskedLMCollator(tokenizer)


class Seq2Seq(Objective):
    name = "seq2seq"
    description = (
        "encoder-decoder: the first part of a block in, the rest out (or denoise: corrupted block in, block out)"
    )
    card_task = pipeline_tag = "text2text-generation"
    auto_class = "AutoModelForSeq2SeqLM"

    def columns(self, blocks, tokenizer, seed, options):
        ones = np.ones_like(blocks)
        if options.seq2seq_task == "denoise":
            from .collators import denoise_source, mask_token_id

            source = denoise_source(blocks, mask_token_id(tokenizer), seed)
            return {"input_ids": source, "attention_mask": ones, "labels": blocks.copy()}
        target = options.seq2seq_target_tokens
        half = blocks.shape[1] // 2 if target is None else blocks.shape[1] - target
        return {"input_ids": blocks[:, :half], "attention_mask": ones[:, :half], "labels": blocks[:, half:]}


class Distill(Objective):
    name = "distill"
    description = "match the intact model's outputs (a frozen copy of it, the teacher); for models without a head too"
    card_task, pipeline_tag = "feature-extraction", None
    pretrainable = False  # the teacher is the model before surgery: there is nothing to distill from before it
    distills = True

    def columns(self, blocks, tokenizer, seed, options):
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}

    def loss(self, trainer, model, inputs, rows=None):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        teacher_out = trainer.teacher.outputs(inputs, rows)
        student_out = model(**inputs)
        return distill_loss(student_out, teacher_out, inputs.get("attention_mask"), trainer.args.distill_temperature)


def distill_loss(student_out, teacher_out, mask, temperature: float = 1.0):
    """The distill objective per token, averaged over non-padding tokens: KL(teacher || student) of the softmax at
    ``temperature`` (scaled by T^2, so gradients keep their size), or, for a model without a head, the MSE of the
    last hidden states."""
    import torch.nn.functional as F

    if getattr(student_out, "logits", None) is not None:
        t = temperature
        log_p_student = F.log_softmax(student_out.logits.float() / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
        per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * t * t
    else:  # a model without a head (sentence encoders): match the last hidden states
        per_token = (student_out.last_hidden_state.float() - teacher_out.last_hidden_state.float()).pow(2).mean(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Make ``objective`` available under ``objective.name`` (to ``--objective``, datasets, trainer, cards).
    Refuses a name already taken by another objective; returns the objective."""
    taken = OBJECTIVES.get(objective.name)
    if taken is not None and type(taken) is not type(objective):
        raise RelearnError(f"objective {objective.name!r} is already registered ({type(taken).__name__})")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``; a ``RelearnError`` naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise RelearnError(f"objective {name!r} unknown; choose one of {', '.join(OBJECTIVES)}") from None


def described_objective(name: str) -> Objective:
    """The objective ``name`` as far as files written with it need (cards, reports): the registered one, or the
    defaults of :class:`Objective` for a name registered only in the process that wrote them."""
    return OBJECTIVES.get(name) or Objective()


def objective_names(pretrainable: bool = False) -> list[str]:
    """The registered objectives' names, in registration order (only those a base can be trained with, if asked)."""
    return [name for name, o in OBJECTIVES.items() if o.pretrainable or not pretrainable]


for _builtin in (CausalLM(), MaskedLM(), Seq2Seq(), Distill()):
    register_objective(_builtin)
