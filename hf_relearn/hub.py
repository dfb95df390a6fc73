"""Share a recovered model with its story: a model card carrying the recovery metrics, and a safe push.

Everything to upload is staged locally first (``RUN_DIR/hub/full`` or ``RUN_DIR/hub/block``, written atomically);
the push only uploads that folder, so a failed or interrupted push leaves it intact and the same command retries.

``--only-block`` uploads just the re-learned block's tensors (``block.safetensors``) with ``surgery.json`` and the
card: a few MB instead of the whole model, rebuilt on top of the base with :func:`load_relearned`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from .errors import RelearnError
from .io import write_dir_atomic
from .trainer import RESULT_FILE

CARDS = Path(__file__).resolve().parent / "cards"
BLOCK_FILE = "block.safetensors"
CURVE_FILE = "relearn_curve.png"
TASKS = {
    "clm": "text-generation",
    "mlm": "fill-mask",
    "seq2seq": "text2text-generation",
    "distill": "feature-extraction",
}
_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "tokenizer.model", "added_tokens.json",
)  # fmt: skip


def read_result(run_dir: str | os.PathLike) -> dict:
    """The run's relearn_result.json (a clear error when the folder is not a finished relearn run)."""
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        raise RelearnError(f"{run_dir}: no {RESULT_FILE} here; push needs the output dir of a finished relearn run")
    return json.loads(path.read_text())


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
    args_file = run_dir / "hf_relearn_data.json"
    if args_file.exists():
        data = json.loads(args_file.read_text())
        for key in ("dataset_name", "train_file"):
            if data.get(key):
                return Path(data[key]).name if key == "train_file" else data[key]
        return f"the built-in {data.get('builtin_corpus', 'generated')} corpus"
    return "its training data"


