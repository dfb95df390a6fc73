"""Model cards built from values: a relearn run's result (and its folder's data settings), or a study's report.

Values in, a ``huggingface_hub.ModelCard`` out: no trainer, no model. The templates live in the top-level ``cards/``
folder and install as ``hf_relearn.card_templates``; a user's own Jinja2 template (``--card-template``) receives the
same variables. ``model-index`` carries the eval losses (Trainer's own card leaves them out).
"""

from __future__ import annotations

import json
import math
import os
from importlib.resources import files
from pathlib import Path

from ..data.objectives import described_objective
from ..errors import RelearnError
from ..model.arm_registry import arm_description
from ..storage import DATA_FILE, RESULTS, read_result, read_results

TEMPLATES = Path(str(files("hf_relearn.card_templates")))


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ppl(loss) -> str:
    return "n/a" if loss is None else f"{math.exp(min(loss, 50)):.3f}"


def _source_card_data(model: str) -> dict:
    """license / language / datasets from the base model's own card, when it is a local folder with one."""
    readme = Path(str(model)) / "README.md"
    if not readme.exists():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # a README without (valid) YAML metadata: nothing to carry over
        return {}
    return {k: data[k] for k in ("license", "language", "datasets") if data.get(k)}


def _dataset_name(run_dir: Path, result: dict) -> str:
    args_file = run_dir / DATA_FILE
    if args_file.exists():
        data = json.loads(args_file.read_text())
        for key in ("dataset_name", "train_file"):
            if data.get(key):
                return Path(data[key]).name if key == "train_file" else data[key]
        return f"the built-in {data.get('builtin_corpus', 'generated')} corpus"
    return "its training data"


def template_path(name: str, template: str | os.PathLike | None = None) -> str:
    """The template to render: the user's file when given (it must exist), else ``cards/NAME.md``."""
    if template is None:
        return str(TEMPLATES / f"{name}.md")
    path = Path(template)
    if not path.is_file():
        raise RelearnError(f"card template {path}: no such file")
    return str(path)


def _render(card_data, name: str, template: str | os.PathLike | None, **values):
    """``ModelCard.from_template`` with a template syntax error turned into one clear error."""
    from huggingface_hub import ModelCard
    from jinja2 import TemplateError

    path = template_path(name, template)
    try:
        return ModelCard.from_template(card_data, template_path=path, **values)
    except TemplateError as err:
        raise RelearnError(f"card template {path}: {type(err).__name__}: {err}") from err


def relearn_card(
    run_dir: str | os.PathLike,
    repo_id: str | None = None,
    only_block: bool = False,
    template: str | os.PathLike | None = None,
):
    """A ``huggingface_hub.ModelCard`` for a relearn run, rendered from ``cards/relearn.md`` (or ``template``).

    Its model-index (``eval_results``) carries baseline, after-reset and recovered eval loss and perplexity, steps,
    examples and tokens to recover, the fraction of the original budget and the original run's steps to the same
    loss, with the values of relearn_result.json. A user template receives the variables ``cards/relearn.md`` uses.
    """
    run_dir = Path(run_dir)
    r = read_result(run_dir)
    dataset = _dataset_name(run_dir, r)
    base = str(r["model"])
    name = repo_id or f"{Path(base).name}-relearn-{r['block']}"
    card_data = _relearn_card_data(r, base, name, dataset)
    s = r["surgery"]
    return _render(
        card_data,
        "relearn",
        template,
        title=f"{Path(base).name}: `{r['block']}` reset and re-learned",
        base_model=base,
        block=r["block"],
        num_tensors=s["num_tensors"],
        num_parameters=f"{s['num_parameters']:,}",
        init=r["init"],
        seed=r["seed"],
        arm=arm_description(r["trainable"]),
        dataset=dataset,
        objective=r["objective"],
        recovery_sentence=_recovery_sentence(r),
        stitch_note=_stitch_note(s.get("stitch")),
        usage=_usage(r, base, name, only_block),
        **_card_figures(r),
        command=f"hf-relearn relearn --model {base} --block {r['block']} --init {r['init']} --reset_seed {r['seed']} "
        f"--objective {r['objective']} --trainable {r['trainable']} --tolerance {r['tolerance']}",
        versions=", ".join(f"{k} {v}" for k, v in r["versions"].items()),
    )


def _stitch_note(fit: dict | None) -> str:
    """How well an encoder swap's closed-form stitch maps (empty without a stitch)."""
    if not fit:
        return ""
    return (
        f" The new encoder reaches the decoder through a {fit['method']} stitch fitted in closed form on "
        f"{fit['rows_fit']} training rows ({fit['tokens_fit']:,} tokens); on {fit['rows_held_out']} rows left out "
        f"of the fit it explains R² = {fit['r2_held_out']:.3f} of the old encoder's states (relative residual "
        f"{fit['relative_residual_held_out']:.3f})."
    )


