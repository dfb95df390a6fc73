"""Could a study give up early on runs that will not recover? Replays give-up rules over the published curves.

    python benchmarks/give_up_replay.py                 # every docs/results/*/results.csv
    python benchmarks/give_up_replay.py --json out.json

Most of a study's compute goes to the runs that never recover: they train to their cap. A rule that stopped them
early would make studies (and the L-sweep of docs/benchmarks.md) cheaper, but only if it never stops a run that
would have recovered. This replays each rule, evaluation by evaluation, over every published run's validation
curve (what the rule would have seen while the run trained) and counts:

  false give-ups   runs that did recover, but which the rule would have stopped before they did;
  steps saved      the share of the unrecovered runs' steps the rule would have saved.

Two families of rules:
  pace     give up when, even at its average pace over the last stretch (the longer of P evaluations and the
           last W share of the steps so far) kept up to the cap, the run's best metric would miss the threshold
           by more than a factor M of that projected progress (M = 1: a plain linear projection);
  plateau  transformers.EarlyStoppingCallback on the recovery metric: stop after P evaluations in a row without
           a new best (threshold 0), as a user would wire it in.

The cap of a run is its study's max_steps (the steps its unrecovered runs trained); a run published twice (a
learning-rate check's own arm repeats its parent study) counts once. Pure Python: reads results.csv.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
from pathlib import Path

from hf_relearn.grid_findings import higher_is_better
from hf_relearn.result import stretch_start
from hf_relearn.storage import read_results

ROOT = Path(__file__).resolve().parents[1]


def _best_so_far(curve: list[tuple[int, float]], higher_is_better: bool) -> list[tuple[int, float]]:
    """(step, best value so far) as a loss (lower is better)."""
    sign, best, out = (-1 if higher_is_better else 1), math.inf, []
    for step, value in curve:
        if not math.isnan(value):
            best = min(best, sign * value)
        out.append((step, best))
    return out


def pace_gives_up(curve, threshold, higher_is_better, cap, patience, window, margin) -> bool:
    history = _best_so_far(curve, higher_is_better)
    if len(history) <= patience or math.isinf(history[-1][1]):
        return False
    step_now, best_now = history[-1]
    start = stretch_start(history, patience, window)
    if start < 0 or math.isinf(history[start][1]):
        return False
    step_then, best_then = history[start]
    pace = (best_then - best_now) / (step_now - step_then)
    gap = best_now - (-threshold if higher_is_better else threshold)
    return gap > margin * pace * (cap - step_now)


def plateau_gives_up(curve, threshold, higher_is_better, cap, patience) -> bool:
    history = _best_so_far(curve, higher_is_better)
    if len(history) <= patience:
        return False
    return history[-1][1] >= history[-1 - patience][1]  # no new best in the last `patience` evaluations


def _runs() -> list[dict]:
    """Every published run once: a learning-rate check's own arm repeats its parent study's runs bit for bit (same
    bases, settings and seeds), and a curve seen twice is counted once."""
    runs, seen = [], set()
    for path in sorted(glob.glob(str(ROOT / "docs/results/*/results.csv"))):
        rows = read_results(path)
        cap = max(r["steps_trained"] for r in rows)
        for r in rows:
            key = (r["recovery_threshold"], json.dumps(r["curve"]))
            if key in seen:
                continue
            seen.add(key)
            runs.append(
                {
                    "study": Path(path).parent.name,
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


def replay(runs: list[dict], gives_up) -> dict:
    """The first evaluation at which ``gives_up`` fires, per run, and what that would have cost and saved."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write every rule's replay here")
    args = ap.parse_args()
    runs = _runs()
    recovered = sum(r["recovered"] for r in runs)
    unrecovered_share = sum(r["steps_trained"] for r in runs if not r["recovered"]) / sum(
        r["steps_trained"] for r in runs
    )
    print(f"{len(runs)} distinct published runs in {len({r['study'] for r in runs})} studies: {recovered} recovered, "
          f"{len(runs) - recovered} trained to their cap without recovering ({100 * unrecovered_share:.0f}% of all "
          "steps trained)\n")  # fmt: skip
    rules = {}
    for p, w, m in itertools.product((6, 12), (0.25, 0.5), (1, 2, 8)):
        rules[f"pace P={p} W={w} M={m}"] = lambda c, t, h, cap, p=p, w=w, m=m: pace_gives_up(c, t, h, cap, p, w, m)
    for p in (5, 10, 20, 50):
        rules[f"plateau P={p}"] = lambda c, t, h, cap, p=p: plateau_gives_up(c, t, h, cap, p)
    out = {}
    print("| rule | recovered runs it would have stopped | steps of unrecovered runs saved |\n|---|---:|---:|")
    for name, rule in rules.items():
        out[name] = result = replay(runs, rule)
        print(f"| {name} | {result['false_give_ups']} of {recovered} | "
              f"{100 * result['saved_share_of_unrecovered_steps']:.0f}% |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"runs": len(runs), "recovered": recovered, "rules": out}, indent=2))


if __name__ == "__main__":
    main()