def relearn_card(run_dir: str | os.PathLike, repo_id: str | None = None, only_block: bool = False):
    """A ``huggingface_hub.ModelCard`` for a relearn run, rendered from ``cards/relearn.md``.

    Its model-index (``eval_results``) carries baseline, after-reset and recovered eval loss, perplexity, steps and
    tokens to recover and the fraction of the original budget, with the values of relearn_result.json.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_dir = Path(run_dir)
    r = read_result(run_dir)
    dataset = _dataset_name(run_dir, r)
    task = TASKS.get(r["objective"], "text-generation")
    base = str(r["model"])
    is_hub_id = not Path(base).exists() and base.count("/") == 1
    name = repo_id or f"{Path(base).name}-relearn-{r['block']}"
    metrics = [
        ("eval_loss", "eval loss after re-learning", r["final_eval_loss"]),
        ("baseline_eval_loss", "eval loss of the intact model", r["baseline_eval_loss"]),
        ("after_reset_eval_loss", "eval loss right after the reset", r["after_reset_eval_loss"]),
        ("perplexity", "perplexity after re-learning", math.exp(r["final_eval_loss"]) if r["final_eval_loss"] is not None and r["objective"] != "distill" else None),
        ("steps_to_recover", "optimizer steps to recover", r["steps_to_recover"]),
        ("tokens_to_recover", "tokens to recover", r["tokens_to_recover"]),
        ("fraction_of_original", "fraction of the original training budget", r["fraction_of_original"]),
    ]  # fmt: skip
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split="validation",
            metric_type=mtype,
            metric_name=mname,
            metric_value=value,
        )  # fmt: skip
        for mtype, mname, value in metrics
        if value is not None
    ]
    arch = r.get("architecture") or ""
    card_data = ModelCardData(
        model_name=name,
        base_model=base if is_hub_id else None,
        library_name="transformers",
        pipeline_tag=task if r["objective"] != "distill" else None,
        tags=[t for t in ("hf-relearn", "relearn", arch) if t],
        eval_results=eval_results,
        **_source_card_data(base),
    )
    arms = {
        "block": "only this block trainable (everything else frozen)",
        "all": "every parameter trainable",
        "lora-rest": "the block frozen at random and LoRA adapters on every other layer",
        "block+lora-rest": "this block trainable plus LoRA adapters on every other layer",
    }
    if r["recovered"]:
        frac = (
            f" = {100 * r['fraction_of_original']:.1f}% of the original {r['original_steps']} steps"
            if r["fraction_of_original"] is not None
            else ""
        )
        sentence = f"**Recovered** at step {r['steps_to_recover']}{frac}."
    else:
        sentence = f"**Not recovered** within {r['steps_trained']} steps (stopped: {r['stopped']}); the weights here are the last state."
    if only_block:
        usage = (
            "This repository holds only the re-learned block. Rebuild the model on top of its base:\n\n"
            f"```python\nfrom hf_relearn import load_relearned\n\nmodel = load_relearned({base!r}, {name!r})\n```"
        )
    else:
        auto = {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM"}
        cls = auto.get(r["objective"], "AutoModel")
        usage = f"```python\nfrom transformers import {cls}\n\nmodel = {cls}.from_pretrained({name!r})\n```"
    s = r["surgery"]
    return ModelCard.from_template(
        card_data,
        template_path=str(CARDS / "relearn.md"),
        title=f"{Path(base).name}: `{r['block']}` reset and re-learned",
        base_model=base,
        block=r["block"],
        num_tensors=s["num_tensors"],
        num_parameters=f"{s['num_parameters']:,}",
        init=r["init"],
        seed=r["seed"],
        arm=arms.get(r["trainable"], r["trainable"]),
        dataset=dataset,
        objective=r["objective"],
        tolerance=f"{100 * r['tolerance']:g}%" if r["tolerance_abs"] is None else f"±{r['tolerance_abs']}",
        baseline_loss=_num(r["baseline_eval_loss"]),
        after_loss=_num(r["after_reset_eval_loss"]),
        final_loss=_num(r["final_eval_loss"]),
        baseline_ppl=_ppl(r["baseline_eval_loss"]),
        after_ppl=_ppl(r["after_reset_eval_loss"]),
        final_ppl=_ppl(r["final_eval_loss"]),
        recovery_sentence=sentence,
        steps=r["steps_to_recover"] if r["recovered"] else "n/a",
        examples=r["examples_to_recover"] if r["recovered"] else "n/a",
        tokens=r["tokens_to_recover"] if r["recovered"] else "n/a",
        fraction=f"{100 * r['fraction_of_original']:.1f}%"
        if r["fraction_of_original"] is not None
        else "unknown (no original budget given)",
        scratch_steps=r["original_steps_to_same_loss"] if r["original_steps_to_same_loss"] is not None else "n/a",
        trainable=f"{r['trainable_parameters']:,}",
        total=f"{r['total_parameters']:,}",
        frozen="yes" if r["frozen_unchanged"] else f"NO ({', '.join(r['frozen_changed'][:5])})",
        warnings=r["warnings"],
        usage=usage,
        command=f"hf-relearn relearn --model {base} --block {r['block']} --init {r['init']} --reset_seed {r['seed']} "
        f"--objective {r['objective']} --trainable {r['trainable']} --tolerance {r['tolerance']}",
        versions=", ".join(f"{k} {v}" for k, v in r["versions"].items()),
    )


def plot_curve(result: dict, path: Path) -> Path:
    """The recovery curve (metric vs step, baseline and threshold marked) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps, values = zip(*result["curve"], strict=True)
    ax.plot(steps, values, "-o", ms=3, label=f"re-learning {result['block']}")
    ax.axhline(result["baseline_metric"], color="k", lw=1, label="intact model")
    ax.axhline(result["recovery_threshold"], color="grey", ls="--", lw=1, label="recovery threshold")
    if result["recovered"]:
        ax.axvline(
            result["steps_to_recover"], color="green", ls=":", lw=1, label=f"recovered at {result['steps_to_recover']}"
        )
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(result["recovery_metric"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def block_state(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The re-learned block's tensors (by the names in surgery) from the run's saved model."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    result = read_result(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise RelearnError(
            f"{run_dir}: no model.safetensors (was the run saved? relearn saves it unless --save_final_model false)"
        )
    state = load_file(str(weights))
    names = result["surgery"]["tensors"]
    missing = [n for n in names if n not in state]
    tied = [n for n in missing if n in result["surgery"].get("shared_with", [])]
    if set(missing) - set(tied):
        raise RelearnError(f"{run_dir}: model.safetensors lacks block tensors {sorted(set(missing) - set(tied))[:5]}")
    return {n: state[n].contiguous() for n in names if n in state}


def stage(run_dir: str | os.PathLike, repo_id: str | None = None, only_block: bool = False) -> Path:
    """Write everything to upload into ``RUN_DIR/hub/{full,block}`` (atomically); return that folder."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    result = read_result(run_dir)
    card = relearn_card(run_dir, repo_id, only_block)

    def fill(tmp: Path) -> None:
        if only_block:
            tensors = block_state(run_dir)
            save_file(
                tensors, str(tmp / BLOCK_FILE), metadata={"base_model": str(result["model"]), "block": result["block"]}
            )
            surgery = {"base_model": result["model"], "block": result["block"], **result["surgery"]}
            (tmp / "surgery.json").write_text(json.dumps(surgery, indent=2))
        else:
            if (
                not (run_dir / "model.safetensors").exists()
                and not (run_dir / "model.safetensors.index.json").exists()
            ):
                raise RelearnError(
                    f"{run_dir}: no saved model to push (relearn saves it unless --save_final_model false)"
                )
            for name in _MODEL_FILES:
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, tmp / name)
            for shard in run_dir.glob("model-*.safetensors"):
                shutil.copy2(shard, tmp / shard.name)
        shutil.copy2(run_dir / RESULT_FILE, tmp / RESULT_FILE)
        plot_curve(result, tmp / CURVE_FILE)
        card.save(tmp / "README.md")

    return write_dir_atomic(run_dir / "hub" / ("block" if only_block else "full"), fill)


def push(
    run_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    only_block: bool = False,
    token: str | None = None,
) -> str:
    """Stage the run (card included) and upload it to ``repo_id``; returns the commit URL.

    Guarantees: the staged folder is complete on disk before any network call; a failure (server down, 5xx, bad
    token) raises one ``RelearnError`` saying what failed and that the local folder is intact; running it again
    re-uploads the same folder (an upload is idempotent).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not repo_id or repo_id.count("/") != 1:
        raise RelearnError(f"repo id {repo_id!r}: use NAMESPACE/NAME")
    folder = stage(run_dir, repo_id, only_block)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=f"hf-relearn: {read_result(run_dir)['block']} re-learned"
            + (" (block only)" if only_block else ""),
        )
    except Exception as err:  # the network boundary: HTTP errors, refused connections (httpx/httpcore), bad tokens
        kind = "the Hub answered with an error" if isinstance(err, HfHubHTTPError) else "could not reach the Hub"
        first = str(err).splitlines()[0] if str(err) else ""
        raise RelearnError(
            f"push to {repo_id} failed ({kind}): {type(err).__name__}: {first}. Nothing local was lost: the staged "
            f"upload is complete in {folder}; run the same command again to retry."
        ) from err
    return str(getattr(info, "commit_url", info))


def load_relearned(base: str, repo_or_dir: str, revision: str | None = None, **load_kwargs):
    """Rebuild a re-learned model: load ``base`` and put the block from ``repo_or_dir`` (a block-only upload) in.

    Checks that the block was made from a model of the same architecture (names and shapes), so a wrong base is
    an error, never a silently mixed model.
    """
    from safetensors.torch import load_file

    from .modeling import load_model

    folder = Path(repo_or_dir)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_or_dir, revision=revision, allow_patterns=[BLOCK_FILE, "surgery.json"]))
    if not (folder / BLOCK_FILE).exists():
        raise RelearnError(
            f"{repo_or_dir}: no {BLOCK_FILE} (is it a block-only upload? see hf-relearn push --only-block)"
        )
    tensors = load_file(str(folder / BLOCK_FILE))
    model = load_model(base, **load_kwargs)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for name, value in tensors.items():
        if name not in params:
            raise RelearnError(f"{repo_or_dir}: tensor {name} does not exist in base {base}; wrong base model?")
        if params[name].shape != value.shape:
            raise RelearnError(
                f"{repo_or_dir}: {name} has shape {tuple(value.shape)}, base {base} has {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def study_card(study_dir: str | os.PathLike):
    """A card for a whole study: its report (the answer, the table, the plots) under model-card metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    from .study import read_results

    study_dir = Path(study_dir)
    report = study_dir / "report.md"
    if not report.exists():
        raise RelearnError(f"{study_dir}: no report.md; run `hf-relearn report {study_dir}` first")
    rows = read_results(study_dir / "results.csv")
    body = report.read_text().split("\n", 1)[1]  # the report's own title is replaced by the card's
    return ModelCard.from_template(
        ModelCardData(tags=["hf-relearn", "relearn-study"], library_name="transformers"),
        template_path=str(CARDS / "study.md"),
        title=f"hf-relearn study: {rows[0]['study']}",
        description=f"{len(rows)} relearn runs on {rows[0]['base_model']}.",
        report=body,
    )
