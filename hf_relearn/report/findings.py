"""Findings: a study's rows -> numbers and words (the summary per arm, the results tables, the answer in words).

Pure Python on the rows of results.csv (no torch, no matplotlib): ``summarise`` aggregates seeds, ``table_markdown``
and ``table_text`` lay the summary out, ``answer_in_words`` and ``swap_answer`` state the answer it supports.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from ..model.arm_registry import DEFAULT_ARM, split_variant, with_variant
from ..model.arm_registry import arm_label as registered_label
from ..stats.summary import mean_sd
from ..study.grid import grid_of
from .grid_findings import (
    arm_words,
    damage_relative,
    depth_width_words,
    jump_words,
    layer_runs,
    position_words,
    reference_arm,
    repaired_words,
    row_arm,
)
from .swap_findings import arm_median, swap_answer

_mean_sd = mean_sd


def _fmt(mean: float, sd: float, digits: int = 0) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def scratch_loss_at(curve: list, step: float) -> float | None:
    """The base run's validation loss at ``step`` of its own training from scratch (linear between its evaluations),
    or None when ``step`` lies outside the evaluated range."""
    points = sorted((float(s), float(v)) for s, v in curve)
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0) if s1 > s0 else v0
    return points[0][1] if points and step == points[0][0] else None


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def run_label(row: dict) -> str:
    """What a row's surgery was: its block name, or ``swap:NAME`` for an encoder swap (sweep.swaps)."""
    return f"swap:{row['swap']}" if row.get("swap") else row["block"]


def run_arm(row: dict) -> str:
    """A row's arm: its trainable arm, or for an encoder swap its options (cross-attention, freeze, warm-up); with
    ``@NAME`` when it ran the study's variant NAME of the relearn settings."""
    if not row.get("swap"):
        return row_arm(row)
    warmup = row.get("swap_warmup_steps") or 0
    stitch = f", {row['swap_stitch']} stitch" if row.get("swap_stitch") else ""
    options = f"{row['swap_cross_attention']}, {row['swap_freeze']}{stitch}" + (
        f", warm-up {warmup}" if warmup else ""
    )
    return with_variant(options, row.get("variant"))


def summarise(rows: list[dict]) -> list[dict]:
    """One summary per (grid point, block or swap, init, arm), aggregated over seeds, in the rows' order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(grid_of(r), run_label(r), r["init"], run_arm(r))].append(r)
    out = []
    for (grid, block, init, arm), rs in groups.items():
        rec = [r for r in rs if r["recovered"]]
        steps = [r["steps_to_recover"] for r in rec]
        fracs = [r["fraction_of_original"] for r in rec if r["fraction_of_original"] is not None]
        tokens = [r["tokens_to_recover"] for r in rec if r["tokens_to_recover"] is not None]
        jumps = [r["after_reset_eval_loss"] / r["baseline_eval_loss"] - 1 for r in rs if r["baseline_eval_loss"]]
        # where the intact loss is 0 (distill) a relative jump is undefined: the absolute one is reported
        jumps_abs = [r["after_reset_eval_loss"] - r["baseline_eval_loss"] for r in rs]
        scratch = [r["original_steps_to_same_loss"] for r in rs if r.get("original_steps_to_same_loss")]
        # cost with unrecovered runs counted at the steps they trained: a lower bound, marked "censored"
        cost = [r["steps_to_recover"] if r["recovered"] else r["steps_trained"] for r in rs]
        budget = rs[0]["original_steps"]
        out.append(
            {
                "grid": grid,
                "block": block,
                "init": init,
                "arm": arm,
                "layer": rs[0]["layer"],
                "relative_depth": rs[0]["relative_depth"],
                "n_layers": rs[0]["n_layers"],
                "runs": len(rs),
                "recovered": len(rec),
                "steps": _mean_sd(steps),
                "steps_list": steps,
                "unrecovered_steps": [r["steps_trained"] for r in rs if not r["recovered"]],
                "fraction": _mean_sd(fracs),
                "fraction_list": fracs,
                "tokens": _mean_sd(tokens),
                "jump": _mean_sd(jumps),
                "jump_abs": statistics.fmean(jumps_abs),
                "scratch_steps": _mean_sd(scratch),
                "original_steps": budget,
                # the longest share of its budget any run trained: where none came back, the cost is above each run's
                "trained_fraction": max(c / r["original_steps"] for c, r in zip(cost, rs, strict=True))
                if all(r["original_steps"] for r in rs)
                else math.nan,
                "censored": len(rec) < len(rs),
                # each run as (steps, came back, its base's budget): the censored costs the words summarise
                "run_costs": [(c, bool(r["recovered"]), r["original_steps"]) for c, r in zip(cost, rs, strict=True)],
                "tolerance": rs[0]["tolerance"],
                "swap": rs[0].get("swap"),
                "swap_width": rs[0].get("swap_width"),
                "old_width": (rs[0].get("surgery") or {}).get("old_width"),
                "part": rs[0].get("part"),
                "baseline": statistics.fmean(r["baseline_eval_loss"] for r in rs),
                "after": statistics.fmean(r["after_reset_eval_loss"] for r in rs),
                "steps_trained": statistics.fmean(r["steps_trained"] for r in rs),
                "final_loss": statistics.fmean(r["final_eval_loss"] for r in rs),
                "scratch_at_end": _mean_or_none(
                    [scratch_loss_at(r.get("base_curve") or [], r["steps_trained"]) for r in rs]
                ),
            }
        )
    return out


def _of_what(row: dict) -> str:
    """What a distill run's tolerance is a share of (its intact loss is 0): the damage the reset did."""
    return " of the reset's damage" if damage_relative(row) else ""


