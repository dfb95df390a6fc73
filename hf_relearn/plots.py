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
