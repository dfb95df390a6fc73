"""``probe``: which blocks matter at all, before paying for any re-learning.

For every block named (by default every layer and every part of a layer), reset it and measure the validation loss
at once, with no training; the intact model is measured once. Each reset is a fresh copy of the intact model, so the
blocks never see each other's surgery. The runs share one frozen-prefix cache (evaluation rows, every layer boundary
filled by the deepest block first, so each boundary's activations are computed once) and, for the distill
objective, one teacher whose outputs are computed once.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.datasets import DataArguments, build_datasets
from ..data.tokenization import get_tokenizer
from ..errors import RelearnError
from ..hub.plots import plot_probe
from ..model.blocks import Block, BlockMap
from ..model.surgery import zero_init_applies
from ..stats.summary import mean_sd
from ..storage import versions, write_json_atomic, write_results
from .arguments import ModelArguments, RelearnArguments
from .prefix_cache import PrefixCache
from .trainer import RelearnTrainer

PROBE_CSV, PROBE_MD, PROBE_PNG, PROBE_JSON = "probe.csv", "probe.md", "probe.png", "probe.json"
INITS = ("scratch", "zero")


@dataclass
class ProbeArguments:
    """What ``hf-relearn probe`` resets and how it measures (parseable with ``HfArgumentParser``)."""

    output_dir: str = field(metadata={"help": "where probe.csv, probe.md, probe.png and probe.json go"})
    blocks: str = field(
        default="layers,parts",
        metadata={"help": "comma-separated: 'layers', 'parts', or block names (wildcards and ranges work)"},
    )
    inits: str = field(default="scratch", metadata={"help": "comma-separated: scratch, zero"})
    seeds: str = field(default="0", metadata={"help": "comma-separated reset seeds (repeat the scratch draws)"})
    objective: str = field(
        default="auto", metadata={"help": "auto | clm | mlm | seq2seq | distill (auto: from the model's head)"}
    )
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "evaluation batch size"})
    prefix_cache: str = field(default="auto", metadata={"help": "auto | true | false (see relearn)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing probe in output_dir"})

    def __post_init__(self) -> None:
        bad = [i for i in _split(self.inits) if i not in INITS]
        if bad or not _split(self.inits):
            raise RelearnError(f"inits must be a comma-separated subset of {', '.join(INITS)}, got {self.inits!r}")
        try:
            self.seed_list = [int(s) for s in _split(self.seeds)]
        except ValueError:
            raise RelearnError(f"seeds must be comma-separated integers, got {self.seeds!r}") from None
        if not self.seed_list:
            raise RelearnError("seeds: give at least one")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def default_objective(model) -> str:
    """The objective a model's own head trains: seq2seq, clm, mlm; distill for a model without a head."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if model.get_output_embeddings() is None:
        return "distill"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) == type(model).__name__
    return "clm" if causal or getattr(config, "is_decoder", False) else "mlm"


def select_blocks(block_map: BlockMap, spec: str) -> list[Block]:
    """The blocks ``spec`` names, in the model's order: 'layers' and 'parts' expand to every layer / part."""
    everything = block_map.names()
    out: list[Block] = []
    for token in _split(spec):
        if token in ("layers", "parts"):
            kind = token[:-1]
            out += [b for b in everything if b.kind == kind]
        else:
            out.append(block_map.resolve(token))
    if not out:
        raise RelearnError(f"blocks {spec!r} names no block; see `hf-relearn blocks MODEL`")
    seen: set[str] = set()
    out = [b for b in out if not (b.name in seen or seen.add(b.name))]
    order = {b.name: i for i, b in enumerate(everything)}  # each layer followed by its parts
    return sorted(out, key=lambda b: order.get(b.name, len(order)))


def _deepest_first(blocks: list[Block], block_map: BlockMap) -> list[Block]:
    """Order in which a capture-all cache fills each layer boundary once: the last stack's deepest layer first."""
    stack_order = {name: i for i, name in enumerate(block_map.stacks)}

    def depth(b: Block) -> tuple[int, int]:
        if not b.layers:
            return (-1, 0)
        stack, index = max(b.layers, key=lambda sl: (stack_order.get(sl[0], 0), sl[1]))
        return (stack_order.get(stack, 0), index)

    return sorted(blocks, key=depth, reverse=True)


