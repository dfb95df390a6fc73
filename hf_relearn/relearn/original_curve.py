"""The original run's validation curve from its published checkpoints, for a base not trained here.

Many public models publish intermediate checkpoints as Hub revisions (Pythia's ``step1000`` ... ``step143000``) or as
``checkpoint-N`` folders. ``original_curve`` evaluates each one on the re-learn run's own validation rows, giving the
curve that ``original_steps_to_same_loss`` reads, exactly as for a base trained with ``hf-relearn pretrain``.
Each evaluation is cached on disk, keyed on the checkpoint (its commit, or its weight files' size and mtime), the
validation rows and the objective, so a study pays for each revision once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, Trainer, TrainingArguments

from ..errors import RelearnError
from ..storage import cache_dir, write_json_atomic
from .metrics import count_shifted_targets

_STEP = re.compile(r"(\d+)(?!.*\d)")  # the last number in a name: step1000 -> 1000, checkpoint-500 -> 500


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint: where it is (Hub id or folder), its revision (None for a folder), its step."""

    source: str
    revision: str | None
    step: int

    @property
    def name(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source


def parse_checkpoints(source: str, revisions: str | None) -> list[Checkpoint]:
    """The checkpoints ``source`` and ``revisions`` name, sorted by step.

    ``source``: a Hub id or a local folder, with ``revisions`` = comma-separated ``REVISION`` or ``REVISION=STEP``
    (the step defaults to the last number in the revision's name); or, without ``revisions``, a glob of local
    checkpoint folders (``runs/base/checkpoint-*``), the step being the last number in each folder's name.
    """
    if revisions:
        out = []
        for item in (t.strip() for t in revisions.split(",")):
            if not item:
                continue
            rev, _, step = item.partition("=")
            out.append(Checkpoint(source, rev.strip(), _step_of(rev.strip(), step.strip())))
    else:
        folders = sorted(glob.glob(source))
        if not folders:
            raise RelearnError(
                f"original_checkpoints {source!r}: no folder matches (give a glob of checkpoint folders, "
                "or a Hub id / folder with original_revisions)"
            )
        out = [Checkpoint(f, None, _step_of(Path(f).name, "")) for f in folders]
    if len(out) < 2:
        raise RelearnError(f"original checkpoints: a curve needs at least 2, got {len(out)} ({source!r})")
    steps = [c.step for c in out]
    if len(set(steps)) != len(steps):
        raise RelearnError(f"original checkpoints: two stand for the same step ({sorted(steps)})")
    return sorted(out, key=lambda c: c.step)


def _step_of(name: str, given: str) -> int:
    if given:
        if not given.isdigit():
            raise RelearnError(f"original revision {name!r}: step {given!r} is not a whole number")
        return int(given)
    match = _STEP.search(name)
    if not match:
        raise RelearnError(f"original revision {name!r}: no step in its name; write it as {name}=STEP")
    return int(match.group(1))


def _identity(c: Checkpoint) -> str:
    """What pins a checkpoint's weights: its commit on the Hub, or its weight files' sizes and mtimes."""
    folder = Path(c.source) / (c.revision or "")
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        if not files:
            raise RelearnError(f"original checkpoint {folder}: no weight files (*.safetensors, *.bin)")
        return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().model_info(c.source, revision=c.revision).sha or c.name
    except RevisionNotFoundError:
        raise RelearnError(
            f"original checkpoint {c.name}: the Hub has no revision {c.revision!r} of {c.source}"
        ) from None
    except RepositoryNotFoundError:
        raise RelearnError(
            f"original checkpoint {c.name}: no model {c.source!r} on the Hub (or it is private)"
        ) from None
    except Exception as err:  # network errors come in many types (httpx, OSError, offline mode)
        raise RelearnError(
            f"original checkpoint {c.name}: the Hub could not be reached ({type(err).__name__}: {str(err)[:200]}); "
            "evaluations already cached need no network only when given as local folders"
        ) from err


def _rows_digest(dataset, objective: str, batch_size: int) -> str:
    h = hashlib.sha256(f"{objective}|{batch_size}|{len(dataset)}".encode())
    table = dataset.with_format("numpy")
    for column in sorted(dataset.column_names):
        h.update(column.encode())
        values = table[column]
        for value in values if isinstance(values, list) else [values]:
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _check_same_model(model, reference, c: Checkpoint) -> None:
    """A revision must be this model at another step: the same tensor names and shapes (its model_type is checked
    before loading, and it is loaded as the run's own class)."""
    mine = {n: tuple(p.shape) for n, p in reference.state_dict().items()}
    theirs = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine) ^ set(theirs)) or [n for n in mine if mine[n] != theirs[n]]
        raise RelearnError(
            f"original checkpoint {c.name} is not this model at another step: its weights differ in names or shapes "
            f"(first: {diff[0]}); the original curve must come from checkpoints of the model being re-learned"
        )


