"""What a run leaves behind, and the rules that read it: the result contract (``RelearnResult``), the original
run's budget and curve, the base-run warnings, and the recovery rule (threshold, first qualifying evaluation).

Pure values: no trainer, no model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.objectives import get_objective
from ..errors import RelearnError
from ..stats.caveats import (
    NOISY_BASELINE,
    OVERFIT,
    RESET_BARELY_MATTERED,
    SELECTED_ON_EVALUATION,
    UNDER_TRAINED,
    UNIGRAM_LEVEL,
    Caveat,
    attach_codes,
    codes_of,
)
from ..storage import RUN_FILE


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
    evals = [e for e in state.get("log_history", []) if "eval_loss" in e]
    curve = [(e["step"], e["eval_loss"]) for e in evals]
    run_file = Path(path) / RUN_FILE
    info = json.loads(run_file.read_text()) if run_file.exists() else {}
    return {
        "selected_on": selected_on(info),
        "steps": info.get("budget_steps") or state.get("global_step") or None,
        "tokens": info.get("budget_tokens") or state.get("num_input_tokens_seen") or None,
        "curve": curve,
        "tokens_at": {e["step"]: e["num_input_tokens_seen"] for e in evals if e.get("num_input_tokens_seen")},
        "warnings": attach_codes(info["warnings"], info.get("warning_codes"))
        if "warnings" in info
        else base_run_warnings(curve, state.get("global_step") or 0),
    }


def selected_on(info: dict) -> str | None:
    """What chose a base run's kept model, from its run info (``hf_relearn_run.json``): ``"selection split"`` (rows
    apart from the evaluation split), ``"evaluation split"`` (the rows its baseline is measured on: a biased
    baseline), ``"last step"`` (no choice: a fixed budget), or None for a folder that is not a pretrain run."""
    if info.get("kind") != "pretrain":
        return None
    if not info.get("until_converged"):
        return "last step"
    return "selection split" if (info.get("data_args") or {}).get("selection_fraction") else "evaluation split"


def baseline_warnings(
    selected: str | None,
    baseline: float | None,
    se: float | None,
    tolerance: float | None,
    paired_se: float | None = None,
) -> list[str]:
    """Warnings on the baseline itself: chosen on its own rows (the best of many noisy draws), or too noisy for the
    tolerance.

    Noise: a recovery compares the re-learned and the intact model on the same rows, so its noise is ``paired_se``,
    the standard error of the mean per-row difference between the final and the intact model's loss; the warning
    fires when the relative tolerance is under twice ``paired_se / baseline`` (a 'recovery' inside the noise). A
    result without it (written before it was measured) falls back on ``se``, the baseline's own standard error,
    which also counts how much rows differ from each other and so overstates the noise of the comparison.
    """
    out = []
    if selected == "evaluation split":
        out.append(
            Caveat(
                SELECTED_ON_EVALUATION,
                "the base's checkpoint was chosen on the rows its baseline is measured on: the baseline is the best "
                "of many noisy draws and recovery must beat that luck (pretrain with selection_fraction > 0)",
            )
        )
    noise, what = (paired_se, "the final-minus-intact loss's") if paired_se is not None else (se, "the baseline's")
    if tolerance is not None and noise and baseline and tolerance < 2 * noise / abs(baseline):
        out.append(
            Caveat(
                NOISY_BASELINE,
                f"the tolerance {tolerance:.2%} is under twice {what} relative standard error "
                f"{noise / abs(baseline):.2%}: a recovery this close is inside the evaluation noise (evaluate more rows)",
            )
        )
    return out


def relearn_warnings(
    original: dict,
    data_warnings: list[str],
    baseline: dict,
    after: dict,
    threshold: float,
    args: Any,
    paired_se: float | None = None,
) -> list[str]:
    """Every warning a relearn's result carries: its base run's, its data's, the baseline's (see
    :func:`baseline_warnings`), and a reset that left the metric within the tolerance already.

    ``baseline`` / ``after``: the metrics measured on the intact and on the reset model; ``args``: the run's
    ``RelearnArguments``; ``paired_se``: the standard error of the final-minus-intact loss over the evaluation rows.
    """
    key = args.metric_key
    warnings = list(original.get("warnings", [])) + list(data_warnings)
    tolerance = args.tolerance if args.tolerance_abs is None and key == "eval_loss" else None
    warnings += baseline_warnings(
        original.get("selected_on"), baseline.get("eval_loss"), baseline.get("eval_loss_se"), tolerance, paired_se
    )
    if first_reach([(0, after[key])], threshold, args.higher_is_better) == 0:
        warnings.append(
            Caveat(
                RESET_BARELY_MATTERED,
                f"the reset barely mattered: right after it {key} was {after[key]:.4f}, already within the tolerance "
                f"of the baseline {baseline[key]:.4f}; this block did little, so its cheap 'recovery' says nothing",
            )
        )
    return warnings


def recovery_figures(
    args: Any,
    evals: list[dict],
    measured: dict,
    threshold: float,
    original: dict,
    data_warnings: list[str],
    published: list | None = None,
) -> dict:
    """A result's curve, recovery step, its examples and tokens, the original budget and its share, and warnings.

    ``args``: the run's ``RelearnArguments``; ``evals``: the log-history entries with the recovery metric;
    ``measured``: the ``baseline``, ``after_reset`` (and ``final_minus_baseline_se``) measurements; ``original``:
    the base run (:func:`read_original_run`); ``published``: the original curve from published checkpoints, if any.
    """
    key = args.metric_key
    after = measured["after_reset"]
    curve = [(0, after[key])] + [(e["step"], e[key]) for e in evals]
    step = first_reach(curve, threshold, args.higher_is_better, args.patience, args.recovery_window)
    at = {0: {"relearn_examples_seen": 0, "num_input_tokens_seen": 0}} | {e["step"]: e for e in evals}
    tokens_at = at[step].get("num_input_tokens_seen") if step is not None else None
    orig_steps = args.original_steps or original.get("steps")
    orig_tokens = args.original_tokens or original.get("tokens")
    warnings = relearn_warnings(
        original,
        data_warnings,
        measured["baseline"],
        after,
        threshold,
        args,
        paired_se=measured.get("final_minus_baseline_se"),
    )
    orig_curve = published or original.get("curve")
    orig_steps = orig_steps or (published[-1][0] if published else None)
    orig_same = first_reach(orig_curve, threshold, False) if orig_curve and key == "eval_loss" else None
    per_step = args.original_tokens_per_step
    orig_same_tokens = original.get("tokens_at", {}).get(orig_same) if orig_same is not None else None
    if orig_same is not None and per_step:
        orig_same_tokens = orig_same * per_step
    orig_tokens = orig_tokens or (orig_steps * per_step if orig_steps and per_step else None)
    return dict(
        curve=[[s, v] for s, v in curve],
        curve_noise=curve_noise(curve),
        recovered=step is not None,
        steps_to_recover=step,
        examples_to_recover=at[step]["relearn_examples_seen"] if step is not None else None,
        tokens_to_recover=tokens_at,
        original_steps=orig_steps,
        original_tokens=orig_tokens,
        fraction_of_original=step / orig_steps if step is not None and orig_steps else None,
        fraction_of_original_tokens=tokens_at / orig_tokens if tokens_at is not None and orig_tokens else None,
        original_steps_to_same_loss=orig_same,
        original_tokens_to_same_loss=orig_same_tokens,
        original_curve=[[st, v] for st, v in published] if published else None,
        warnings=warnings,
        warning_codes=codes_of(warnings),
    )


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


def unigram_warning(baseline: float, unigram: float) -> list[str]:
    """A base within 2% of (or worse than) a unigram model of its data has learned little a reset could remove."""
    if baseline < 0.98 * unigram:
        return []
    return [
        Caveat(
            UNIGRAM_LEVEL,
            f"the base model is no better than a unigram model of its data (eval loss {baseline:.4f} vs unigram "
            f"{unigram:.4f} nats/token): it has learned little that a reset could remove",
        )
    ]


def smoothed(curve: list[tuple[int, float]], window: int = 1) -> list[tuple[int, float]]:
    """``curve`` with each value replaced by the mean of the ``window`` values centred on it (odd ``window``).

    Near the start the window shrinks symmetrically (the first point is its own mean); the last points, whose window
    is not complete yet (up to ``window // 2`` of them), are left out, so a point's smoothed value never changes as
    the curve grows. ``window`` 1 returns the curve itself. NaN values stay NaN in every mean they enter.
    """
    if window < 1 or window % 2 == 0:
        raise RelearnError(f"the smoothing window must be an odd number of evaluations >= 1, got {window}")
    half = window // 2
    out = []
    for i in range(len(curve)):
        h = min(half, i)
        if i + h >= len(curve):  # its window is not complete yet (and no later point's is)
            break
        values = [v for _, v in curve[i - h : i + h + 1]]
        out.append((curve[i][0], sum(values) / len(values)))
    return out


def first_reach(
    curve: list[tuple[int, float]], threshold: float, higher_is_better: bool, patience: int = 1, window: int = 1
):
    """The step of the first of ``patience`` consecutive points within ``threshold`` on the curve smoothed over
    ``window`` evaluations (:func:`smoothed`), or None. With ``window`` > 1 a single evaluation that dips under the
    line by noise does not count: the mean around it must."""
    run = 0
    points = smoothed(curve, window)
    for i, (_, value) in enumerate(points):
        ok = value >= threshold if higher_is_better else value <= threshold
        run = run + 1 if ok and not math.isnan(value) else 0
        if run >= patience:
            return points[i - patience + 1][0]
    return None


def curve_noise(curve: list[tuple[int, float]], window: int = 5) -> float | None:
    """How much a curve's evaluations scatter around their trend: the median absolute deviation from the centred
    mean over ``window`` evaluations, scaled to a standard deviation (x 1.4826) and divided by that mean; None for
    a curve shorter than ``window`` + 1 points. Comparable with a relative tolerance."""
    trend = dict(smoothed(curve, window))
    rel = sorted(abs(v / trend[s] - 1) for s, v in curve[window // 2 + 1 :] if s in trend and trend[s])
    if len(rel) < 2 or any(math.isnan(r) for r in rel):
        return None
    mid = len(rel) // 2
    median = rel[mid] if len(rel) % 2 else (rel[mid - 1] + rel[mid]) / 2
    return 1.4826 * median / math.sqrt(1 - 1 / window)  # a point is part of its own mean: undo that shrinkage


def stretch_start(history: list, patience: int, window: float) -> int:
    """Where the last stretch of a curve of (step, value) points starts: the longer of its last ``patience``
    evaluations and the last ``window`` share of the steps so far (the base runs' plateau rule). -1 while the curve
    is shorter than that."""
    by_evaluations = len(history) - 1 - patience
    cut = history[-1][0] * (1 - window)
    by_steps = max((i for i, (step, _) in enumerate(history) if step <= cut), default=-1)
    return min(by_evaluations, by_steps)  # the longer stretch starts earlier


def recovery_threshold(baseline: float, after_reset: float, args: Any) -> float:
    """The metric value that counts as recovered (see README: recovery, defined).

    ``args``: a ``RelearnArguments`` (its tolerance, tolerance_abs, objective, metric_key and higher_is_better).
    """
    sign = 1 if args.higher_is_better else -1
    if args.tolerance_abs is not None:
        return baseline - sign * args.tolerance_abs
    if get_objective(args.objective).distills and args.metric_key == "eval_loss":
        # the teacher is the model itself, so its baseline distill loss is 0: recovered when the damage is
        # repaired to within `tolerance` of how far the reset moved it
        return baseline + args.tolerance * (after_reset - baseline)
    return baseline * (1 - sign * args.tolerance) if baseline >= 0 else baseline * (1 + sign * args.tolerance)


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
    higher_is_better: bool
    patience: int
    recovery_window: int
    curve_noise: float | None
    baseline_eval_loss: float | None
    eval_loss_se: float | None
    final_minus_baseline_se: float | None
    base_selected_on: str | None
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
    original_tokens_to_same_loss: int | None = None
    original_curve: list[list[float]] | None = None

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
