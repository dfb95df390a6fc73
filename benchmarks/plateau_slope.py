"""Where a run that never came back stood when it stopped, and whether it was still falling.

    python benchmarks/plateau_slope.py docs/results/wiped-layer-long-n4/results.csv

For every run not back within its tolerance: the loss at the end of its validation curve above the intact model's
(mean of the last 5 evaluations, %), and the slope of a straight line through the last fifth of the curve, in % of
the baseline per 1,000 steps, with its 95% interval (scipy.stats.linregress). A slope whose interval lies below 0 is
still falling; one that includes 0 is flat within the noise of the curve.
"""

from __future__ import annotations

import argparse
import json

from scipy import stats

from hf_relearn.storage import read_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a study's results.csv")
    args = parser.parse_args()
    print(
        "| base | block | steps trained (share of budget) | end, above the intact loss | slope over the last fifth (% per 1k steps, 95% CI) |"
    )
    print("|---|---|---:|---:|---:|")
    for r in read_results(args.results):
        if r["recovered"]:
            continue
        curve = r["curve"] if isinstance(r["curve"], list) else json.loads(r["curve"])
        base = r["baseline_eval_loss"]
        last = curve[-max(3, len(curve) // 5) :]
        steps = [s for s, _ in last]
        excess = [100 * (loss / base - 1) for _, loss in last]
        fit = stats.linregress(steps, excess)
        half = stats.t.ppf(0.975, len(last) - 2) * fit.stderr
        end = sum(100 * (loss / base - 1) for _, loss in curve[-5:]) / 5
        share = r["steps_trained"] / r["original_steps"]
        print(
            f"| {r['base_id']} | {r['block']} | {r['steps_trained']} ({100 * share:.0f}%) | {end:+.2f}% | "
            f"{1000 * fit.slope:+.3f} ({1000 * (fit.slope - half):+.3f} to {1000 * (fit.slope + half):+.3f}) |"
        )


if __name__ == "__main__":
    main()
