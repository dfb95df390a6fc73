"""The ``hf-relearn`` commands parsed by ``HfArgumentParser`` (every ``TrainingArguments`` flag works): ``pretrain``,
``relearn`` and ``probe``. ``cli.py`` dispatches to them."""

from __future__ import annotations

from pathlib import Path


def _hf_parse(dataclass_types, argv: list[str], prog: str):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        return loader(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def cmd_pretrain(argv: list[str]) -> int:
    """``hf-relearn pretrain --model gpt2 --config-overrides ... --train_file F --max_steps N --output_dir D``."""
    from ..data.datasets import DataArguments
    from ..relearn.arguments import ModelArguments, PretrainArguments
    from ..relearn.runner import pretrain

    model_args, data_args, args = _hf_parse(
        (ModelArguments, DataArguments, PretrainArguments), argv, "hf-relearn pretrain"
    )
    info = pretrain(model_args, data_args, args)
    if not args.should_log:
        return 0
    kept = f" ({info['stopped']}; best at step {info['budget_steps']}, the budget)" if args.until_converged else ""
    print(
        f"pretrained {model_args.model}: {info['steps']} steps{kept}, {info['tokens']:,} tokens, "
        f"eval loss {info['curve'][0][1]:.4f} (step {info['curve'][0][0]}) -> {info['final_eval_loss']:.4f} "
        f"-> {args.output_dir}"
    )
    for w in info["warnings"]:
        print(f"warning: {w}")
    return 0


def cmd_relearn(argv: list[str]) -> int:
    """``hf-relearn relearn --model runs/base --original_run runs/base --block decoder.1 --output_dir D``."""
    from ..data.datasets import DataArguments
    from ..relearn.arguments import ModelArguments, RelearnArguments
    from ..relearn.runner import relearn

    verbose = "--verbose" in argv  # the Trainer's own log lines and progress bars, as a plain Trainer shows them
    argv = [a for a in argv if a != "--verbose"]
    model_args, data_args, args = _hf_parse(
        (ModelArguments, DataArguments, RelearnArguments), argv, "hf-relearn relearn"
    )
    verbose = verbose or args.log_level in ("info", "debug")
    result = relearn(model_args, data_args, args, console=not verbose)
    if not args.should_log:
        return 0  # one summary per launch, from the main process
    print(result.summary())
    cache = result.prefix_cache or {}
    if cache.get("enabled"):
        rows = "evaluation rows only" if cache.get("splits") == ["eval"] else "training and evaluation rows"
        print(
            f"prefix cache: skipped {cache['skipped']} for {rows}; computed it for {cache.get('prefix_forwards', 0)} rows"
        )
        if cache.get("train_rows"):
            print(f"prefix cache: training rows not cached: {cache['train_rows']}")
    elif cache:
        print(f"prefix cache: off ({cache.get('reason')})")
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"result: {Path(args.output_dir) / 'relearn_result.json'}")
    return 0


def cmd_probe(argv: list[str]) -> int:
    """``hf-relearn probe MODEL [data flags] [--blocks layers,parts] [--inits scratch,zero] --output_dir D``."""
    from ..data.datasets import DataArguments
    from ..relearn.arguments import ModelArguments
    from ..relearn.probe import ProbeArguments, probe, probe_table

    if argv and not argv[0].startswith("-") and not argv[0].endswith((".json", ".yaml", ".yml")):
        argv = ["--model", *argv]  # the model may come first, as in `blocks MODEL`
    model_args, data_args, args = _hf_parse((ModelArguments, DataArguments, ProbeArguments), argv, "hf-relearn probe")
    rows = probe(model_args, data_args, args)
    print(probe_table(rows), end="")
    print(f"probe: {Path(args.output_dir)}/probe.md, probe.csv, probe.png")
    return 0


HF_COMMANDS = {"pretrain": cmd_pretrain, "relearn": cmd_relearn, "probe": cmd_probe}
