"""``hf-relearn analyze give-up | jump-cost | plateau [RESULTS ...]``: the analyses of ``report.analyses`` over
published studies (no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RelearnError

DEFAULT_RESULTS = "docs/results/*/results.csv"


def results_files(given: list[str]) -> list[Path]:
    """Each argument as a results.csv (a study folder stands for its results.csv); none given: every
    ``docs/results/*/results.csv`` under the current folder. Raises RelearnError when a file is missing."""
    if not given:
        found = sorted(Path().glob(DEFAULT_RESULTS))
        if not found:
            raise RelearnError(f"no {DEFAULT_RESULTS} under {Path.cwd()}: name results.csv files or study folders")
        return found
    paths = [Path(g) / "results.csv" if Path(g).is_dir() else Path(g) for g in given]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RelearnError(f"no such results file: {', '.join(missing)}")
    return paths


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..report import analyses

    paths = results_files(args.results)
    if args.analysis == "give-up":
        text, numbers = analyses.give_up_table(paths)
    elif args.analysis == "jump-cost":
        text, numbers = analyses.jump_cost_table(paths, args.tolerance)
    else:
        tables = [analyses.plateau_table(p) for p in paths]
        text = "\n\n".join(f"{p}\n\n{t}" for p, (t, _) in zip(paths, tables, strict=True))
        numbers = {str(p): n for p, (_, n) in zip(paths, tables, strict=True)}
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))
    return 0


def add_analyze_parser(sub) -> None:
    """Register ``analyze`` on the CLI's subparsers."""
    p = sub.add_parser(
        "analyze",
        help="replay give-up rules, relate reset jump to cost per base, or measure plateaus, over published results",
    )
    p.add_argument(
        "analysis",
        choices=["give-up", "jump-cost", "plateau"],
        help="give-up: could a study stop hopeless runs early; jump-cost: does a larger reset jump mean a dearer "
        "re-learning (per base, sign test over bases); plateau: where unrecovered runs ended and their final slope",
    )
    p.add_argument("results", nargs="*", help=f"results.csv files or study folders (default: {DEFAULT_RESULTS})")
    p.add_argument("--tolerance", type=float, default=None, help="jump-cost: e.g. 0.05 (default: each run's own)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers here")
    p.set_defaults(func=cmd_analyze)
