"""Does the position of the reset layer matter, and do depth N and width D? Answers with spread, from results.csv.

The cost of one run is the share of its base's own budget it took to recover (``fraction_of_original``); a run that
did not recover counts at the steps it trained (a lower bound, so rank statistics treat it as at least that dear).
Position: Spearman's rho of layer index with cost over runs (seeds pooled), with a permutation p-value and a
bootstrap interval. N at fixed D and D at fixed N: the mean cost per reset layer per value, and rho of the value
with cost. Relative depth L/(N-1) pools depths. Imports no torch.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from .files import DEPTH_KEYS, WIDTH_KEYS, split_variant, with_variant
from .stats import mean_sd, permutation_difference, rank_correlation

LOOSER_TOLERANCES = (0.02, 0.05)  # read from each run's curve: it passes a looser threshold before it stops


def steps_within(row: dict, tolerance: float | None = None) -> tuple[int, bool]:
    """(steps, reached): the first evaluation at which the run's metric was within ``tolerance`` of its baseline
    (relative; the run's own rule when None), or (steps trained, False) when it never was. A tolerance looser than
    the run's own is read from its curve, which it crossed on the way to its own."""
    if tolerance is None or tolerance == row["tolerance"]:
        return (row["steps_to_recover"], True) if row["recovered"] else (row["steps_trained"], False)
    if tolerance < row["tolerance"]:
        raise ValueError(f"tolerance {tolerance} is tighter than the run's own {row['tolerance']}: not in its curve")
    base = row["baseline_metric"]
    higher = higher_is_better(row)
    threshold = base * (1 - tolerance) if higher else base * (1 + tolerance)
    for step, value in row["curve"]:
        if (value >= threshold) if higher else (value <= threshold):
            return int(step), True
    return row["steps_trained"], False


def higher_is_better(row: dict) -> bool:
    """Whether a larger value of the row's recovery metric is better (any metric but a loss)."""
    return row["recovery_metric"] != "eval_loss" and not row["recovery_metric"].endswith("loss")


def run_cost(row: dict, tolerance: float | None = None) -> float:
    """One run's cost as a share of its base's budget (a lower bound when it did not recover); nan without one."""
    budget = row.get("original_steps")
    if not budget:
        return math.nan
    return steps_within(row, tolerance)[0] / budget


def layer_runs(rows: list[dict]) -> list[dict]:
    """Whole-layer resets from scratch (no part, no swap), the runs that position, depth and width compare."""
    return [
        r
        for r in rows
        if r.get("layer") is not None and not r.get("part") and not r.get("swap") and r["init"] == "scratch"
    ]


def row_arm(row: dict) -> str:
    """A run's trainable arm, with ``@NAME`` when it ran the study's variant NAME of the relearn settings."""
    return with_variant(row["trainable"], row.get("variant"))


def reference_arm(arm: str) -> str:
    """The arm another is compared with: a variant's arm under the recipe's own settings, else ``block``."""
    own, variant = split_variant(arm)
    return own if variant else "block"


def _key(grid: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in grid), None)


def _label(grid: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in grid.items()) or "base"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _pct_sd(values: list[float]) -> str:
    m, sd = mean_sd(values)
    return "n/a" if math.isnan(m) else f"{100 * m:.1f} ± {100 * sd:.1f}%"


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs per (grid point, arm); an encoder-decoder's stacks apart (layer 0 of the encoder is not the decoder's)."""
    several_stacks = len({r.get("stack") for r in rows if r.get("stack")}) > 1
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        grid = {**r["grid"], "stack": r.get("stack")} if several_stacks else r["grid"]
        groups[(json.dumps(grid, sort_keys=True), row_arm(r))].append(r)
    return groups


def _tolerances(rows: list[dict]) -> list[float | None]:
    """The study's own tolerance, plus looser ones where a quarter or more of the runs never reached its own."""
    censored = sum(not r["recovered"] for r in rows)
    own = min((r["tolerance"] for r in rows if r.get("tolerance_abs") is None), default=None)
    if own is None or censored < len(rows) / 4:
        return [None]
    return [None] + [t for t in LOOSER_TOLERANCES if t > own]