def _jump_cell(s: dict) -> str:
    if math.isnan(s["jump"][0]):
        return f"+{s['jump_abs']:.4f} (abs.)"
    return f"{_fmt(100 * s['jump'][0], 100 * s['jump'][1], 2)}%"


def table_markdown(summary: list[dict]) -> str:
    """The results table (markdown): one line per grid point x block x arm."""
    lines = [
        "| base | block | arm | loss jump after reset | steps to recover | % of original budget | tokens to recover "
        "| recovered | original run's steps to the same loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        unrec = (
            f" (+{len(s['unrecovered_steps'])} not in {max(s['unrecovered_steps'])})" if s["unrecovered_steps"] else ""
        )
        lines.append(
            f"| {grid_of(s['grid']).label()} | {s['block']}{'' if s['init'] == 'scratch' else ' (' + s['init'] + ')'} "
            f"| {s['arm']} | {_jump_cell(s)} | {_steps_cell(s)}{unrec} "
            f"| {_frac_cell(s)} | {_fmt(*s['tokens'])} "
            f"| {s['recovered']}/{s['runs']} | {_fmt(*s['scratch_steps'])} |"
        )
    return "\n".join(lines)


def _steps_cell(s: dict) -> str:
    if s["recovered"] == 0:  # every run censored: no cost was observed, only the steps each trained without it
        return f"not in {max(s['unrecovered_steps'])}"
    return _fmt(*s["steps"]) + ("+" if s["censored"] else "")


def _frac_cell(s: dict) -> str:
    if s["recovered"] == 0:
        return (
            f"not in {100 * s['trained_fraction']:.1f}%" if s["trained_fraction"] == s["trained_fraction"] else "n/a"
        )
    return _fmt(100 * s["fraction"][0], 100 * s["fraction"][1], 1) + "%"


def table_text(summary: list[dict]) -> str:
    """A compact plain-text table for the terminal."""
    head = f"{'base':<18} {'block':<22} {'arm':<42} {'jump':>7} {'steps':>12} {'% orig':>12} {'rec':>5}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(
            f"{grid_of(s['grid']).label()[:18]:<18} {s['block'][:22]:<22} {s['arm'][:42]:<42} "
            f"{100 * s['jump'][0]:6.2f}% {_steps_cell(s):>12} {_frac_cell(s):>12} "
            f"{s['recovered']:>2}/{s['runs']:<2}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ words
def answer_in_words(rows: list[dict], summary: list[dict]) -> list[str]:
    """The answer to "how much re-training does a wiped layer need, and do L, N, D matter", from the numbers."""
    out = _layer_cost_words(rows)
    out += _unrecovered_words(summary)
    out += _arm_words(summary)
    out += position_words(rows) + repaired_words(rows) + jump_words(rows) + depth_width_words(rows) + arm_words(rows)
    return out + swap_answer(summary)


