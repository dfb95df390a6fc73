"""A stitch between encoders: a linear map from a new encoder's output to the representation the decoder was trained
to read (model stitching: Lenc & Vedaldi 2015, Bansal et al. 2021).

The map is fitted in closed form on the two encoders' hidden states for the same training rows (every non-padding
token is one sample): ``lstsq`` (least squares with a bias, any widths) or ``procrustes`` (an orthogonal rotation
plus a bias, equal widths only). Its quality is measured on rows left out of the fit (R² and the relative residual).
The map is a module of the model (``model.stitch``, so it can train and its tensors are fingerprinted like any other)
applied to the encoder's output by a forward hook on the encoder: the decoder, its cross-attention included, is
untouched and reads what it was trained on, approximately.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import RelearnError

STITCH_FITS = ("lstsq", "procrustes")
STITCH_MODULE = "stitch"  # the attribute (and block name) of the map on the model
MIN_ROWS = 4  # a fit needs rows to fit on and rows to check it on


@dataclass
class StitchFit:
    """How the closed-form stitch was fitted and how well it maps on rows left out of the fit."""

    method: str
    rows_fit: int
    rows_held_out: int
    tokens_fit: int
    tokens_held_out: int
    r2_fit: float  # share of the old encoder's variance the mapped new states explain, on the rows fitted
    r2_held_out: float  # the same on the rows left out: the number to quote
    relative_residual_held_out: float  # ||mapped - old|| / ||old - mean(old)|| on the rows left out

    def to_dict(self) -> dict:
        return asdict(self)


class Stitch(nn.Linear):
    """A linear map from the new encoder's width to the old one's, applied to the encoder's output."""

    def apply_to_output(self, module: nn.Module, args, output):
        """Forward hook on the encoder: map its hidden states (a ModelOutput or a tuple whose first item they are)."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        output["last_hidden_state"] = self(output["last_hidden_state"])
        return output


@torch.no_grad()
def encoder_states(encoder: nn.Module, batches: Iterable[dict]) -> list[torch.Tensor]:
    """The encoder's last hidden states of every non-padding token, one (tokens, width) float64 tensor per row, in
    evaluation mode (no dropout); the encoder's own mode is restored."""
    was_training = encoder.training
    encoder.eval()
    rows = []
    try:
        device = next(encoder.parameters()).device
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            states = encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            rows += [s[m.bool()].double().cpu() for s, m in zip(states, mask, strict=True)]
    finally:
        encoder.train(was_training)
    return rows


def _fit(new: torch.Tensor, old: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) with ``new @ weight.T + bias ≈ old``."""
    if method == "lstsq":
        ones = torch.ones(len(new), 1, dtype=new.dtype)
        solution = torch.linalg.lstsq(torch.cat([new, ones], dim=1), old, driver="gelsd").solution
        return solution[:-1].T, solution[-1]
    mean_new, mean_old = new.mean(0), old.mean(0)
    u, _, vh = torch.linalg.svd((new - mean_new).T @ (old - mean_old))
    rotation = u @ vh  # the orthogonal map closest to the cross-covariance (orthogonal Procrustes)
    return rotation.T, mean_old - mean_new @ rotation


def _r2(mapped: torch.Tensor, old: torch.Tensor) -> tuple[float, float]:
    residual = (mapped - old).pow(2).sum()
    spread = (old - old.mean(0)).pow(2).sum()
    return float(1 - residual / spread), float((residual / spread).sqrt())


def fit_stitch(
    new_rows: list[torch.Tensor], old_rows: list[torch.Tensor], method: str = "lstsq", held_out: float = 0.25
) -> tuple[Stitch, StitchFit]:
    """Fit a ``Stitch`` from per-row hidden states of the new and the old encoder (the same rows, in order).

    The last ``held_out`` share of the rows is left out of the fit and measures it. Raises ``RelearnError`` for an
    unknown method, Procrustes across widths, rows that do not pair up, or a sample too small to determine the map
    (fewer than ``MIN_ROWS`` rows, or fewer fitted tokens than twice the parameters of one output: width + 1).
    """
    if method not in STITCH_FITS:
        raise RelearnError(f"stitch fit must be one of {', '.join(STITCH_FITS)}, got {method!r}")
    if len(new_rows) != len(old_rows) or any(len(a) != len(b) for a, b in zip(new_rows, old_rows, strict=False)):
        raise RelearnError("the stitch sample's rows differ between the two encoders (not the same tokens)")
    new_width, old_width = new_rows[0].shape[1], old_rows[0].shape[1]
    if method == "procrustes" and new_width != old_width:
        raise RelearnError(
            f"a Procrustes stitch maps equal widths only (new encoder {new_width}, old {old_width}); use lstsq"
        )
    n_held = max(1, round(held_out * len(new_rows)))
    n_fit = len(new_rows) - n_held
    tokens_fit = sum(len(r) for r in new_rows[:n_fit])
    if len(new_rows) < MIN_ROWS or tokens_fit < 2 * (new_width + 1):
        raise RelearnError(
            f"the stitch sample is too small: {len(new_rows)} rows, {tokens_fit} tokens to fit a map of "
            f"{new_width + 1} parameters per output; give at least {MIN_ROWS} rows and "
            f"{2 * (new_width + 1)} fitted tokens (more rows: swap_stitch_rows)"
        )
    new_fit, old_fit = torch.cat(new_rows[:n_fit]), torch.cat(old_rows[:n_fit])
    new_held, old_held = torch.cat(new_rows[n_fit:]), torch.cat(old_rows[n_fit:])
    weight, bias = _fit(new_fit, old_fit, method)
    r2_fit, _ = _r2(new_fit @ weight.T + bias, old_fit)
    r2_held, residual_held = _r2(new_held @ weight.T + bias, old_held)
    stitch = Stitch(new_width, old_width)
    with torch.no_grad():
        stitch.weight.copy_(weight.to(stitch.weight.dtype))
        stitch.bias.copy_(bias.to(stitch.bias.dtype))
    fit = StitchFit(method, n_fit, n_held, tokens_fit, len(new_held), r2_fit, r2_held, residual_held)
    return stitch, fit


def install_stitch(model: nn.Module, stitch: Stitch) -> None:
    """Make ``stitch`` the model's ``stitch`` module and apply it to the output of ``model.get_encoder()``.

    The hook is the stitch's own bound method, so a deep copy of the model carries a hook bound to its own copy."""
    if hasattr(model, STITCH_MODULE):
        raise RelearnError(f"{type(model).__name__} already has a '{STITCH_MODULE}' attribute")
    encoder = model.get_encoder()
    weight = next(encoder.parameters())
    setattr(model, STITCH_MODULE, stitch.to(device=weight.device, dtype=weight.dtype))
    encoder.register_forward_hook(stitch.apply_to_output)


def is_stitched(model: nn.Module) -> bool:
    """True when ``install_stitch`` gave this model a stitch."""
    return isinstance(getattr(model, STITCH_MODULE, None), Stitch)
