"""Study plots: a study's rows and summary -> PNG files (matplotlib only, no torch).

``make_plots`` draws the relearn curves against the base's own training, the cost by reset layer (Kaplan-Meier
medians), the trainable arms side by side, recovery as survival curves per position class, and (with encoder swaps)
the swap runs' recovery. Every PNG is
written atomically (``_save``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..model.arm_registry import DEFAULT_ARM
from ..stats.summary import mean_sd
from ..stats.survival import summarise
from ..study.grid import GridPoint, grid_of
from .findings import arm_label, run_arm, run_label
from .grid_findings import (
    POSITIONS,
    damage_relative,
    fixed_budget,
    layer_runs,
    outcome,
    position,
    repaired_by_layer,
    row_arm,
)
from .swap_findings import DEFAULT_SWAP_ARM, arm_median


def make_plots(rows: list[dict], summary: list[dict], plots_dir: Path) -> list[Path]:
    """PNG plots: relearn curves vs the base's training curve, cost vs layer, arms side by side, recovery curves per
    position class."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    made = []

    # 1. curves: per grid point, the base's own validation curve and each layer's relearn curve (first seed)
    grids = list(dict.fromkeys(grid_of(r) for r in rows))
    made.append(_curves_plot(rows, grids, plots_dir / "curves.png"))

    # 2. cost vs layer, one line per arm (and grid point): Kaplan-Meier medians with their intervals
    costed = [r for r in layer_runs(rows) if r.get("original_steps") and r["init"] == "scratch"]
    if fixed_budget(layer_runs(rows)):  # every cost is the same budget: draw the damage repaired instead
        made.append(_repaired_plot(rows, plots_dir / "repaired.png"))
    elif costed:
        made.append(_cost_vs_layer_plot(rows, grids, plots_dir / "cost_vs_layer.png"))

    # 3. arms side by side, at the grid point that ran the most arms
    grid = arms_grid(summary, grids)
    arms = list(dict.fromkeys(s["arm"] for s in summary if grid_of(s) == grid))
    if len(arms) > 1:
        made.append(_arms_plot(summary, arms, grid, plots_dir / "arms.png"))

    # 4. recovery as survival curves, per grid point and position class
    if not fixed_budget(layer_runs(rows)):
        made += _survival_plot(rows, plots_dir)
    if any(r.get("swap") for r in rows):
        made.append(_swap_plot(rows, plots_dir / "swap_recovery.png"))
    return made


def _threshold_label(row: dict) -> str:
    """The recovery line's legend: a share of the intact loss, or (distill, intact loss 0) of that run's damage."""
    if damage_relative(row):
        return f"recovered: {100 * row['tolerance']:g}% of {row['block']}'s damage"
    return f"baseline + {100 * row['tolerance']:g}%"


