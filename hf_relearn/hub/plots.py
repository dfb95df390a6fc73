"""Plots of one run: values in, a PNG out (matplotlib only, no torch). The study's plots live in report plotting."""

from __future__ import annotations

from pathlib import Path


def plot_curve(result: dict, path: Path) -> Path:
    """The recovery curve (metric vs step, baseline and threshold marked) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps, values = zip(*result["curve"], strict=True)
    ax.plot(steps, values, "-o", ms=3, label=f"re-learning {result['block']}")
    if result.get("original_curve"):  # the original training from scratch, on the same rows and step axis
        o_steps, o_values = zip(*result["original_curve"], strict=True)
        ax.plot(o_steps, o_values, "-s", ms=3, color="tab:orange", label="original training (its checkpoints)")
        ax.set_xlim(0, max(steps) * 1.05)
    ax.axhline(result["baseline_metric"], color="k", lw=1, label="intact model")
    ax.axhline(result["recovery_threshold"], color="grey", ls="--", lw=1, label="recovery threshold")
    if result["recovered"]:
        ax.axvline(
            result["steps_to_recover"], color="green", ls=":", lw=1, label=f"recovered at {result['steps_to_recover']}"
        )
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(result["recovery_metric"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probe(rows: list[dict], path: Path, title: str) -> Path:
    """The probe as bars: loss right after each block's reset (one bar per init; scratch seeds as mean with sd),
    the intact model's loss as a line."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(dict.fromkeys(r["block"] for r in rows))
    inits = list(dict.fromkeys(r["init"] for r in rows))
    width = 0.8 / len(inits)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(blocks) * len(inits) + 2), 3.8))
    for k, init in enumerate(inits):
        means, sds = [], []
        for b in blocks:
            losses = [r["loss"] for r in rows if r["block"] == b and r["init"] == init] or [float("nan")]
            means.append(statistics.fmean(losses))
            sds.append(statistics.stdev(losses) if len(losses) > 1 else 0.0)
        xs = [i + (k - (len(inits) - 1) / 2) * width for i in range(len(blocks))]
        ax.bar(xs, means, width, yerr=sds if any(sds) else None, label=f"after reset ({init})")
    base = rows[0]["baseline_loss"]
    if base > 0:
        ax.axhline(base, color="k", lw=1, label="intact model")
    losses = [r["loss"] for r in rows if r["loss"] > 0]
    if losses and max(losses) > 20 * min(losses):
        ax.set_yscale("log")  # one block's reset can cost 100x another's: keep the small ones readable
    ax.set_xticks(range(len(blocks)), blocks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("validation loss, no training" + ("" if base > 0 else " (intact: 0)"))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