def probe(
    model_args: ModelArguments, data_args: DataArguments, args: ProbeArguments, progress: bool = True
) -> list[dict]:
    """Reset each selected block (per init and seed) in a fresh copy of the intact model and measure the validation
    loss with no training. Returns one row per (block, init, seed), in the model's block order, and writes
    ``probe.csv``, ``probe.md``, ``probe.png`` and ``probe.json`` (arguments, baseline, versions) to ``output_dir``.

    Guarantees: the baseline is the intact model's loss on the same rows; every row's loss equals what
    ``relearn`` measures as ``after_reset_eval_loss`` for that block, init and seed on the same data.
    """
    out = Path(args.output_dir)
    if out.exists() and any(out.glob("probe.*")) and not args.overwrite_output_dir:
        raise RelearnError(f"{out} already holds a probe; pass --overwrite_output_dir to replace it")
    tokenizer = get_tokenizer(data_args.tokenizer, model_args.model)
    intact = model_args.load()
    objective = default_objective(intact) if args.objective == "auto" else args.objective
    block_map = BlockMap(intact)
    blocks = select_blocks(block_map, args.blocks)
    train, evals, collator = build_datasets(data_args, tokenizer, objective)
    cache = PrefixCache(capture_all=True)
    shared: dict = {"baseline": None, "teacher": None}
    rows: list[dict] = []
    jobs = [
        (block, init, seed)
        for block in _deepest_first(blocks, block_map)
        for init in _split(args.inits)
        if init != "zero" or zero_init_applies(block)  # norms and embeddings have nothing to zero
        for seed in (args.seed_list if init == "scratch" else args.seed_list[:1])
    ]
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory() as scratch:
        for block, init, seed in tqdm(jobs, desc="probe", unit="reset", disable=not progress):
            data = (train, evals, collator, tokenizer)
            rows.append(
                _probe_one(intact, block, init, seed, objective, model_args, args, data, cache, shared, scratch)
            )
            rows[-1]["parameters"] = block_map.numel(block)
    cache.close()
    order = {b.name: i for i, b in enumerate(blocks)}
    rows.sort(key=lambda r: (order[r["block"]], INITS.index(r["init"]), r["seed"] or 0))
    _write(out, rows, model_args, data_args, args, objective)
    return rows


def _probe_one(intact, block, init: str, seed: int, objective: str, model_args, args, data, cache, shared, scratch):
    """One reset of a fresh copy of ``intact``, measured with no training: its probe row (``shared`` carries the
    baseline and the distill teacher from one reset to the next, so the intact model is measured once)."""
    train, evals, collator, tokenizer = data
    relearn_args = RelearnArguments(
        output_dir=scratch,
        block=block.name,
        init=init,
        reset_seed=seed,
        objective=objective,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        prefix_cache=args.prefix_cache,
        report_to="none",
        disable_tqdm=True,
        max_steps=1,
        save_strategy="no",
    )
    trainer = RelearnTrainer(
        model=copy.deepcopy(intact),
        args=relearn_args,
        model_name=model_args.model,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=collator,
        processing_class=tokenizer,
        prefix_cache=cache,
        baseline=shared["baseline"],
        teacher=shared["teacher"],
    )
    try:
        trainer.prepare_relearn()
    finally:
        trainer.release_prefix_cache()
    shared["baseline"], shared["teacher"] = trainer.measured["baseline"], trainer.teacher
    base = trainer.measured["baseline"]["eval_loss"]
    loss = trainer.measured["after_reset"]["eval_loss"]
    return {
        "block": block.name,
        "kind": block.kind,
        "init": init,
        "seed": seed if init == "scratch" else None,
        "baseline_loss": base,
        "loss": loss,
        "increase": loss - base,
        "relative_increase": (loss - base) / base if base else None,
    }


def probe_table(rows: list[dict]) -> str:
    """A markdown table, one line per block: parameters, the loss after each init (scratch: mean ± sd over seeds),
    and the jump over the intact model."""
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    base = rows[0]["baseline_loss"]
    relative = base != 0
    head = "| block | parameters | " + " | ".join(f"loss after {i} | jump ({i})" for i in inits) + " |"
    lines = [f"Intact model: loss {base:.4f}.", "", head, "|---|---:|" + "---:|---:|" * len(inits)]
    for name in dict.fromkeys(r["block"] for r in rows):
        cells = []
        for init in inits:
            losses = [r["loss"] for r in rows if r["block"] == name and r["init"] == init]
            if not losses:
                cells += ["", ""]
                continue
            mean, sd = mean_sd(losses)
            cells.append(f"{mean:.4f}" + (f" ± {sd:.4f}" if len(losses) > 1 else ""))
            cells.append(f"{(mean - base) / base:+.1%}" if relative else f"+{mean - base:.4g}")
        params = next(r["parameters"] for r in rows if r["block"] == name)
        lines.append(f"| {name} | {params:,} | " + " | ".join(cells) + " |")
    if not relative:
        lines += ["", "(distill: the loss is the distance to the intact model's outputs, 0 before any reset)"]
    return "\n".join(lines) + "\n"


def _write(out: Path, rows: list[dict], model_args, data_args, args: ProbeArguments, objective: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / PROBE_CSV, rows, ["block", "kind", "init", "seed", "parameters", "baseline_loss", "loss"])
    title = f"# Probe: {model_args.model}\n\nValidation loss right after each reset, no training ({objective}).\n\n"
    (out / PROBE_MD).write_text(title + probe_table(rows))
    name = "/".join(Path(model_args.model).parts[-2:]) if Path(model_args.model).is_dir() else model_args.model
    plot_probe(rows, out / PROBE_PNG, f"{name}: loss right after each reset ({objective})")
    info = {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "probe": {**asdict(args)},
        "objective": objective,
        "baseline_loss": rows[0]["baseline_loss"],
        "rows": len(rows),
        "versions": versions(),
    }
    info["probe"].pop("seed_list", None)
    write_json_atomic(out / PROBE_JSON, info)
