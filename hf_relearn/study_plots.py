"""Study plots: a study's rows and summary -> PNG files (matplotlib only, no torch).

``make_plots`` draws the relearn curves against the base's own training, the cost by reset layer, the trainable
arms side by side, the cost against depth and width, and (with encoder swaps) the swap runs' recovery. Every PNG is
written atomically (``_save``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .findings import DEFAULT_SWAP_ARM, _grid_label, arm_label, run_arm, run_label
from .grid_findings import damage_relative, fixed_budget, layer_runs, repaired_by_layer, row_arm, run_cost
from .stats import mean_sd


def make_plots(rows: list[dict], summary: list[dict], plots_dir: Path) -> list[Path]:
    """PNG plots: relearn curves vs the base's training curve, cost vs layer, arms side by side, cost vs N and D."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    made = []

    # 1. curves: per grid point, the base's own validation curve and each layer's relearn curve (first seed)
    grids = list(dict.fromkeys(json.dumps(r["grid"], sort_keys=True) for r in rows))
    made.append(_curves_plot(rows, grids, plots_dir / "curves.png"))

    # 2. cost vs layer, one line per arm (and grid point), spread over seeds as error bars
    layer_sum = [
        s
        for s in summary
        if s["layer"] is not None and s["init"] == "scratch" and s["cost_fraction"] == s["cost_fraction"]
    ]
    if fixed_budget(layer_runs(rows)):  # every cost is the same budget: draw the damage repaired instead
        made.append(_repaired_plot(rows, plots_dir / "repaired.png"))
    elif layer_sum:
        made.append(_cost_vs_layer_plot(layer_sum, grids, plots_dir / "cost_vs_layer.png"))

    # 3. arms side by side, at the grid point that ran the most arms
    grid = arms_grid(summary, grids)
    arms = list(dict.fromkeys(s["arm"] for s in summary if json.dumps(s["grid"], sort_keys=True) == grid))
    if len(arms) > 1:
        made.append(_arms_plot(summary, arms, grid, plots_dir / "arms.png"))

    # 4. depth and width: cost vs relative position, one line per grid value
    made += _relative_depth_plot(rows, plots_dir)
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


def arms_grid(summary: list[dict], grids: list[str]) -> str:
    """The grid point whose arms the arms plot compares: the one that ran the most arms (the first such, in order)."""
    return max(grids, key=lambda g: len({s["arm"] for s in summary if json.dumps(s["grid"], sort_keys=True) == g}))


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
        rs = [
            r
            for r in rows
            if json.dumps(r["grid"], sort_keys=True) == grid and row_arm(r) == "block" and r["init"] == "scratch"
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
        ax.axhline(rs[0]["recovery_threshold"], color="grey", ls="--", lw=1, label=_threshold_label(rs[0]))
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps (log)")
        ax.set_ylabel(rs[0]["recovery_metric"])
        ax.set_title(f"{_grid_label(json.loads(grid))}: re-learning each layer vs the original training", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _cost_vs_layer_plot(layer_sum: list[dict], grids: list[str], path: Path) -> Path:
    """Cost by reset layer, one line per arm (and grid point); mean ± sd over seeds, each seed a grey dot."""
    import matplotlib.ticker

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((json.dumps(s["grid"], sort_keys=True), s["arm"]) for s in layer_sum):
        ss = sorted(
            (s for s in layer_sum if (json.dumps(s["grid"], sort_keys=True), s["arm"]) == key),
            key=lambda s: s["layer"],
        )
        label = f"{_grid_label(json.loads(key[0]))} · {key[1]}" if len(grids) > 1 else arm_label(key[1])
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
    return _save(fig, path)


def arm_bars(
    summary: list[dict], arms: list[str], grid: str
) -> tuple[list[str], list[list[float]], list[list[bool]], str]:
    """What the arms plot draws at one grid point: its blocks, per arm a bar per block, which bars are lower bounds,
    and the axis label. Steps to recover (a run that did not recover counts at the steps it trained: a lower bound);
    when every bar would be a lower bound (each arm had runs that did not recover), most bars sit at the same cap,
    so it draws instead how far above the intact model's loss each arm's runs ended (%, mean); where that loss is 0
    (distill: the teacher is the intact model), the share of the reset's damage left at the end (%, mean)."""
    mine = [s for s in summary if json.dumps(s["grid"], sort_keys=True) == grid]
    blocks = list(dict.fromkeys(s["block"] for s in mine))
    none_recovered = bool(mine) and all(s["censored"] for s in mine)  # every bar a lower bound: most at the cap
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
            values.append([s["cost"] if s else 0 for s in found])
            bounds.append([bool(s and s["censored"]) for s in found])
    label = "steps to recover (mean; hatched = lower bound)"
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
    ax.set_title(f"Trainable arms side by side ({_grid_label(json.loads(grid))})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _relative_depth_plot(rows: list[dict], plots_dir: Path) -> list[Path]:
    """Cost vs the reset layer's relative depth L/(N-1), one line per grid point (N, D), arm ``block``; mean ± sd
    over seeds (a run that did not recover counts at its steps trained, drawn hollow: a lower bound)."""
    runs = [r for r in layer_runs(rows) if row_arm(r) == "block" and r.get("relative_depth") is not None]
    grids = list(dict.fromkeys(json.dumps(r["grid"], sort_keys=True) for r in runs))
    if not runs or (len(grids) < 2 and len({r["layer"] for r in runs}) < 2):
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = ["grid point,relative depth,runs,cost mean,cost sd,any unrecovered"]  # the numbers behind the plot
    for grid in grids:
        mine = [r for r in runs if json.dumps(r["grid"], sort_keys=True) == grid]
        depths = sorted({r["relative_depth"] for r in mine})
        stats = [mean_sd([run_cost(r) for r in mine if r["relative_depth"] == d]) for d in depths]
        label = ", ".join(f"{k}={v}" for k, v in json.loads(grid).items()) or "base"
        for d, (m, sd) in zip(depths, stats, strict=True):
            at = [r for r in mine if r["relative_depth"] == d]
            points.append(f'"{label}",{d:g},{len(at)},{m:.6g},{sd:.6g},{any(not r["recovered"] for r in at)}')
        line = ax.errorbar(depths, [100 * m for m, _ in stats], yerr=[100 * sd for _, sd in stats], fmt="-o", ms=4,
                           capsize=3, label=label)  # fmt: skip
        censored = [(d, m) for d, (m, _) in zip(depths, stats, strict=True)
                    if any(not r["recovered"] for r in mine if r["relative_depth"] == d)]  # fmt: skip
        if censored:
            ax.plot([d for d, _ in censored], [100 * m for _, m in censored], "o", mfc="white",
                    color=line[0].get_color(), ms=8)  # fmt: skip
    ax.set_xlabel("relative depth of the reset layer, L/(N-1)  (0 = first, 1 = last)")
    ax.set_ylabel("steps to recover, % of the base's budget")
    ax.set_title("Cost of re-learning one layer vs its relative depth")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    (plots_dir / "cost_vs_relative_depth.csv").write_text("\n".join(points) + "\n")
    return [_save(fig, plots_dir / "cost_vs_relative_depth.png")]


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