def _repaired_plot(rows: list[dict], path: Path) -> Path:
    """A fixed-budget study: the share of the damage each reset layer's runs repaired, mean ± sd over seeds."""
    plt = _pyplot()
    runs = layer_runs(rows)
    by_layer = repaired_by_layer(runs)  # a layer whose resets did no damage has no share: it gets no bar
    layers = sorted(by_layer)
    stats = [mean_sd(by_layer[layer]) if by_layer[layer] else (0.0, 0.0) for layer in layers]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.bar(layers, [100 * m for m, _ in stats], yerr=[100 * sd for _, sd in stats], capsize=4)
    ax.set_xlabel("reset layer")
    ax.set_ylabel(f"damage repaired in {runs[0]['steps_trained']} steps (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Share of the reset's damage re-learned (mean ± sd over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def arms_grid(summary: list[dict], grids: list[GridPoint]) -> GridPoint:
    """The grid point whose arms the arms plot compares: the one that ran the most arms (the first such, in order)."""
    return max(grids, key=lambda g: len({s["arm"] for s in summary if grid_of(s) == g}))


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves_plot(rows: list[dict], grids: list[str], path: Path) -> Path:
    """One panel per grid point: the base's own validation curve and each layer's relearn curve (first seed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(6.5 * len(grids), 4.5), squeeze=False)
    for ax, grid in zip(axes[0], grids, strict=True):
        rs = [r for r in rows if grid_of(r) == grid and row_arm(r) == DEFAULT_ARM and r["init"] == "scratch"]
        if not rs:
            rs = [r for r in rows if grid_of(r) == grid]
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
        ax.axhline(rs[0]["recovery_threshold"], color="grey", ls="--", lw=1, label=_threshold_label(rs[0]))
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps (log)")
        ax.set_ylabel(rs[0]["recovery_metric"])
        ax.set_title(f"{grid_of(grid).label()}: re-learning each layer vs the original training", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _cost_vs_layer_plot(rows: list[dict], grids: list[str], path: Path) -> Path:
    """Cost by reset layer, one line per arm (and grid point): the Kaplan-Meier median over the layer's runs with its
    95% interval; where fewer than half came back, a hollow triangle at the longest share trained (not reached)."""
    import matplotlib.ticker

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = [r for r in layer_runs(rows) if r.get("original_steps") and r["init"] == "scratch"]
    keys = list(dict.fromkeys((grid_of(r), row_arm(r)) for r in runs))
    for key in keys:
        mine = [r for r in runs if (grid_of(r), row_arm(r)) == key]
        layers = sorted({r["layer"] for r in mine})
        stats = [summarise([outcome(r) for r in mine if r["layer"] == layer]) for layer in layers]
        label = f"{grid_of(key[0]).label()} · {key[1]}" if len(grids) > 1 else arm_label(key[1])
        reached = [(layer, st) for layer, st in zip(layers, stats, strict=True) if not math.isinf(st.median)]
        color = None
        if reached:
            xs, ys = [layer for layer, _ in reached], [100 * st.median for _, st in reached]
            low = [100 * (st.median - st.low) for _, st in reached]
            high = [100 * (min(st.high, st.followed) - st.median) for _, st in reached]
            line = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label)
            color = line[0].get_color()
        never = [(layer, 100 * st.followed) for layer, st in zip(layers, stats, strict=True) if math.isinf(st.median)]
        if never:
            ax.scatter(
                *zip(*never, strict=True),
                marker="^",
                s=90,
                facecolors="none",
                edgecolors=color or "k",
                label=None if reached else label,
                zorder=5,
            )
    ax.set_xlabel("reset layer L")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("steps to recover, % of original budget")
    ax.set_title("Cost of re-learning one layer (Kaplan-Meier median, 95% CI)", fontsize=10)
    ax.scatter([], [], marker="^", facecolors="none", edgecolors="k", label="median not reached within this")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def arm_bars(
    summary: list[dict], arms: list[str], grid: GridPoint | dict | str
) -> tuple[list[str], list[list[float]], list[list[bool]], str]:
    """What the arms plot draws at one grid point: its blocks, per arm a bar per block, which bars are lower bounds,
    and the axis label. Steps to recover: the Kaplan-Meier median over seeds (a run not back enters as "not back by
    its cap"; a median not reached is drawn at the longest follow-up, hatched: a lower bound); when every bar would be
    a lower bound, most bars sit at the same cap,
    so it draws instead how far above the intact model's loss each arm's runs ended (%, mean); where that loss is 0
    (distill: the teacher is the intact model), the share of the reset's damage left at the end (%, mean)."""
    grid = grid_of(grid)  # a grid point, or its mapping or JSON
    mine = [s for s in summary if grid_of(s) == grid]
    blocks = list(dict.fromkeys(s["block"] for s in mine))
    none_recovered = bool(mine) and not any(arm_median(s)[1] for s in mine)  # every bar a bound: most at the cap
    of_damage = any(s["baseline"] == 0 for s in mine)  # no "% above" a loss of 0

    def left(s: dict) -> float:
        if of_damage:
            return 100 * (s["final_loss"] - s["baseline"]) / (s["after"] - s["baseline"])
        return 100 * (s["final_loss"] / s["baseline"] - 1)

    values, bounds = [], []
    for arm in arms:
        found = [next((s for s in mine if s["block"] == b and s["arm"] == arm), None) for b in blocks]
        if none_recovered:
            values.append([left(s) if s else 0 for s in found])
            bounds.append([False for _ in found])
        else:
            medians = [arm_median(s) if s else (0, True) for s in found]
            values.append([steps for steps, _ in medians])
            bounds.append([not reached for _, reached in medians])
    label = "steps to recover (median over seeds;\nhatched = median not reached, a lower bound)"
    if none_recovered:
        left_what = "% of the reset's damage left" if of_damage else "% above the intact loss"
        label = f"{left_what} at the end\n(mean; every arm had runs unrecovered)"
    return blocks, values, bounds, label


def _arms_plot(summary: list[dict], arms: list[str], grid: str, path: Path) -> Path:
    """The trainable arms side by side per block, at one grid point (see ``arm_bars`` for what the bars are)."""
    plt = _pyplot()
    blocks, values, bounds, label = arm_bars(summary, arms, grid)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(blocks) * len(arms) / 2), 4.5))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        bars = ax.bar([i + j * width for i in range(len(blocks))], values[j], width, label=arm_label(arm))
        for bar, bound in zip(bars, bounds[j], strict=True):
            bar.set_hatch("//" if bound else "")
    ax.set_xticks([i + width * (len(arms) - 1) / 2 for i in range(len(blocks))], blocks, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"Trainable arms side by side ({grid_of(grid).label()})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _survival_plot(rows: list[dict], plots_dir: Path) -> list[Path]:
    """Recovery as survival curves: per grid point (a panel each), the share of runs back within the tolerance vs the
    share of the budget trained (1 - Kaplan-Meier), one line per position class, arm ``block``; ticks mark runs that
    stopped without coming back. The curves' points are written beside it (recovery_by_position.csv)."""
    from lifelines import KaplanMeierFitter

    runs = [r for r in layer_runs(rows) if row_arm(r) == DEFAULT_ARM and r.get("original_steps")]
    grids = list(dict.fromkeys(grid_of(r) for r in runs))
    if not runs:
        return []
    plt = _pyplot()
    cols = min(3, len(grids))
    nrows = -(-len(grids) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    points = ["grid point,position,share of budget,share of runs back"]
    for ax, grid in zip(axes.flat, grids, strict=False):
        label = grid_of(grid).label()
        for where in POSITIONS:
            mine = [outcome(r) for r in runs if grid_of(r) == grid and position(r) == where]
            if not mine:
                continue
            fitter = KaplanMeierFitter().fit([o.cost for o in mine], [o.recovered for o in mine])
            back = fitter.cumulative_density_.iloc[:, 0]
            ax.step(100 * back.index, back.values, where="post", label=f"{where} ({len(mine)} runs)")
            censored = [100 * o.cost for o in mine if not o.recovered]
            ax.plot(
                censored,
                [float(fitter.cumulative_density_at_times(c / 100).iloc[0]) for c in censored],
                "|",
                color=ax.lines[-1].get_color(),
                ms=10,
            )
            points += [f'"{label}",{where},{t:.6g},{v:.6g}' for t, v in zip(back.index, back.values, strict=True)]
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("% of the base's budget trained")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of runs back")
    for ax in list(axes.flat)[len(grids) :]:
        ax.axis("off")
    fig.suptitle(
        f"Back within {100 * runs[0]['tolerance']:g}%: one reset layer, the rest frozen (| = stopped, not back)",
        fontsize=10,
    )
    fig.tight_layout()
    (plots_dir / "recovery_by_position.csv").write_text("\n".join(points) + "\n")
    return [_save(fig, plots_dir / "recovery_by_position.png")]


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
        ax.axhline(
            rows[0]["recovery_threshold"],
            color="grey",
            ls=":",
            lw=1,
            label=f"baseline + {100 * rows[0]['tolerance']:g}%",
        )
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