def position_words(rows: list[dict]) -> list[str]:
    """Per grid point and arm: does the reset layer's position change the cost (rank correlation over runs)?"""
    out = []
    for (grid, arm), rs in _groups(layer_runs(rows)).items():
        if len({r["layer"] for r in rs}) < 3:
            continue
        for tol in _tolerances(rs):
            pairs = [(r["layer"], run_cost(r, tol)) for r in rs if not math.isnan(run_cost(r, tol))]
            if len({p[1] for p in pairs}) < 2:  # every run at the same cap: nothing to rank
                continue
            rc = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs])
            if rc.p_value < 0.05:
                verdict = "later layers cost more" if rc.rho > 0 else "earlier layers cost more"
            else:
                verdict = "no significant trend with position"
            within = "" if tol is None else f", to within {100 * tol:g}%"
            out.append(
                f"Position ({_label(json.loads(grid))}, arm {arm}{within}): layer index vs cost {rc}: {verdict}. "
                + _edges_words(rs, tol)
            )
    return out


def repaired(row: dict) -> float:
    """The share of the reset's damage a run undid by its last step: (after reset - final) / (after reset - intact)."""
    damage = row["after_reset_eval_loss"] - row["baseline_eval_loss"]
    return (row["after_reset_eval_loss"] - row["final_eval_loss"]) / damage if damage > 0 else math.nan


