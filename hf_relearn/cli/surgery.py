"""The ``hf-relearn`` commands that operate on one model and save it: ``blocks``, ``reset`` and ``swap``.
``main.py`` dispatches to them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RelearnError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, model type to build from config (gpt2, llama, t5, ...), or Hub id")
    p.add_argument("--config-overrides", default=None, help="e.g. n_layer=4,n_embd=64 (for a model built from config)")
    p.add_argument("--head", default=None, choices=["causal-lm", "masked-lm", "seq2seq-lm", "base"])
    p.add_argument("--model-seed", type=int, default=0, help="seed of a model built from config")


def _load(args: argparse.Namespace):
    from ..model.modeling import load_model, packaged_checkpoint

    args.model = packaged_checkpoint(args.model)
    return load_model(args.model, args.config_overrides, head=args.head, seed=args.model_seed)


def cmd_blocks(args: argparse.Namespace) -> int:
    from ..model.blocks import BlockMap

    model = _load(args)
    bmap = BlockMap(model)
    rows = [(b, bmap.numel(b)) for b in bmap.names()]
    if args.json:
        data = {
            "model": args.model,
            "class": type(model).__name__,
            "stacks": {s.name: {"path": s.path, "layers": len(s.layers)} for s in bmap.stacks.values()},
            "blocks": [
                {
                    "name": b.name,
                    "kind": b.kind,
                    "parameters": n,
                    "tensors": list(b.params) if args.paths else len(b.params),
                }
                for b, n in rows
            ],
        }
        print(json.dumps(data, indent=2))
        return 0
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}  ({total:,} parameters)")
    for s in bmap.stacks.values():
        shared = f", weights shared: applied {s.applied_depth}x" if s.applied_depth else ""
        print(f"  stack {s.name}: {len(s.layers)} layers at {s.path}{shared}")
    width = max(len(b.name) for b, _ in rows)
    for b, n in rows:
        print(f"  {b.name:<{width}}  {b.kind:<10} {n:>12,}")
        if args.paths:
            for t in b.params:
                print(f"      {t}")
    print("also valid: ranges (encoder.2:4), wildcards (decoder.*.mlp), negative indices, exact module paths")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    from ..model.surgery import reset
    from ..storage import check_output_dir, versions, write_dir_atomic, write_json_atomic

    out = check_output_dir(args.output_dir, args.overwrite)
    model = _load(args)
    report = reset(model, args.block, init=args.init, seed=args.seed, allow_shared=args.allow_shared)
    tokenizer = _folder_tokenizer(args.model)  # None for a folder without tokenizer files (not an empty one)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(
            tmp / "surgery.json",
            {
                "model": args.model,
                "config_overrides": args.config_overrides,
                **report.to_dict(),
                "versions": versions(),
            },
        )

    write_dir_atomic(out, fill)
    print(
        f"reset {report.block} ({report.init}, seed {report.seed}): {report.num_tensors} tensors, "
        f"{report.num_parameters:,} parameters -> {out}"
    )
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _folder_tokenizer(model: str):
    """The tokenizer saved with a model folder, or None (a model type, a Hub id, a folder without tokenizer files:
    ``AutoTokenizer`` would "load" an empty one from such a folder)."""
    from ..data.tokenization import has_tokenizer_files

    if not Path(model).is_dir() or not has_tokenizer_files(Path(model)):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError):
        return None  # a folder without tokenizer files


def cmd_swap(args: argparse.Namespace) -> int:
    """Swap the encoder, check a forward/backward, save model + tokenizer + swap_report.json (all or nothing)."""
    import torch
    from transformers import EncoderDecoderModel

    from ..model.swap import check_forward_backward, check_reloads, load_encoder, swap_encoder, unsaveable_reason
    from ..storage import check_output_dir, versions, write_dir_atomic, write_json_atomic

    if args.stitch:  # fitted on training rows and applied by a hook: measured in memory by relearn, never saved
        raise RelearnError(
            "a stitched swap is fitted on training rows and cannot be saved to load back as the same model; run it "
            f"with `hf-relearn relearn --model {args.model} --swap_encoder {args.encoder} --stitch {args.stitch} "
            "--train_file FILE ...`, which fits, measures and records the stitch. Nothing was written."
        )
    out = check_output_dir(args.output_dir, args.overwrite)
    model = _load(args)
    encoder = load_encoder(args.encoder, args.encoder_overrides, seed=args.encoder_seed)
    report = swap_encoder(model, encoder, args.cross_attention, args.freeze, args.seed)
    reason = unsaveable_reason(model, report)
    if reason:
        raise RelearnError(reason)
    if isinstance(model, EncoderDecoderModel):
        vocab = min(model.config.encoder.vocab_size, model.config.decoder.vocab_size)
    else:
        vocab = model.config.vocab_size
    torch.manual_seed(args.seed)
    try:
        loss = float(check_forward_backward(model, vocab))
    except (RuntimeError, ValueError) as err:
        raise RelearnError(f"the swapped model failed a forward/backward pass: {err}") from err
    model.zero_grad(set_to_none=True)
    tokenizer = _folder_tokenizer(args.model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_reloads(model, tmp, vocab)
        write_json_atomic(
            tmp / "swap_report.json",
            {
                "model": args.model,
                "config_overrides": args.config_overrides,
                "encoder": args.encoder,
                "encoder_overrides": args.encoder_overrides,
                "encoder_seed": args.encoder_seed,
                "seed": args.seed,
                **report.to_dict(),
                "check_loss": loss,
                "versions": versions(),
            },
        )

    write_dir_atomic(out, fill)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(report.trainable))
    print(
        f"swapped the encoder of {args.model} for {args.encoder} (width {report.old_width} -> {report.new_width}, "
        f"adapter {report.adapter}); cross-attention {report.cross_attention}: {report.num_tensors} tensors, "
        f"{report.num_parameters:,} parameters reset; freeze {report.freeze}: {trainable:,} parameters trainable; "
        f"forward/backward loss {loss:.4f} -> {out}"
    )
    return 0


def _add_swap_parser(sub) -> None:
    p = sub.add_parser(
        "swap", help="install a new encoder (any width) in an encoder-decoder, reset its cross-attention, save it"
    )
    _add_model_args(p)
    p.add_argument("--encoder", required=True, help="the new encoder: model type (t5, bert, ...), folder or Hub id")
    p.add_argument("--encoder-overrides", default=None, help="config overrides of the new encoder, e.g. d_model=128")
    p.add_argument("--encoder-seed", type=int, default=0, help="init seed of a new encoder built from config")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--cross-attention",
        default="reset",
        choices=["reset", "zero", "keep"],
        help="zero: start as if absent; keep: as trained (an encoder of the same width)",
    )
    p.add_argument(
        "--freeze",
        default="decoder-except-cross",
        choices=["decoder-except-cross", "encoder-trainable", "all-trainable"],
        help="what stays trainable (recorded in swap_report.json)",
    )
    p.add_argument(
        "--stitch",
        default=None,
        choices=["lstsq", "procrustes"],
        help="a stitch is fitted on training rows: use `hf-relearn relearn --swap_encoder E --stitch lstsq`",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-attention reset")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.set_defaults(func=cmd_swap)


def add_surgery_parsers(sub) -> None:
    """The ``blocks``, ``reset`` and ``swap`` sub-commands."""
    p = sub.add_parser("blocks", help="list every block name of a model with its parameter count")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--paths", action="store_true", help="also list the tensor names of each block")
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("reset", help="reset one block and save the surgered model with surgery.json")
    _add_model_args(p)
    p.add_argument("block", help="block name, e.g. decoder.3, encoder.-1.mlp, decoder.*.cross_attention")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--init", default="scratch", help="scratch | zero | checkpoint:PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of the reset (the same on every rank)")
    p.add_argument("--allow-shared", action="store_true", help="reset tied/shared tensors everywhere they are used")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.set_defaults(func=cmd_reset)

    _add_swap_parser(sub)