def _relearn_card_data(r: dict, base: str, name: str, dataset: str):
    """The card's metadata: model-index results (the eval losses Trainer's own card leaves out), tags, source data."""
    from huggingface_hub import EvalResult, ModelCardData

    objective = described_objective(r["objective"])
    is_hub_id = not Path(base).exists() and base.count("/") == 1
    final = r["final_eval_loss"]

    def ppl(loss):
        return math.exp(loss) if loss is not None and not objective.distills else None

    metrics = [
        ("eval_loss", "eval loss after re-learning", final),
        ("baseline_eval_loss", "eval loss of the intact model", r["baseline_eval_loss"]),
        ("after_reset_eval_loss", "eval loss right after the reset", r["after_reset_eval_loss"]),
        ("perplexity", "perplexity after re-learning", ppl(final)),
        ("baseline_perplexity", "perplexity of the intact model", ppl(r["baseline_eval_loss"])),
        ("after_reset_perplexity", "perplexity right after the reset", ppl(r["after_reset_eval_loss"])),
        ("steps_to_recover", "optimizer steps to recover", r["steps_to_recover"]),
        ("examples_to_recover", "training examples to recover", r["examples_to_recover"]),
        ("tokens_to_recover", "tokens to recover", r["tokens_to_recover"]),
        ("fraction_of_original", "fraction of the original training budget", r["fraction_of_original"]),
        (
            "original_steps_to_same_loss",
            "the original run's steps to the same loss (from scratch)",
            r["original_steps_to_same_loss"],
        ),
    ]
    eval_results = [
        EvalResult(
            task_type=objective.card_task,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split="validation",
            metric_type=mtype,
            metric_name=mname,
            metric_value=value,
        )
        for mtype, mname, value in metrics
        if value is not None
    ]
    arch = r.get("architecture") or ""
    return ModelCardData(
        model_name=name,
        base_model=base if is_hub_id else None,
        library_name="transformers",
        pipeline_tag=objective.pipeline_tag,
        tags=[t for t in ("hf-relearn", "relearn", arch) if t],
        eval_results=eval_results,
        **_source_card_data(base),
    )


def _recovery_sentence(r: dict) -> str:
    if r["recovered"]:
        frac = (
            f" = {100 * r['fraction_of_original']:.1f}% of the original {r['original_steps']} steps"
            if r["fraction_of_original"] is not None
            else ""
        )
        return f"**Recovered** at step {r['steps_to_recover']}{frac}."
    return f"**Not recovered** within {r['steps_trained']} steps (stopped: {r['stopped']}); the weights here are the last state."


def _usage(r: dict, base: str, name: str, only_block: bool) -> str:
    if only_block:
        return (
            "This repository holds only the re-learned block. Rebuild the model on top of its base:\n\n"
            f"```python\nfrom hf_relearn import load_relearned\n\nmodel = load_relearned({json.dumps(base)}, {json.dumps(name)})\n```"
        )
    cls = described_objective(r["objective"]).auto_class
    return f"```python\nfrom transformers import {cls}\n\nmodel = {cls}.from_pretrained({json.dumps(name)})\n```"


def _fraction(r: dict) -> str:
    """The share of the original budget re-learning took; for a run not back, the share it trained (a lower bound)."""
    if r["fraction_of_original"] is not None:
        return f"{100 * r['fraction_of_original']:.1f}%"
    if r.get("original_steps"):
        share = 100 * r["steps_trained"] / r["original_steps"]
        return f"more than {share:.1f}% (not back within the {r['steps_trained']} steps it trained)"
    return "unknown (no original budget given)"


def _card_figures(r: dict) -> dict:
    """The numbers the template prints, formatted."""
    return dict(
        tolerance=f"{100 * r['tolerance']:g}%" if r["tolerance_abs"] is None else f"±{r['tolerance_abs']}",
        baseline_loss=_num(r["baseline_eval_loss"]),
        after_loss=_num(r["after_reset_eval_loss"]),
        final_loss=_num(r["final_eval_loss"]),
        baseline_ppl=_ppl(r["baseline_eval_loss"]),
        after_ppl=_ppl(r["after_reset_eval_loss"]),
        final_ppl=_ppl(r["final_eval_loss"]),
        steps=r["steps_to_recover"] if r["recovered"] else "n/a",
        examples=r["examples_to_recover"] if r["recovered"] else "n/a",
        tokens=r["tokens_to_recover"] if r["recovered"] else "n/a",
        fraction=_fraction(r),
        scratch_steps=r["original_steps_to_same_loss"] if r["original_steps_to_same_loss"] is not None else "n/a",
        trainable=f"{r['trainable_parameters']:,}",
        total=f"{r['total_parameters']:,}",
        frozen="yes" if r["frozen_unchanged"] else f"NO ({', '.join(r['frozen_changed'][:5])})",
        warnings=r["warnings"],
    )


def study_card(study_dir: str | os.PathLike, template: str | os.PathLike | None = None):
    """A card for a whole study: its report (the answer, the table, the plots) under model-card metadata, rendered
    from ``cards/study.md`` (or ``template``, which receives ``title``, ``description`` and ``report``)."""
    from huggingface_hub import ModelCardData

    study_dir = Path(study_dir)
    report = study_dir / "report.md"
    if not report.exists():
        raise RelearnError(f"{study_dir}: no report.md; run `hf-relearn report {study_dir}` first")
    rows = read_results(study_dir / RESULTS)
    body = report.read_text().split("\n", 1)[1]  # the report's own title is replaced by the card's
    return _render(
        ModelCardData(tags=["hf-relearn", "relearn-study"], library_name="transformers"),
        "study",
        template,
        title=f"hf-relearn study: {rows[0]['study']}",
        description=f"{len(rows)} relearn runs on {rows[0]['base_model']}.",
        report=body,
    )