def _layer_cost_words(rows: list[dict]) -> list[str]:
    """Per grid point: how many runs of one reset layer (rest frozen) came back, each layer's cost (Kaplan-Meier over
    its runs: a run not back is censored, never a value), and, for the runs that came back, how their steps compare
    with the original run's steps to the same loss."""
    from ..stats.survival import summarise as km
    from .grid_findings import outcome

    out = []
    runs = [r for r in layer_runs(rows) if row_arm(r) == DEFAULT_ARM and r.get("original_steps")]
    first = rows[0]
    by_grid: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_grid[grid_of(r)].append(r)
    for grid, rs in sorted(by_grid.items(), key=lambda kv: kv[0].sort_key):
        budgets = "/".join(str(b) for b in sorted({r["original_steps"] for r in rs}))
        by_block: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            by_block[r["block"]].append(r)
        cells = "; ".join(f"{block} {km([outcome(r) for r in mine])}" for block, mine in by_block.items())
        back = sum(r["recovered"] for r in rs)
        out.append(
            f"**{grid_of(grid).label()}** (original budget{'s' if '/' in budgets else ''} {budgets} steps): "
            f"re-learning one reset layer with the rest frozen brought the validation loss back within "
            f"{100 * first['tolerance']:g}%{_of_what(first)} in {back} of {len(rs)} runs. Cost as a share of the "
            f"budget, per layer (Kaplan-Meier; a run not back is censored at the share it trained): {cells}."
        )
        ratios = sorted(
            r["steps_to_recover"] / r["original_steps_to_same_loss"]
            for r in rs
            if r["recovered"] and r.get("original_steps_to_same_loss")
        )
        if ratios:
            median = statistics.median(ratios)
            out.append(
                f"  Of the {len(ratios)} runs that came back, re-learning took a median {median:.2f}x the steps the "
                f"original run needed from scratch to first reach the same loss (range {ratios[0]:.2f}-"
                f"{ratios[-1]:.2f}x; runs not back are not in this)."
            )
    return out


def _unrecovered_words(summary: list[dict]) -> list[str]:
    """The (block, arm) groups where not every run recovered within its step limit (empty when all did)."""
    out = []
    not_rec = [s for s in summary if s["recovered"] < s["runs"]]
    several = len({grid_of(s) for s in summary}) > 1
    if not_rec:
        out.append(
            "Not every run recovered within its step limit: "
            + "; ".join(
                f"{s['block']} [{s['arm']}]"
                + (f" at ({grid_of(s['grid']).label()})" if several else "")
                + f" {s['runs'] - s['recovered']} of {s['runs']} unrecovered"
                for s in not_rec
            )
            + " (their cost is a lower bound)."
        )
    return out


def arm_label(arm: str) -> str:
    """An arm in words: its trainable set, and the variant of the relearn settings it ran (``@NAME``) if any."""
    trainable, variant = split_variant(arm)
    return registered_label(trainable) + (f"; relearn settings '{variant}'" if variant else "")


def _arm_words(summary: list[dict]) -> list[str]:
    """Each arm's steps as a multiple of its reference arm's (``reference_arm``: training only the block, or for a
    variant of the relearn settings the same arm under the recipe's own): the Kaplan-Meier median steps over seeds,
    summed over the blocks where both arms' medians were reached; the blocks left out are counted."""
    out = []
    by = defaultdict(dict)
    for s in summary:
        by[(grid_of(s), s["block"], s["init"])][s["arm"]] = arm_median(s)
    for arm in sorted({s["arm"] for s in summary}):
        ref = reference_arm(arm)
        both = [(v[arm], v[ref]) for v in by.values() if arm != ref and arm in v and ref in v]
        pairs = [(a, b) for (a, a_reached), (b, b_reached) in both if a_reached and b_reached]
        if pairs and sum(b for _, b in pairs):
            ratio = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
            what = (
                "training only the block" if ref == DEFAULT_ARM else f"'{ref}' with the recipe's own relearn settings"
            )
            left_out = (
                f"; {len(both) - len(pairs)} more where a median was not reached" if len(both) > len(pairs) else ""
            )
            out.append(
                f"Arm '{arm}' ({arm_label(arm)}) needed {ratio:.2f}x the steps of {what} (median steps summed over "
                f"{len(pairs)} blocks{left_out}; <1 = faster)."
            )
    return out
