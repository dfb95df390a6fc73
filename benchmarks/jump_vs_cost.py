"""Does a larger loss jump right after the reset mean a dearer re-learning? Per trained base, over every published study.

    python benchmarks/jump_vs_cost.py [--tolerance 0.05]

For each base (each stack of an encoder-decoder apart) with 3 or more reset layers (the recipe's own arm: only the block trainable, its own relearn settings,
no swaps): Spearman's rho over its layers of the reset's jump with the cost of re-learning (to the runs' own
tolerance, or ``--tolerance``), a cost not reached entering by its Gehan score among the base's runs
(``grid_findings.jump_cost_signs``). A base used by several studies (a learning-rate check re-uses its parent's
bases) counts once. Then a sign test over the bases: the base is the unit, not the run.
"""

from __future__ import annotations

import argparse
import glob
from collections import defaultdict
from pathlib import Path

from scipy import stats

from hf_relearn.arm_registry import DEFAULT_ARM
from hf_relearn.grid_findings import fixed_budget, jump_cost_signs, layer_runs, row_arm
from hf_relearn.storage import read_results

ROOT = Path(__file__).resolve().parents[1]


def signs(tolerance: float | None = None) -> list[dict]:
    """One entry per distinct base: its study, base id, how many layers, and rho of jump with cost."""
    out, seen = [], set()
    for path in sorted(glob.glob(str(ROOT / "docs/results/*/results.csv"))):
        rows = [r for r in layer_runs(read_results(path)) if row_arm(r) == DEFAULT_ARM and r.get("original_steps")]
        if not rows or fixed_budget(rows):  # a fixed budget has no cost to rank (its answer is the damage repaired)
            continue
        if tolerance is not None and any(tolerance < r["tolerance"] for r in rows):
            continue  # a looser curve cannot be read at a tighter tolerance
        by_base = defaultdict(list)
        for r in rows:
            by_base[(r["base_id"], r.get("stack"))].append(r)  # an encoder's layer 0 is not its decoder's
        for (base, stack), runs in by_base.items():
            key = (round(runs[0]["baseline_eval_loss"], 6), runs[0].get("base_steps"), stack)  # the same checkpoint
            if key in seen:
                continue
            seen.add(key)
            rho = jump_cost_signs(runs, tolerance).get(base)
            if rho is not None:
                layers = len({r["layer"] for r in runs})
                name = f"{base} ({stack})" if stack and stack != "decoder" else base
                out.append({"study": Path(path).parent.name, "base": name, "layers": layers, "rho": rho})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=None, help="e.g. 0.05 (default: each run's own)")
    args = parser.parse_args()
    found = signs(args.tolerance)
    print("| study | base | layers | rho (jump, cost) |")
    print("|---|---|---:|---:|")
    for s in found:
        print(f"| {s['study']} | {s['base']} | {s['layers']} | {s['rho']:+.2f} |")
    up, down = sum(s["rho"] > 0 for s in found), sum(s["rho"] < 0 for s in found)
    p = stats.binomtest(up, up + down, 0.5).pvalue if up + down else float("nan")
    print(
        f"\n{len(found)} distinct bases: a larger jump went with a higher cost in {up}, a lower one in {down}, "
        f"neither in {len(found) - up - down} (sign test over bases, p = {p:.3g})"
    )


if __name__ == "__main__":
    main()