def repaired_by_layer(runs: list[dict]) -> dict[int, list[float]]:
    """Each reset layer's shares of the damage repaired (``repaired``), in run order. A run whose reset did not raise
    the loss did no damage to repair: it has no share and is left out (its layer may map to an empty list)."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        by_layer[r["layer"]] += [] if math.isnan(repaired(r)) else [repaired(r)]
    return dict(by_layer)


def damage_relative(row: dict) -> bool:
    """Whether a run's tolerance is a share of the reset's damage, not of the intact loss (distill: the intact loss
    is 0; see ``result.recovery_threshold``)."""
    return row["objective"] == "distill" and not row["baseline_eval_loss"]


def fixed_budget(rows: list[dict]) -> bool:
    """Whether every run trained the same steps (``stop_at_recovery: false``, or none recovered before the cap)."""
    return bool(rows) and len({r["steps_trained"] for r in rows}) == 1


def repaired_words(rows: list[dict]) -> list[str]:
    """For a study whose runs all trained the same steps (``stop_at_recovery: false``, or none recovered before the
    cap): per grid point and arm, the share of the damage each reset layer's runs undid in those steps (mean ± sd
    over seeds), and whether it follows the layer's position. Empty when runs stopped at different steps (some
    stopped at recovery: then the steps to recover are the answer)."""
    if not fixed_budget(rows):
        return []
    out = []
    for (grid, arm), rs in _groups(layer_runs(rows)).items():
        by_layer = repaired_by_layer(rs)
        cells = ", ".join(f"{layer}: {_pct_sd(v) if v else 'n/a'}" for layer, v in sorted(by_layer.items()))
        line = (
            f"Damage repaired in the fixed budget of {rs[0]['steps_trained']} steps ({_label(json.loads(grid))}, "
            f"arm {arm}; 1 - (final - intact) / (after reset - intact), mean ± sd over seeds), by layer: {cells}."
        )
        undamaged = sum(math.isnan(repaired(r)) for r in rs)
        if undamaged:
            line += f" Left out: {undamaged} run(s) whose reset did not raise the loss (no damage to repair)."
        pairs = [(r["layer"], repaired(r)) for r in rs if not math.isnan(repaired(r))]
        if len({p[0] for p in pairs}) >= 3:
            rc = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs])
            trend = (
                ("later layers repaired more" if rc.rho > 0 else "earlier layers repaired more")
                if rc.p_value < 0.05
                else "no significant trend with position"
            )
            line += f" Layer index vs share repaired {rc}: {trend}."
        out.append(line)
    return out


def reset_jump(row: dict) -> float:
    """How much the reset alone raised the recovery metric (what ``hf-relearn probe`` measures): relative to the
    intact model, or absolute where the intact model scores 0 (distill)."""
    base, after = row["baseline_metric"], row["after_reset_metric"]
    return (after - base) / abs(base) if base else after - base


def jump_words(rows: list[dict]) -> list[str]:
    """Per grid point and arm: does the loss jump right after the reset predict the cost of re-learning?"""
    out = []
    runs = [r for r in rows if not r.get("swap") and r.get("original_steps")]
    fixed = fixed_budget(runs)  # every cost the same: relate the jump to the share of the damage repaired instead
    measure = repaired if fixed else run_cost
    for (grid, arm), rs in _groups(runs).items():
        pairs = [(reset_jump(r), measure(r)) for r in rs if not math.isnan(measure(r))]
        if len({p[0] for p in pairs}) < 3 or len({p[1] for p in pairs}) < 2:
            continue
        rc = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs])
        more, less = ("is repaired more", "is repaired less") if fixed else ("costs more", "costs less")
        verdict = (f"a larger jump {more if rc.rho > 0 else less}") if rc.p_value < 0.05 else "no significant relation"
        censored = sum(not r["recovered"] for r in rs)
        lower = f" ({censored} unrecovered runs enter at their lower bound)" if censored and not fixed else ""
        against = (
            f"the share of the damage repaired in {rs[0]['steps_trained']} steps"
            if fixed
            else "the cost of re-learning"
        )
        out.append(
            f"Zero-shot jump ({_label(json.loads(grid))}, arm {arm}): the loss rise right after the reset, with no "
            f"training (what `hf-relearn probe` measures), vs {against}{lower}: {rc}: {verdict}."
        )
    return out


def _edges_words(rows: list[dict], tolerance: float | None) -> str:
    """A rank correlation misses a U shape: compare the first and last layers with the ones between them."""
    last = max(r["layer"] for r in rows)
    edges = [run_cost(r, tolerance) for r in rows if r["layer"] in (0, last)]
    inner = [run_cost(r, tolerance) for r in rows if r["layer"] not in (0, last)]
    if not edges or not inner:
        return ""
    p = permutation_difference(edges, inner)
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return f"First and last layer {_pct_sd(edges)} vs the layers between {_pct_sd(inner)} (permutation {p_text})."


def _effect_words(rows: list[dict], vary: tuple[str, ...], fixed: tuple[str, ...], name: str) -> list[str]:
    """For each value of the ``fixed`` key: the mean cost per reset layer at each value of the ``vary`` key."""
    runs = [r for r in layer_runs(rows) if row_arm(r) == "block" and not math.isnan(run_cost(r))]
    out = []
    by_fixed: dict[object, list[dict]] = defaultdict(list)
    for r in runs:
        vk, fk = _key(r["grid"], vary), _key(r["grid"], fixed)
        if vk:
            by_fixed[r["grid"].get(fk) if fk else None].append(r)
    for fixed_value, rs in sorted(by_fixed.items(), key=lambda kv: str(kv[0])):
        vk = _key(rs[0]["grid"], vary)
        values = sorted({r["grid"][vk] for r in rs})
        if len(values) < 2:
            continue
        at = f" at {_key(rs[0]['grid'], fixed)}={fixed_value}" if fixed_value is not None else ""
        for tol in _tolerances(rs):
            costs = {v: [run_cost(r, tol) for r in rs if r["grid"][vk] == v] for v in values}
            rc = rank_correlation([r["grid"][vk] for r in rs], [run_cost(r, tol) for r in rs])
            if rc.p_value < 0.05:
                trend = f"larger {name} costs more" if rc.rho > 0 else f"larger {name} costs less"
            else:
                trend = f"no significant effect of {name}"
            within = "" if tol is None else f", to within {100 * tol:g}%"
            out.append(
                f"{name[0].upper() + name[1:]}{at} (arm block{within}, cost per reset layer, mean ± sd over layers and "
                f"seeds): {'; '.join(f'{vk}={v}: {_pct_sd(c)}' for v, c in costs.items())}. {vk} vs cost {rc}: {trend}."
            )
    return out


def relative_depth_words(rows: list[dict]) -> list[str]:
    """Pooled over depths: does the relative position L/(N-1) order the cost, at each width?"""
    runs = [r for r in layer_runs(rows) if row_arm(r) == "block" and r.get("relative_depth") is not None]
    depths = {_key(r["grid"], DEPTH_KEYS) and r["grid"][_key(r["grid"], DEPTH_KEYS)] for r in runs}
    if len(depths) < 2:
        return []
    out = []
    by_width: dict[object, list[dict]] = defaultdict(list)
    for r in runs:
        wk = _key(r["grid"], WIDTH_KEYS)
        by_width[r["grid"].get(wk) if wk else None].append(r)
    for width, rs in sorted(by_width.items(), key=lambda kv: str(kv[0])):
        pairs = [(r["relative_depth"], run_cost(r)) for r in rs if not math.isnan(run_cost(r))]
        rc = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs])
        at = f" at width {width}" if width is not None else ""
        out.append(f"Relative depth L/(N-1) vs cost{at}, depths pooled: {rc}.")
    return out


def depth_width_words(rows: list[dict]) -> list[str]:
    """Depth N at fixed width, width D at fixed depth, and relative depth pooled over depths, in sentences."""
    return (
        _effect_words(rows, DEPTH_KEYS, WIDTH_KEYS, "depth N")
        + _effect_words(rows, WIDTH_KEYS, DEPTH_KEYS, "width D")
        + relative_depth_words(rows)
    )


def arm_words(rows: list[dict]) -> list[str]:
    """Where a grid point ran other arms beside ``block`` (or variants of the relearn settings) and runs miss the
    study's tolerance: each arm's cost at the looser tolerances, read from the curves, against its reference arm's
    (``reference_arm``), paired by base and layer (the study's own tolerance is compared over recovered runs in
    ``findings``)."""
    out = []
    groups = _groups(layer_runs(rows))
    for (grid, arm), rs in groups.items():
        ref = reference_arm(arm)
        theirs_by = {(r["base_id"], r["layer"]): r for r in groups.get((grid, ref), [])}
        pairs = [(r, theirs_by[(r["base_id"], r["layer"])]) for r in rs if (r["base_id"], r["layer"]) in theirs_by]
        if arm == ref or not pairs:
            continue
        for tol in _tolerances([r for pair in pairs for r in pair])[1:]:
            mine = [run_cost(a, tol) for a, _ in pairs]
            theirs = [run_cost(b, tol) for _, b in pairs]
            cheaper = sum(m < t for m, t in zip(mine, theirs, strict=True))
            reached = [sum(steps_within(r, tol)[1] for r in side) for side in zip(*pairs, strict=True)]
            out.append(
                f"Arms ({_label(json.loads(grid))}, to within {100 * tol:g}%): '{arm}' {_pct_sd(mine)} "
                f"({reached[0]} of {len(pairs)} reached) vs '{ref}' {_pct_sd(theirs)} ({reached[1]} of {len(pairs)}); "
                f"'{arm}' cheaper in {cheaper} of {len(pairs)} pairs (same base and layer; an unreached run counts at "
                "the steps it trained)."
            )
    return out


def grid_table(rows: list[dict]) -> str:
    """One line per grid point and arm: base budget, runs, unrecovered, mean cost, the dearest and cheapest layer."""
    looser = [t for t in LOOSER_TOLERANCES if all(t > r["tolerance"] for r in rows)]
    lines = [
        "| grid point | arm | base budget (steps) | base eval loss | runs | not recovered | cost per reset layer | "
        + "".join(f"to {100 * t:g}% (not reached) | " for t in looser)
        + "dearest layer | cheapest layer |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(looser) + "---|---|",
    ]
    for (grid, arm), rs in _groups(layer_runs(rows)).items():
        budgets = {r["base_id"]: r["original_steps"] for r in rs if r.get("original_steps")}
        losses = {r["base_id"]: r["baseline_eval_loss"] for r in rs}
        m, sd = mean_sd(list(budgets.values()))
        per_layer: dict[int, list[float]] = defaultdict(list)
        for r in rs:
            per_layer[r["layer"]].append(run_cost(r))
        means = {layer: mean_sd(v)[0] for layer, v in per_layer.items()}
        dear = max(means, key=lambda k: means[k])
        cheap = min(means, key=lambda k: means[k])
        lines.append(
            f"| {_label(json.loads(grid))} | {arm} | {m:.0f} ± {sd:.0f} | {mean_sd(list(losses.values()))[0]:.4f} | "
            f"{len(rs)} | {sum(not r['recovered'] for r in rs)} | {_pct_sd([run_cost(r) for r in rs])} | "
            + "".join(
                f"{_pct_sd([run_cost(r, t) for r in rs])} ({sum(not steps_within(r, t)[1] for r in rs)}) | "
                for t in looser
            )
            + f"{dear} ({_pct(means[dear])}) | {cheap} ({_pct(means[cheap])}) |"
        )
    return "\n".join(lines)
