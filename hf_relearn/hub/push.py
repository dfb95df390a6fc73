"""Share a recovered model with its story: a model card carrying the recovery metrics, and a safe push.

Everything to upload is staged locally first (``RUN_DIR/hub/full`` or ``RUN_DIR/hub/block``, written atomically);
the push only uploads that folder, so a failed or interrupted push leaves it intact and the same command retries.

``--only-block`` uploads just the re-learned block's tensors (``block.safetensors``) with ``surgery.json`` and the
card: a few MB instead of the whole model, rebuilt on top of the base with :func:`load_relearned`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import RelearnError
from ..storage import BLOCK_FILE, CURVE_FILE, RESULT_FILE, read_result, write_dir_atomic
from .cards import relearn_card
from .plots import plot_curve

_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "added_tokens.json",
)


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


def stage(
    run_dir: str | os.PathLike,
    repo_id: str | None = None,
    only_block: bool = False,
    card_template: str | os.PathLike | None = None,
) -> Path:
    """Write everything to upload into ``RUN_DIR/hub/{full,block}`` (atomically); return that folder. The card is
    rendered first, so a bad ``card_template`` fails before anything is written."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    result = read_result(run_dir)
    card = relearn_card(run_dir, repo_id, only_block, card_template)

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
    card_template: str | os.PathLike | None = None,
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
    folder = stage(run_dir, repo_id, only_block, card_template)
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

    from ..model.modeling import load_model

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
