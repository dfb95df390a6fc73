"""Analyses that read published studies' results.csv files (no torch): ``hf-relearn analyze NAME [RESULTS ...]``.

- ``give-up``: could a study give up early on runs that will not recover? Replays give-up rules, evaluation by
  evaluation, over every run's validation curve (what the rule would have seen while the run trained).
- ``jump-cost``: does a larger loss jump right after the reset mean a dearer re-learning? Per trained base, then a
  sign test over the bases (the base is the unit, not the run).
- ``plateau``: where each run that never came back stood when it stopped, and whether it was still falling.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ..model.arm_registry import DEFAULT_ARM
from ..relearn.result import stretch_start
from ..storage import read_results
from .grid_findings import fixed_budget, higher_is_better, jump_cost_signs, layer_runs, row_arm

GiveUpRule = Callable[[list, float, bool, int], bool]


def _best_so_far(curve: list[tuple[int, float]], higher: bool) -> list[tuple[int, float]]:
    """(step, best value so far) as a loss (lower is better)."""
    sign, best, out = (-1 if higher else 1), math.inf, []
    for step, value in curve:
        if not math.isnan(value):
            best = min(best, sign * value)
        out.append((step, best))
    return out


def pace_gives_up(curve, threshold, higher, cap, patience, window, margin) -> bool:
    """True when, even at its average pace over the last stretch (the longer of ``patience`` evaluations and the
    last ``window`` share of the steps so far) kept up to ``cap``, the run's best metric would miss ``threshold`` by
    more than ``margin`` times that projected progress (``margin`` 1: a plain linear projection)."""
    history = _best_so_far(curve, higher)
    if len(history) <= patience or math.isinf(history[-1][1]):
        return False
    step_now, best_now = history[-1]
    start = stretch_start(history, patience, window)
    if start < 0 or math.isinf(history[start][1]):
        return False
    step_then, best_then = history[start]
    pace = (best_then - best_now) / (step_now - step_then)
    gap = best_now - (-threshold if higher else threshold)
    return gap > margin * pace * (cap - step_now)


def plateau_gives_up(curve, threshold, higher, cap, patience) -> bool:
    """``transformers.EarlyStoppingCallback`` on the recovery metric: True after ``patience`` evaluations in a row
    without a new best (threshold 0), as a user would wire it in."""
    history = _best_so_far(curve, higher)
    if len(history) <= patience:
        return False
    return history[-1][1] >= history[-1 - patience][1]


def give_up_rules() -> dict[str, GiveUpRule]:
    """The rules replayed by default: pace (P evaluations, W share, margin M) and plateau (P evaluations)."""
    rules: dict[str, GiveUpRule] = {}
    for p, w, m in itertools.product((6, 12), (0.25, 0.5), (1, 2, 8)):
        rules[f"pace P={p} W={w} M={m}"] = lambda c, t, h, cap, p=p, w=w, m=m: pace_gives_up(c, t, h, cap, p, w, m)
    for p in (5, 10, 20, 50):
        rules[f"plateau P={p}"] = lambda c, t, h, cap, p=p: plateau_gives_up(c, t, h, cap, p)
    return rules


def distinct_runs(paths: Iterable[str | Path]) -> list[dict]:
    """Every run of the studies' results.csv files once: a learning-rate check's own arm repeats its parent study's
    runs bit for bit (same bases, settings and seeds), and a curve seen twice is counted once. A run's cap is its
    study's longest run (the steps its unrecovered runs trained)."""
    runs, seen = [], set()
    for path in sorted(Path(p) for p in paths):
        rows = read_results(path)
        cap = max(r["steps_trained"] for r in rows)
        for r in rows:
            key = (r["recovery_threshold"], json.dumps(r["curve"]))
            if key in seen:
                continue
            seen.add(key)
            runs.append(
                {
                    "study": path.parent.name,
                    "run": r["run_id"],
                    "recovered": bool(r["recovered"]),
                    "steps_to_recover": r["steps_to_recover"],
                    "steps_trained": r["steps_trained"],
                    "threshold": r["recovery_threshold"],
                    "higher": higher_is_better(r),
                    "cap": cap,
                    "curve": [(int(s), float(v)) for s, v in r["curve"] if s > 0],  # evaluations during training
                }
            )
    return runs


def replay(runs: list[dict], gives_up: GiveUpRule) -> dict:
    """The first evaluation at which ``gives_up`` fires, per run: the recovered runs it would have stopped before
    they recovered (false give-ups) and the share of the unrecovered runs' steps it would have saved."""
    false, saved, unrecovered_steps, studies = [], 0, 0, set()
    for run in runs:
        fired = None
        for i in range(1, len(run["curve"]) + 1):
            step = run["curve"][i - 1][0]
            if run["recovered"] and step >= run["steps_to_recover"]:
                break
            if gives_up(run["curve"][:i], run["threshold"], run["higher"], run["cap"]):
                fired = step
                break
        if run["recovered"] and fired is not None:
            false.append(f"{run['study']}:{run['run']} (stopped at {fired}, recovered at {run['steps_to_recover']})")
            studies.add(run["study"])
        elif not run["recovered"]:
            unrecovered_steps += run["steps_trained"]
            saved += run["steps_trained"] - fired if fired is not None else 0
    return {
        "false_give_ups": len(false),
        "false_runs": false,
        "studies_hit": sorted(studies),
        "saved_share_of_unrecovered_steps": saved / unrecovered_steps if unrecovered_steps else 0.0,
    }


