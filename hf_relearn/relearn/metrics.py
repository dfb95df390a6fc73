"""Task metrics for evaluation (``--metrics``): built-in token accuracy, or ``evaluate`` modules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..data.objectives import get_objective
from ..errors import RelearnError


class Teacher:
    """The distill objective's teacher (the model before surgery, frozen) and its outputs for evaluation rows.

    ``outputs(inputs, rows)`` equals ``model(**inputs)`` in what ``distill_loss`` reads. Rows given (evaluation rows,
    the same every time) are computed once and kept on the host, up to ``max_bytes``; a row of another length, or
    rows beyond the budget, are computed again. One ``Teacher`` may serve several runs over the same rows.
    """

    def __init__(self, model: torch.nn.Module, max_bytes: int = 1 << 30) -> None:
        self.model = model.eval().requires_grad_(False)
        self.max_bytes = max_bytes
        self.rows: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.field = "logits"

    def outputs(self, inputs: dict, rows: torch.Tensor | None = None):
        with torch.no_grad():
            length = inputs["input_ids"].shape[1]
            rows = rows.tolist() if rows is not None else []
            if not rows or any(r not in self.rows or self.rows[r].shape[0] != length for r in rows):
                out = self.model(**inputs)
                self.field = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
                value = getattr(out, self.field)
                size = value.numel() * value.element_size()
                replaced = sum(self.rows[r].numel() * self.rows[r].element_size() for r in rows if r in self.rows)
                if rows and self.bytes - replaced + size <= self.max_bytes:
                    self.bytes += size - replaced  # rows seen before at another length are replaced, not added
                    self.rows.update(zip(rows, value.detach().cpu(), strict=True))
                return out
            value = torch.stack([self.rows[r] for r in rows]).to(inputs["input_ids"].device)
            return SimpleNamespace(**{self.field: value})


def argmax_logits(logits, labels):
    """Keep only predicted ids, not the full logits, between evaluation batches (memory)."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def build_compute_metrics(names: list[str], objective: str):
    """A ``compute_metrics`` over predicted vs reference tokens (positions with label -100 left out).

    ``accuracy`` is built in (token accuracy); any other name is loaded with ``evaluate.load`` (a local module folder
    or file works offline; a Hub name needs the network) and called as ``compute(predictions=..., references=...)``.
    For an objective that shifts labels (``clm``) the prediction at position t is compared with the label at t+1, as
    the model's loss does.
    """
    spec = get_objective(objective)
    if spec.distills:
        raise RelearnError(
            f"metrics need labels; the {objective} objective has none (its recovery metric is the loss)"
        )
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
        if spec.shifts_labels:
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


def row_losses(model: torch.nn.Module, batches, causal: bool) -> torch.Tensor:
    """The cross-entropy of each row over its labelled tokens (labels -100 ignored), one value per row in batch order;
    ``causal``: logits at position t predict the label at t+1, as a causal LM's own loss shifts them.

    ``batches``: dicts of model inputs with ``labels``, on the model's device. A row without a labelled token gets
    NaN. Guarantees: the token-weighted mean of the values is the model's own loss over the same batches.
    """
    out = []
    with torch.no_grad():
        for inputs in batches:
            labels = inputs["labels"]
            logits = model(**inputs).logits.float()
            if causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            counts = (labels != -100).sum(1)
            out.append(per_token.sum(1) / counts.where(counts > 0, torch.nan))
    return torch.cat(out) if out else torch.zeros(0)


def eval_row_losses(trainer, causal: bool, skip: tuple[str, ...] = ()) -> torch.Tensor:
    """Each evaluation row's loss under ``trainer``'s model (:func:`row_losses`, in eval mode), gathered from every
    process in the evaluation dataloader's order: float64, NaN for a row without a labelled token. ``skip``: batch
    keys that are not model inputs.

    Two calls on the same trainer list the same rows in the same order, so their difference pairs row with row. The
    model's train/eval mode and the global RNG are left as they were (iterating a DataLoader draws from it).
    """
    device, model = trainer.args.device, trainer.model
    training, gathered = model.training, []
    model.eval()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            for batch in trainer.get_eval_dataloader():
                inputs = {k: v.to(device) for k, v in batch.items() if k not in skip}
                # per batch, inside the loop: gather_for_metrics drops the padding of the last batch only there
                losses = row_losses(model, [inputs], causal=causal)
                gathered.append(trainer.accelerator.gather_for_metrics(losses.to(device)).double().cpu())
    finally:
        model.train(training)
    return torch.cat(gathered) if gathered else torch.zeros(0, dtype=torch.float64)


def standard_error(values: torch.Tensor) -> float | None:
    """The standard error of the mean of ``values`` (NaN entries left out): sample sd over the square root of their
    count; None below 2 values."""
    values = values[~values.isnan()].double()
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else None


def count_shifted_targets(trainer) -> None:
    """Make ``trainer`` count a causal LM's targets as its loss does, over ``labels[..., 1:]``.

    transformers 5.x decides this from ``model.loss_type``, which is None for models such as GPT-2 whose loss
    function still shifts (``ForCausalLMLoss``): the Trainer then divides the summed loss by one target per row too
    many, and reports (and trains on) ``(T-1)/T`` of the true mean cross-entropy (0.984 of it for 64-token blocks).
    Guarantees: after this call a causal LM's ``eval_loss`` is the mean over the tokens it predicts.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = trainer.model
    if getattr(trainer, "_loss_shifts_labels", True) or getattr(model.config, "is_encoder_decoder", False):
        return
    if getattr(model, "loss_function", None) is ForCausalLMLoss:
        trainer._loss_shifts_labels = True
