"""``hf-relearn`` command line: one sub-command per step (blocks, reset, ...)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import RelearnError
from .analyze import add_analyze_parser
from .runs import HF_COMMANDS
from .surgery import add_surgery_parsers

CARD_TEMPLATE_HELP = "your own Jinja2 card template (default: cards/relearn.md or cards/study.md of the package)"


def cmd_study(args: argparse.Namespace) -> int:
    from ..report.build import build_report
    from ..study.recipe import Recipe
    from ..study.run import run_study
    from ..study.workers import quiet_libraries

    recipe = Recipe.load(_recipe_path(args.recipe), args.set)
    out = Path(args.output_dir or f"studies/{recipe.name}")
    quiet_libraries()
    workers = f" ({args.workers} workers)" if args.workers > 1 else ""
    print(f"study {recipe.name}: {args.recipe} -> {out}{workers}")
    rank = int(os.environ.get("RANK", "0"))  # read before run_study, which may hide the launch from Trainers
    run_study(
        recipe,
        out,
        progress=not args.no_progress,
        parallel=args.parallel,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
    )
    if rank != 0:
        return 0  # the main process reports
    return _print_report(build_report(out))


def _recipe_path(recipe: str) -> str:
    """A recipe file, or the name of one shipped in the package (``hf-relearn study gpt2-layer-sweep``)."""
    shipped = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe.removesuffix('.yaml')}.yaml"
    return str(shipped) if not Path(recipe).exists() and shipped.exists() else recipe


def _print_report(rep: dict) -> int:
    print()
    for w in rep["warnings"]:
        print(f"warning: {w}")
    print(rep["table"])
    print()
    for line in rep["answer"]:
        print(line)
    print()
    print(f"report: {rep['report']}")
    for p in rep["plots"]:
        print(f"plot:   {p}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report.build import build_report

    return _print_report(build_report(args.study_dir))


def cmd_demo(args: argparse.Namespace) -> int:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    args.recipe = str(recipe)
    args.output_dir = args.output_dir or "relearn-demo"
    # 2 processes of 1 thread: twice the work of one process of 2 threads on this small model, and the numbers are
    # those of docs/results/demo-stdlib-gpt2 on any machine (they depend on the threads per run, not on the cores)
    args.workers = 2 if args.workers is None else args.workers
    args.threads_per_worker = 1 if args.threads_per_worker is None else args.threads_per_worker
    return cmd_study(args)


def _is_study(src: Path) -> bool:
    return (src / "results.csv").exists() and not (src / "relearn_result.json").exists()


def cmd_card(args: argparse.Namespace) -> int:
    from ..hub.cards import relearn_card, study_card

    src = Path(args.run_dir)
    if _is_study(src):
        card = study_card(src, args.card_template)
    else:
        card = relearn_card(src, args.repo_id, args.only_block, args.card_template)
    if args.output:
        card.save(args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(card.content)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub.cards import study_card
    from ..hub.push import push

    src = Path(args.run_dir)
    if _is_study(src):
        from huggingface_hub import HfApi

        study_card(src, args.card_template).save(src / "README.md")
        api = HfApi(token=args.token)
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(src),
            repo_id=args.repo_id,
            allow_patterns=["README.md", "results.csv", "plots/*.png", "recipe.yaml"],
            revision=args.revision,
        )
        print(f"pushed study {src} -> {info}")
        return 0
    url = push(
        src,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        only_block=args.only_block,
        token=args.token,
        card_template=args.card_template,
    )
    what = "the re-learned block" if args.only_block else "the re-learned model"
    print(f"pushed {what} of {src} -> {url}")
    return 0


def _add_study_parsers(sub) -> None:
    """``study`` and ``demo``: the same options (``demo`` runs the shipped recipe, 2 workers of 1 thread)."""
    for name, helptext in (
        ("study", "run a study recipe: base training, a sweep of relearns, results.csv, report and plots"),
        ("demo", "the embedded default study (recipes/demo.yaml): offline, 2 CPU cores, a few minutes"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "study":
            p.add_argument("recipe", help="a YAML recipe file, or the name of a shipped one (hf_relearn/recipes/)")
        p.add_argument("--output-dir", default=None, help="study folder (default: studies/NAME; demo: relearn-demo)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the recipe")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument(
            "--parallel",
            choices=["data", "runs"],
            default="data",
            help="under accelerate launch: 'data' = every run on all processes (DDP), 'runs' = each process takes the next free base or run",
        )
        p.add_argument(
            "--workers",
            type=int,
            default=1 if name == "study" else None,
            help="processes on this machine that share the bases and runs (demo: 2)",
        )
        p.add_argument(
            "--threads-per-worker",
            type=int,
            default=None,
            help="CPU threads of each worker (default: the cores shared out; demo: 1). A run's numbers depend on it",
        )
        p.set_defaults(func=cmd_study if name == "study" else cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-relearn",
        description="Reset one block of a trained transformer, freeze the rest, measure the cost of re-learning it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_surgery_parsers(sub)

    _add_study_parsers(sub)
    p = sub.add_parser(
        "push", help="push a relearn run (model + card with the recovery metrics) or a study to the Hub"
    )
    p.add_argument("run_dir", help="output dir of a relearn run (or of a study)")
    p.add_argument("--repo-id", required=True, help="NAMESPACE/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--only-block", action="store_true", help="upload only the re-learned block's tensors")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    p.add_argument("--card-template", default=None, metavar="FILE", help=CARD_TEMPLATE_HELP)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("card", help="render the model card of a relearn run or a study (what push would upload)")
    p.add_argument("run_dir", help="output dir of a relearn run (or of a study)")
    p.add_argument("--repo-id", default=None, help="the repository name the card speaks of (default: derived)")
    p.add_argument("--only-block", action="store_true", help="the card of a block-only upload")
    p.add_argument("--card-template", default=None, metavar="FILE", help=CARD_TEMPLATE_HELP)
    p.add_argument("-o", "--output", default=None, help="write the card here (default: print it)")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("report", help="rebuild report.md and plots of a study from its results.csv")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_report)
    add_analyze_parser(sub)

    # parsed by HfArgumentParser (every TrainingArguments flag works); listed here for --help
    sub.add_parser("pretrain", help="train a base model from config with a known budget (see pretrain --help)")
    sub.add_parser("relearn", help="reset one block and re-learn it until recovered (see relearn --help)")
    sub.add_parser("probe", help="the loss right after resetting each block, no training: which blocks matter")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-relearn``; returns the exit code (2 for bad input, with one clear message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_notes()
    if argv and argv[0] in HF_COMMANDS:
        command, run = argv[0], (lambda: HF_COMMANDS[argv[0]](argv[1:]))
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, (lambda: args.func(args))
    try:
        return int(run() or 0)
    except RelearnError as err:
        print(f"hf-relearn {command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _show_notes() -> None:
    """hf-relearn's own log lines (e.g. the prefix cache's size before it is built) on stderr, from rank 0 only."""
    import logging
    import os

    logger = logging.getLogger("hf_relearn")
    if logger.handlers or os.environ.get("RANK", "0") != "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _close_process_group() -> None:
    """Leave a multi-process launch cleanly (an open gloo group can abort the interpreter at exit)."""
    dist = sys.modules.get("torch.distributed")  # never loaded by a command without torch (e.g. report)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