def give_up_table(paths: Iterable[str | Path]) -> tuple[str, dict]:
    """Every default rule replayed over ``paths``: a markdown summary and table, and the numbers behind it."""
    runs = distinct_runs(paths)
    recovered = sum(r["recovered"] for r in runs)
    total = sum(r["steps_trained"] for r in runs)
    unrecovered = sum(r["steps_trained"] for r in runs if not r["recovered"])
    lines = [
        f"{len(runs)} distinct runs in {len({r['study'] for r in runs})} studies: {recovered} recovered, "
        f"{len(runs) - recovered} trained to their cap without recovering "
        f"({100 * unrecovered / total if total else 0:.0f}% of all steps trained)",
        "",
        "| rule | recovered runs it would have stopped | steps of unrecovered runs saved |",
        "|---|---:|---:|",
    ]
    out = {}
    for name, rule in give_up_rules().items():
        out[name] = result = replay(runs, rule)
        saved = 100 * result["saved_share_of_unrecovered_steps"]
        lines.append(f"| {name} | {result['false_give_ups']} of {recovered} | {saved:.0f}% |")
    return "\n".join(lines), {"runs": len(runs), "recovered": recovered, "rules": out}


def jump_cost_bases(paths: Iterable[str | Path], tolerance: float | None = None) -> list[dict]:
    """One entry per distinct trained base (each stack of an encoder-decoder apart) with 3 or more reset layers under
    the recipe's own arm: Spearman's rho over its layers of the reset's jump with the cost of re-learning (to the
    runs' own tolerance, or ``tolerance``; a cost not reached enters by its Gehan score among the base's runs). A base
    used by several studies (a learning-rate check re-uses its parent's bases) counts once."""
    out, seen = [], set()
    for path in sorted(Path(p) for p in paths):
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
            rho = jump_cost_signs(runs, tolerance).get(base)
            if key in seen or rho is None:  # a study of fewer layers on a base does not hide a fuller one
                continue
            seen.add(key)
            name = f"{base} ({stack})" if stack and stack != "decoder" else base
            layers = len({r["layer"] for r in runs})
            out.append({"study": path.parent.name, "base": name, "layers": layers, "rho": rho})
    return out


def jump_cost_table(paths: Iterable[str | Path], tolerance: float | None = None) -> tuple[str, dict]:
    """``jump_cost_bases`` as a markdown table, with the sign test over bases (scipy.stats.binomtest)."""
    from scipy import stats

    found = jump_cost_bases(paths, tolerance)
    lines = ["| study | base | layers | rho (jump, cost) |", "|---|---|---:|---:|"]
    lines += [f"| {s['study']} | {s['base']} | {s['layers']} | {s['rho']:+.2f} |" for s in found]
    up, down = sum(s["rho"] > 0 for s in found), sum(s["rho"] < 0 for s in found)
    p = stats.binomtest(up, up + down, 0.5).pvalue if up + down else float("nan")
    lines += [
        "",
        f"{len(found)} distinct bases: a larger jump went with a higher cost in {up}, a lower one in {down}, "
        f"neither in {len(found) - up - down} (sign test over bases, p = {p:.3g})",
    ]
    return "\n".join(lines), {"bases": found, "higher": up, "lower": down, "p": p}


def plateau_slopes(path: str | Path) -> list[dict]:
    """For every run of one results.csv not back within its tolerance: the loss at the end of its curve above the
    intact model's (mean of the last 5 evaluations, %), and the slope of a line through the last fifth of the curve
    (% of the baseline per 1,000 steps) with its 95% interval (scipy.stats.linregress). An interval below 0 is still
    falling; one that includes 0 is flat within the noise of the curve."""
    from scipy import stats

    out = []
    for r in read_results(path):
        if r["recovered"]:
            continue
        curve, base = r["curve"], r["baseline_eval_loss"]
        last = curve[-max(3, len(curve) // 5) :]
        fit = stats.linregress([s for s, _ in last], [100 * (loss / base - 1) for _, loss in last])
        half = stats.t.ppf(0.975, len(last) - 2) * fit.stderr
        out.append(
            {
                "base": r["base_id"],
                "block": r["block"],
                "steps_trained": r["steps_trained"],
                "share_of_budget": r["steps_trained"] / r["original_steps"] if r.get("original_steps") else None,
                "end_above_baseline_pct": sum(100 * (loss / base - 1) for _, loss in curve[-5:]) / len(curve[-5:]),
                "slope_pct_per_1k": 1000 * fit.slope,
                "slope_ci_pct_per_1k": (1000 * (fit.slope - half), 1000 * (fit.slope + half)),
            }
        )
    return out


def plateau_table(path: str | Path) -> tuple[str, dict]:
    """``plateau_slopes`` as a markdown table."""
    found = plateau_slopes(path)
    lines = [
        "| base | block | steps trained (share of budget) | end, above the intact loss "
        "| slope over the last fifth (% per 1k steps, 95% CI) |",
        "|---|---|---:|---:|---:|",
    ]
    for s in found:
        share = f" ({100 * s['share_of_budget']:.0f}%)" if s["share_of_budget"] is not None else ""
        low, high = s["slope_ci_pct_per_1k"]
        lines.append(
            f"| {s['base']} | {s['block']} | {s['steps_trained']}{share} | {s['end_above_baseline_pct']:+.2f}% | "
            f"{s['slope_pct_per_1k']:+.3f} ({low:+.3f} to {high:+.3f}) |"
        )
    return "\n".join(lines), {"runs": found}
