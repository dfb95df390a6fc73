"""Report: results.csv -> a table, plots and the answer in words (``report.md`` + ``plots/*.png``).

Built from results.csv alone (``hf-relearn report DIR``), so a study copied elsewhere can be re-reported.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from .caveats import RESET_BARELY_MATTERED, UNIGRAM_LEVEL, codes_of
from .errors import RelearnError
from .files import ARM_LABELS, RESULTS
from .io import read_results


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _fmt(mean: float, sd: float, digits: int = 0) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def _grid_label(grid: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in grid.items()) or "base"


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
    """A row's arm: its trainable arm, or for an encoder swap its options (cross-attention, freeze, warm-up)."""
    if not row.get("swap"):
        return row["trainable"]
    warmup = row.get("swap_warmup_steps") or 0
    return f"{row['swap_cross_attention']}, {row['swap_freeze']}" + (f", warm-up {warmup}" if warmup else "")


def summarise(rows: list[dict]) -> list[dict]:
    """One summary per (grid point, block or swap, init, arm), aggregated over seeds, in the rows' order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(json.dumps(r["grid"], sort_keys=True), run_label(r), r["init"], run_arm(r))].append(r)
    out = []
    for (grid, block, init, arm), rs in groups.items():
        rec = [r for r in rs if r["recovered"]]
        steps = [r["steps_to_recover"] for r in rec]
        fracs = [r["fraction_of_original"] for r in rec if r["fraction_of_original"] is not None]
        tokens = [r["tokens_to_recover"] for r in rec if r["tokens_to_recover"] is not None]
        jumps = [r["after_reset_eval_loss"] / r["baseline_eval_loss"] - 1 for r in rs if r["baseline_eval_loss"]]
        scratch = [r["original_steps_to_same_loss"] for r in rs if r.get("original_steps_to_same_loss")]
        # cost with unrecovered runs counted at the steps they trained: a lower bound, marked "censored"
        cost = [r["steps_to_recover"] if r["recovered"] else r["steps_trained"] for r in rs]
        budget = rs[0]["original_steps"]
        out.append(
            {
                "grid": json.loads(grid),
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
                "scratch_steps": _mean_sd(scratch),
                "original_steps": budget,
                "cost": statistics.fmean(cost),
                "cost_fraction": statistics.fmean(cost) / budget if budget else math.nan,
                "censored": len(rec) < len(rs),
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
            f"| {_grid_label(s['grid'])} | {s['block']}{'' if s['init'] == 'scratch' else ' (' + s['init'] + ')'} "
            f"| {s['arm']} | {_fmt(100 * s['jump'][0], 100 * s['jump'][1], 2)}% | {_steps_cell(s)}{unrec} "
            f"| {_frac_cell(s)} | {_fmt(*s['tokens'])} "
            f"| {s['recovered']}/{s['runs']} | {_fmt(*s['scratch_steps'])} |"
        )
    return "\n".join(lines)


def _steps_cell(s: dict) -> str:
    return f"≥{s['cost']:.0f}" if s["recovered"] == 0 else _fmt(*s["steps"]) + ("+" if s["censored"] else "")


def _frac_cell(s: dict) -> str:
    if s["recovered"] == 0:
        return f"≥{100 * s['cost_fraction']:.1f}%" if s["cost_fraction"] == s["cost_fraction"] else "n/a"
    return _fmt(100 * s["fraction"][0], 100 * s["fraction"][1], 1) + "%"


def table_text(summary: list[dict]) -> str:
    """A compact plain-text table for the terminal."""
    head = f"{'base':<18} {'block':<22} {'arm':<42} {'jump':>7} {'steps':>12} {'% orig':>12} {'rec':>5}"
    lines = [head, "-" * len(head)]
    for s in summary:
        lines.append(
            f"{_grid_label(s['grid'])[:18]:<18} {s['block'][:22]:<22} {s['arm'][:42]:<42} "
            f"{100 * s['jump'][0]:6.2f}% {_steps_cell(s):>12} {_frac_cell(s):>12} "
            f"{s['recovered']:>2}/{s['runs']:<2}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ words
def answer_in_words(rows: list[dict], summary: list[dict]) -> list[str]:
    """The answer to "how much re-training does a wiped layer need, and do L, N, D matter", from the numbers."""
    out = []
    layer_rows = [s for s in summary if s["layer"] is not None and s["init"] == "scratch" and s["arm"] == "block"]
    grids = {json.dumps(s["grid"], sort_keys=True) for s in summary}
    first = rows[0]
    tol = first["tolerance"]
    for grid in sorted(grids):
        mine = [
            s
            for s in layer_rows
            if json.dumps(s["grid"], sort_keys=True) == grid and s["cost_fraction"] == s["cost_fraction"]
        ]
        if not mine:
            continue
        label = _grid_label(json.loads(grid))
        base_rows = [r for r in rows if json.dumps(r["grid"], sort_keys=True) == grid]
        budget = base_rows[0]["original_steps"]
        dear = max(mine, key=lambda s: s["cost_fraction"])
        cheap = min(mine, key=lambda s: s["cost_fraction"])
        fr = [s["cost_fraction"] for s in mine]
        censored = (
            " (≥: some runs had not recovered when they stopped, so the true cost is higher)"
            if any(s["censored"] for s in mine)
            else ""
        )
        out.append(
            f"**{label}** (original budget {budget} steps): re-learning one reset layer with the rest frozen got the "
            f"validation loss back within {100 * tol:g}% in {_cost(cheap)} to {_cost(dear)} of the original "
            f"budget (mean {_pct(statistics.fmean(fr))}){censored}. Dearest: {dear['block']} ({_cost(dear)}; the reset "
            f"raised the loss {100 * dear['jump'][0]:.1f}%). Cheapest: {cheap['block']} ({_cost(cheap)}; loss "
            f"+{100 * cheap['jump'][0]:.1f}%)."
        )
        if len(mine) >= 3:
            xs = [s["layer"] for s in mine]
            fr = [s["cost_fraction"] for s in mine]
            rho = _spearman(xs, fr)
            trend = (
                "later layers cost more"
                if rho > 0.5
                else "earlier layers cost more"
                if rho < -0.5
                else "no clear trend with depth"
            )
            out.append(f"  Position: Spearman correlation of layer index with cost {rho:+.2f} ({trend}).")
        scratch = [s["scratch_steps"][0] for s in mine if not math.isnan(s["scratch_steps"][0])]
        steps = [s["steps"][0] for s in mine if not math.isnan(s["steps"][0])]
        if scratch and steps:
            out.append(
                f"  From scratch, the original run first reached the same loss at step {statistics.fmean(scratch):.0f} "
                f"on average; re-learning one layer took {statistics.fmean(steps):.0f} steps "
                f"({statistics.fmean(steps) / statistics.fmean(scratch):.2f}x)."
            )
    not_rec = [s for s in summary if s["recovered"] < s["runs"]]
    if not_rec:
        out.append(
            "Not every run recovered within its step limit: "
            + ", ".join(
                f"{s['block']} [{s['arm']}] {s['runs'] - s['recovered']} of {s['runs']} unrecovered" for s in not_rec
            )
            + " (their cost is a lower bound)."
        )
    arms = sorted({s["arm"] for s in summary})
    if len(arms) > 1 and "block" in arms:
        by = defaultdict(dict)
        for s in summary:
            if not math.isnan(s["steps"][0]):
                by[(json.dumps(s["grid"], sort_keys=True), s["block"], s["init"])][s["arm"]] = s["steps"][0]
        for arm in arms:
            if arm == "block":
                continue
            pairs = [(v[arm], v["block"]) for v in by.values() if arm in v and "block" in v]
            if pairs and sum(b for _, b in pairs):
                ratio = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
                out.append(
                    f"Arm '{arm}' ({ARM_LABELS.get(arm, arm)}) needed {ratio:.2f}x the steps of training only the "
                    f"block (summed over {len(pairs)} blocks; <1 = faster)."
                )
    for key, name in (
        ("n_layer", "depth N"),
        ("num_hidden_layers", "depth N"),
        ("n_embd", "width D"),
        ("hidden_size", "width D"),
        ("d_model", "width D"),
    ):
        values = sorted({s["grid"].get(key) for s in layer_rows if key in s["grid"]})
        if len(values) > 1:
            parts = []
            for v in values:
                fr = [
                    s["fraction"][0]
                    for s in layer_rows
                    if s["grid"].get(key) == v and not math.isnan(s["fraction"][0])
                ]
                if fr:
                    parts.append(f"{key}={v}: mean {_pct(statistics.fmean(fr))}")
            out.append(f"{name.capitalize()}: " + "; ".join(parts) + " of the original budget per reset layer.")
    return out + swap_answer(summary)


DEFAULT_SWAP_ARM = "reset, decoder-except-cross"


def _recovery(s: dict) -> str:
    """'recovered in N steps (F% of the budget)' or the lower bound when not every seed recovered."""
    seeds = f"{s['recovered']}/{s['runs']} seeds"
    if s["recovered"] == 0:
        return f"had not recovered when it stopped at {s['cost']:.0f} steps (≥{_pct(s['cost_fraction'])} of the budget; {seeds})"
    bound = "≥" if s["censored"] else ""
    return f"recovered in {bound}{s['cost']:.0f} steps ({bound}{_pct(s['cost_fraction'])} of the budget; {seeds})"


def _same_steps(s: dict) -> str:
    """'; after its N steps its loss was X, where the same model from scratch for N steps was at Y'."""
    if s["scratch_at_end"] is None:
        return ""
    gap = s["after"] - s["baseline"]
    closed = f" (it closed {100 * (s['after'] - s['final_loss']) / gap:.0f}% of the gap)" if gap > 0 else ""
    return (
        f"; after its {s['steps_trained']:.0f} steps its loss was {s['final_loss']:.3f}{closed}, where the same model "
        f"trained from scratch for {s['steps_trained']:.0f} steps was at {s['scratch_at_end']:.3f}"
    )


def swap_answer(summary: list[dict]) -> list[str]:
    """The encoder-swap question in words: after a swap with wiped cross-attention, how does recovery compare with
    wiping one layer's cross-attention, with wiping all of it, and with training the same model from scratch?

    Empty when the study has no swap runs. Costs count an unrecovered run at the steps it trained (a lower bound,
    marked ≥). "From scratch" is the base run's own validation curve: the step at which training the base model
    from its random init first reached the same threshold (``original_steps_to_same_loss``).
    """
    swaps = [s for s in summary if s["swap"]]
    if not swaps:
        return []
    out = []
    blocks = [s for s in summary if not s["swap"] and s["block"].endswith(".cross_attention") and s["arm"] == "block"]
    one = next((s for s in blocks if s["layer"] is not None), None)
    every = next((s for s in blocks if s["layer"] is None), None)
    budget = swaps[0]["original_steps"]
    scratch = [s["scratch_steps"][0] for s in summary if not math.isnan(s["scratch_steps"][0])]
    scratch_steps = statistics.fmean(scratch) if scratch else None
    out.append(
        f"**Encoder swaps** (original budget {budget} steps; recovered = validation loss back within "
        f"{100 * swaps[0]['tolerance']:g}% of the intact model's):"
    )
    for s in swaps:
        width = f"encoder width {s['old_width']} → {s['swap_width']}" if s["swap_width"] else "encoder swapped"
        out.append(
            f"  {s['block']} ({width}; {s['arm']}): loss {s['baseline']:.3f} → {s['after']:.3f} "
            f"(+{100 * s['jump'][0]:.1f}%), {_recovery(s)}{_same_steps(s)}."
        )
    for name, s in (("one decoder layer's cross-attention wiped", one), ("all cross-attention wiped", every)):
        if s is not None:
            out.append(
                f"  {name} ({s['block']}, same encoder): loss +{100 * s['jump'][0]:.1f}%, {_recovery(s)}"
                f"{_same_steps(s)}."
            )
    heads = [s for s in swaps if s["arm"] == DEFAULT_SWAP_ARM] or swaps
    parts = []
    for s in heads:
        bits = []
        at_least = "≥" if s["censored"] else ""
        if one is not None and one["cost"]:
            bits.append(f"{at_least}{s['cost'] / one['cost']:.1f}x the steps of the one-layer wipe")
        if scratch_steps:
            bits.append(
                f"{at_least}{s['cost'] / scratch_steps:.2f}x the {scratch_steps:.0f} steps training from scratch needed"
            )
        if bits:
            parts.append(f"{s['block']}: " + " and ".join(bits))
    if parts:
        out.append(
            f"  Compared ({heads[0]['arm']}): "
            + "; ".join(parts)
            + ". From scratch = the base run's own validation curve (the same base architecture from its random "
            "init reaching the same loss), not a from-scratch run of the swapped architecture."
        )
    if scratch_steps:
        like = [s for s in swaps if s["cost"] >= scratch_steps]  # a lower bound already past it counts too
        faster = [s for s in swaps if s["cost"] < scratch_steps and not s["censored"]]
        open_ = [s for s in swaps if s["cost"] < scratch_steps and s["censored"]]

        def names(ss: list[dict]) -> str:
            return ", ".join(f"{s['block']} [{s['arm']}]" for s in ss)

        verdict = [f"  Verdict, against the {scratch_steps:.0f} steps from scratch:"]
        if like:
            verdict.append(f"{len(like)}/{len(swaps)} swap arms needed at least as many ({names(like)});")
        if faster:
            verdict.append(f"{len(faster)}/{len(swaps)} recovered in fewer ({names(faster)});")
        if open_:
            verdict.append(
                f"{len(open_)}/{len(swaps)} stopped unrecovered before that many steps, so undecided ({names(open_)});"
            )
        out.append(" ".join(verdict).rstrip(";") + ".")
    equal = [s for s in swaps if s["scratch_at_end"] is not None]
    if equal:
        ahead = [s for s in equal if s["final_loss"] < s["scratch_at_end"]]
        margins = [s["scratch_at_end"] - s["final_loss"] for s in ahead]
        line = (
            f"  Same number of steps: {len(ahead)}/{len(equal)} swap arms ended below the loss the same model had "
            "reached from scratch after as many steps"
        )
        if ahead:
            line += f" (by {min(margins):.3f} to {max(margins):.3f})"
        behind = [s for s in equal if s not in ahead]
        if behind:
            line += "; at or above it: " + ", ".join(f"{s['block']} [{s['arm']}]" for s in behind)
        out.append(
            line
            + (
                ". By that measure no swap acted like a full reset, even where it had not yet recovered to within "
                "the tolerance."
                if not behind
                else "."
            )
        )
    return out


def _cost(s: dict) -> str:
    return f"{'≥' if s['censored'] else ''}{100 * s['cost_fraction']:.1f}% ({s['cost']:.0f} steps)"


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    rx, ry = ranks(xs), ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return 0.0
    return statistics.correlation(rx, ry)


# ------------------------------------------------------------------------------------------------ plots
def make_plots(rows: list[dict], summary: list[dict], plots_dir: Path) -> list[Path]:
    """PNG plots: relearn curves vs the base's training curve, cost vs layer, arms side by side, cost vs N and D."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    made = []

    # 1. curves: per grid point, the base's own validation curve and each layer's relearn curve (first seed)
    grids = list(dict.fromkeys(json.dumps(r["grid"], sort_keys=True) for r in rows))
    fig, axes = plt.subplots(1, len(grids), figsize=(6.5 * len(grids), 4.5), squeeze=False)
    for ax, grid in zip(axes[0], grids, strict=True):
        rs = [
            r
            for r in rows
            if json.dumps(r["grid"], sort_keys=True) == grid and r["trainable"] == "block" and r["init"] == "scratch"
        ]
        if not rs:
            rs = [r for r in rows if json.dumps(r["grid"], sort_keys=True) == grid]
        seed0 = rs[0]["base_seed"]
        base_curve = rs[0]["base_curve"] or []
        if base_curve:
            ax.plot(*zip(*base_curve, strict=True), "k-o", lw=2, ms=3, label="base model's own training")
        cmap = plt.get_cmap("viridis")
        mine = [r for r in rs if r["base_seed"] == seed0 and r["seed"] == rs[0]["seed"]]
        for i, r in enumerate(mine):
            steps, values = zip(*r["curve"], strict=True)
            ax.plot(
                [max(s, 0.8) for s in steps],
                values,
                "-",
                color=cmap(i / max(1, len(mine) - 1)),
                lw=1.5,
                label=f"relearn {run_label(r)}",
            )
        ax.axhline(
            rs[0]["recovery_threshold"], color="grey", ls="--", lw=1, label=f"baseline + {100 * rs[0]['tolerance']:g}%"
        )
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps (log)")
        ax.set_ylabel(rs[0]["recovery_metric"])
        ax.set_title(f"{_grid_label(json.loads(grid))}: re-learning each layer vs the original training", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(_save(fig, plots_dir / "curves.png"))

    # 2. cost vs layer, one line per arm (and grid point), spread over seeds as error bars
    layer_sum = [
        s
        for s in summary
        if s["layer"] is not None and s["init"] == "scratch" and s["cost_fraction"] == s["cost_fraction"]
    ]
    if layer_sum:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in dict.fromkeys((json.dumps(s["grid"], sort_keys=True), s["arm"]) for s in layer_sum):
            ss = sorted(
                (s for s in layer_sum if (json.dumps(s["grid"], sort_keys=True), s["arm"]) == key),
                key=lambda s: s["layer"],
            )
            label = (
                f"{_grid_label(json.loads(key[0]))} · {key[1]}" if len(grids) > 1 else ARM_LABELS.get(key[1], key[1])
            )
            # a layer none of whose runs recovered is drawn at its lower bound (steps trained) with a hollow triangle
            ys = [100 * (s["fraction"][0] if s["recovered"] else s["cost_fraction"]) for s in ss]
            line = ax.errorbar(
                [s["layer"] for s in ss], ys, yerr=[100 * (s["fraction"][1] if s["recovered"] else 0) for s in ss],
                marker="o", capsize=3, label=label,
            )  # fmt: skip
            censored = [(s["layer"], y) for s, y in zip(ss, ys, strict=True) if s["censored"]]
            if censored:
                ax.scatter(*zip(*censored, strict=True), marker="^", s=90, facecolors="none",
                           edgecolors=line[0].get_color(), zorder=5)  # fmt: skip
            for s in ss:
                ax.scatter(
                    [s["layer"]] * len(s["fraction_list"]),
                    [100 * f for f in s["fraction_list"]],
                    s=8,
                    color="grey",
                    alpha=0.5,
                )
        ax.set_xlabel("reset layer L")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("steps to recover, % of original budget")
        ax.set_title("Cost of re-learning one layer, by position (mean ± sd over seeds)", fontsize=10)
        if any(s["censored"] for s in layer_sum):
            ax.scatter([], [], marker="^", facecolors="none", edgecolors="k", label="not all recovered: at least this")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(_save(fig, plots_dir / "cost_vs_layer.png"))

    # 3. arms side by side
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    if len(arms) > 1:
        blocks = list(dict.fromkeys(s["block"] for s in summary if json.dumps(s["grid"], sort_keys=True) == grids[0]))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(blocks) * len(arms) / 2), 4.5))
        width = 0.8 / len(arms)
        for j, arm in enumerate(arms):
            vals, hatches = [], []
            for b in blocks:
                s = next(
                    (
                        s
                        for s in summary
                        if s["block"] == b and s["arm"] == arm and json.dumps(s["grid"], sort_keys=True) == grids[0]
                    ),
                    None,
                )
                vals.append(s["cost"] if s else 0)  # unrecovered runs count with the steps they trained
                hatches.append("//" if s and s["censored"] else "")
            bars = ax.bar([i + j * width for i in range(len(blocks))], vals, width, label=ARM_LABELS.get(arm, arm))
            for bar, hatch in zip(bars, hatches, strict=True):
                bar.set_hatch(hatch)
        ax.set_xticks([i + width * (len(arms) - 1) / 2 for i in range(len(blocks))], blocks, rotation=30, ha="right")
        ax.set_ylabel("steps to recover (mean; hatched = lower bound)")
        ax.set_title(f"Trainable arms side by side ({_grid_label(json.loads(grids[0]))})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(_save(fig, plots_dir / "arms.png"))

    # 4. depth and width: cost vs relative position, one line per grid value
    for key, label in (
        ("n_layer", "depth N"),
        ("num_hidden_layers", "depth N"),
        ("num_layers", "depth N"),
        ("n_embd", "width D"),
        ("hidden_size", "width D"),
        ("d_model", "width D"),
    ):
        values = sorted({s["grid"].get(key) for s in layer_sum if key in s["grid"]})
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v in values:
            ss = sorted(
                (s for s in layer_sum if s["grid"].get(key) == v and s["arm"] == "block"),
                key=lambda s: s["relative_depth"] or 0,
            )
            if ss:
                ax.plot(
                    [s["relative_depth"] for s in ss], [100 * s["fraction"][0] for s in ss], "-o", label=f"{key}={v}"
                )
        ax.set_xlabel("relative position of the reset layer (0 = first, 1 = last)")
        ax.set_ylabel("steps to recover, % of original budget")
        ax.set_title(f"Does {label} change the cost?")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(_save(fig, plots_dir / f"cost_vs_{'depth' if 'depth' in label else 'width'}.png"))
    if any(r.get("swap") for r in rows):
        made.append(_swap_plot(rows, plots_dir / "swap_recovery.png"))
    return made


def _swap_plot(rows: list[dict], path: Path) -> Path:
    """Swap runs' eval-loss curves against the base's own from-scratch curve, on linear steps (first seed).

    Left: each swap in its default arm, with the one-layer and all-layers cross-attention wipes. Right: every arm of
    each swap. The black line is the same model trained from its random init (the base run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed0 = rows[0]["base_seed"]
    mine = [r for r in rows if r["base_seed"] == seed0]
    swaps = [r for r in mine if r.get("swap")]
    defaults = [r for r in swaps if run_arm(r) == DEFAULT_SWAP_ARM] or swaps
    wipes = [r for r in mine if not r.get("swap") and r["block"].endswith(".cross_attention")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, group, title in (
        (axes[0], defaults + wipes, "encoder swaps vs cross-attention wipes vs from scratch"),
        (axes[1], swaps, "every swap arm"),
    ):
        base_curve = mine[0]["base_curve"] or []
        if base_curve:
            ax.plot(*zip(*base_curve, strict=True), "k-", lw=2.5, label="same model from scratch (base run)")
        cmap = plt.get_cmap("tab10")
        seen = set()
        for i, r in enumerate(group):
            key = (run_label(r), run_arm(r))
            if key in seen:
                continue  # first seed only
            seen.add(key)
            steps, values = zip(*r["curve"], strict=True)
            label = run_label(r) if ax is axes[0] else f"{run_label(r)} [{run_arm(r)}]"
            ax.plot(steps, values, "-" if r.get("swap") else "--", color=cmap(i % 10), lw=1.4, label=label)
        ax.axhline(rows[0]["recovery_threshold"], color="grey", ls=":", lw=1,
                   label=f"baseline + {100 * rows[0]['tolerance']:g}%")  # fmt: skip
        ax.set_xlabel("optimizer steps")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6.5)
    axes[0].set_ylabel(rows[0]["recovery_metric"])
    lows = [v for r in mine for _, v in r["curve"]] + [rows[0]["recovery_threshold"]]
    axes[0].set_ylim(min(lows) - 0.05, max(lows) + 0.1)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ report
def build_report(study_dir: str | os.PathLike) -> dict:
    """Rebuild ``report.md`` and ``plots/`` from ``results.csv`` alone; returns paths, the table and the answer."""
    study_dir = Path(study_dir)
    rows = read_results(study_dir / RESULTS)
    if not rows:
        raise RelearnError(f"{study_dir / RESULTS} has no rows yet")
    summary = summarise(rows)
    plots = make_plots(rows, summary, study_dir / "plots")
    words = answer_in_words(rows, summary)
    warnings = _warnings(rows)
    first = rows[0]
    lines = [f"# hf-relearn study: {first['study']}", "", f"Base model: {first['base_model']}.", ""]
    if warnings:
        lines += ["> **Read this first — these make recovery numbers mislead:**", ">"]
        lines += [f"> - {w}" for w in warnings] + [""]
    lines += ["## The answer", ""] + [f"- {w.strip()}" for w in words] + [""]
    lines += [
        "## Table",
        "",
        f"Recovered = validation {first['recovery_metric']} back within {100 * first['tolerance']:g}% of the intact "
        f"model's, held for {first['patience']} evaluation(s). Mean ± sd over seeds; runs that did not recover are "
        "left out of the means and counted in the 'recovered' column.",
        "",
        table_markdown(summary),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += [
        "## How this was measured",
        "",
        f"- {len(rows)} relearn runs; objective {first['objective']}; bases trained {first['base_steps']} steps "
        f"(eval loss {first['base_final_eval_loss']}) per seed.",
        "- Each run: the intact base model's validation loss (baseline), the block reset to its from-scratch "
        "distribution, everything else frozen (proven bit-identical after training: "
        f"{sum(bool(r['frozen_unchanged']) for r in rows)}/{len(rows)} runs), then training until recovered.",
        *(
            [
                "- Encoder swaps (rows with a `swap` name): a new encoder built from config (fresh weights, the width in "
                "`swap_width`), the decoder's cross-attention reset (or zeroed) and every cross-attention key/value "
                "resized to the new width where the model has no projection (see README, encoder swaps); the "
                "decoder's other tensors frozen and proven unchanged; arms in `swap_cross_attention`, `swap_freeze`, "
                "`swap_warmup_steps`. From scratch = the base run's own validation curve (`base_curve`)."
            ]
            if any(r.get("swap") for r in rows)
            else []
        ),
        f"- versions: {json.dumps(first['versions'])}",
        "",
        "Rebuild with `hf-relearn report` on this folder; raw numbers in `results.csv`, each run's curve in "
        "`runs/*/*/relearn_result.json`.",
    ]
    report = study_dir / "report.md"
    tmp = study_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, report)
    return {"report": report, "plots": plots, "table": table_text(summary), "answer": words, "warnings": warnings}


def _codes(row: dict, codes_column: str, warnings_column: str) -> list[str]:
    """A row's warning codes (rows written before codes existed: from the warnings' sentences)."""
    codes = row.get(codes_column)
    return list(codes) if isinstance(codes, list) else codes_of(row.get(warnings_column) or [])


def _warnings(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        for w in r.get("base_warnings") or []:
            msg = f"base {r['base_id']}: {w}"
            if msg not in out:
                out.append(msg)
    barely = sorted(
        {
            f"{r['block']} ({r['base_id']})"
            for r in rows
            if RESET_BARELY_MATTERED in _codes(r, "warning_codes", "warnings")
        }
    )
    if barely:
        out.append(
            "resets that barely raised the loss (already within the tolerance right after the reset; these layers did "
            f"little, their 'recovery' is cheap by construction): {', '.join(barely)}"
        )
    unigram = sorted({r["base_id"] for r in rows if UNIGRAM_LEVEL in _codes(r, "warning_codes", "warnings")})
    if unigram:
        out.append(f"bases no better than a unigram model of their data: {', '.join(unigram)}")
    changed = [r["run_id"] for r in rows if not r["frozen_unchanged"]]
    if changed:
        out.append(f"frozen tensors changed in: {', '.join(changed)}")
    return out