def original_curve(
    checkpoints: list[Checkpoint], reference, eval_dataset, collator, args, cache_dir: str | Path
) -> list[tuple[int, float]]:
    """``[(step, eval_loss)]`` of each checkpoint on ``eval_dataset`` (the run's validation rows, collated as the run
    collates them), read from ``cache_dir`` where evaluated before. ``reference`` is the run's model before surgery:
    every checkpoint must have its model_type, tensor names and shapes (it is loaded as the reference's class). Raises ``RelearnError`` naming the checkpoint
    (unknown revision, another architecture, unreachable Hub) before any evaluation."""
    identities = [_identity(c) for c in checkpoints]  # every revision resolves before anything is evaluated
    digest = _rows_digest(eval_dataset, args.objective, args.per_device_eval_batch_size)
    cache_dir = Path(cache_dir)
    curve = []
    for c, identity in zip(checkpoints, identities, strict=True):
        key = hashlib.sha256(f"{c.name}|{identity}|{digest}".encode()).hexdigest()[:32]
        path = cache_dir / f"{key}.json"
        if path.exists():
            curve.append((c.step, json.loads(path.read_text())["eval_loss"]))
            continue
        loss = _evaluate(c, reference, eval_dataset, collator, args)
        if args.process_index == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"checkpoint": c.name, "step": c.step, "identity": identity, "eval_loss": loss})
        curve.append((c.step, loss))
    return curve


def _evaluate(c: Checkpoint, reference, eval_dataset, collator, args) -> float:
    try:
        config = AutoConfig.from_pretrained(c.source, revision=c.revision)
    except OSError as err:
        raise RelearnError(f"original checkpoint {c.name}: its config cannot be read ({str(err)[:200]})") from err
    if config.model_type != reference.config.model_type:
        raise RelearnError(
            f"original checkpoint {c.name} is a {config.model_type!r} model, the run's is {reference.config.model_type!r}"
        )
    model = type(reference).from_pretrained(c.source, revision=c.revision, config=config)
    _check_same_model(model, reference, c)
    plain = TrainingArguments(
        output_dir=args.output_dir,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        use_cpu=args.use_cpu,
        bf16=args.bf16,
        fp16=args.fp16,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=args.dataloader_pin_memory,
    )
    trainer = Trainer(model=model, args=plain, eval_dataset=eval_dataset, data_collator=collator)
    count_shifted_targets(trainer)  # the same loss as the relearn's own evaluations
    with torch.no_grad():
        return float(trainer.evaluate(metric_key_prefix="eval")["eval_loss"])


def published_curve(model, eval_dataset, collator, args) -> list[tuple[int, float]]:
    """The original curve a ``RelearnArguments`` names (``original_checkpoints`` + ``original_revisions``),
    evaluated on ``eval_dataset`` with ``collator``; cached under ``original_curve_cache`` (default
    ``HF_HOME/hf_relearn/original_curves``)."""
    checkpoints = parse_checkpoints(args.original_checkpoints, args.original_revisions)
    cache = args.original_curve_cache or cache_dir("original_curves")
    return original_curve(checkpoints, model, eval_dataset, collator, args, cache)
