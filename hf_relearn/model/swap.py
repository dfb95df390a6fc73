"""Encoder swap: install another encoder (any width) in an encoder-decoder model and wipe the cross-attention.

Two ways to make the decoder read an encoder of another width, each where the model has it:

* ``EncoderDecoderModel`` already projects encoder states with ``enc_to_dec_proj`` (a Linear from the encoder's to
  the decoder's width) whenever the widths differ: we (re)build that projection and leave the cross-attention shapes
  alone, as the model itself would for this pair;
* native encoder-decoders (T5, BART, Marian-style) have no such hook: their cross-attention key and value
  projections read the encoder states directly, so those two matrices per layer are rebuilt with the new input
  width. They are reset anyway, so nothing trained is lost by the change of shape.

Then every cross-attention (and the projection) is reset with the model's own init (``surgery.reset``), and the
requested parts are frozen. With a stitch (``stitch.py``) the decoder is left as it was trained, cross-attention
included, and a linear map fitted in closed form brings the new encoder's output to the representation it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from transformers import EncoderDecoderModel, PreTrainedModel

from ..errors import RelearnError
from .blocks import BlockMap
from .stitch import STITCH_MODULE, encoder_states, fit_stitch, install_stitch, is_stitched
from .surgery import freeze_except, reset

_KV_NAMES = ("k", "v", "k_proj", "v_proj", "key", "value")
FREEZE_MODES = ("decoder-except-cross", "encoder-trainable", "all-trainable", "stitch-only")
CROSS_ATTENTION = ("reset", "zero", "keep")


@dataclass
class SwapReport:
    """What a swap did: widths, how the decoder was adapted, what was reset and what is trainable."""

    old_width: int
    new_width: int
    adapter: str  # "enc_to_dec_proj" | "resized-kv" | "none"
    resized: list[str] = field(default_factory=list)
    reset_tensors: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    cross_attention: str = "reset"
    freeze: str = "decoder-except-cross"
    num_parameters: int = 0
    stitch: dict | None = None  # the closed-form stitch's fit (``StitchFit.to_dict``), when there is one
    # the swapped model's block map (built once after the swap, used for its resets; callers keep using it)
    block_map: BlockMap | None = field(default=None, repr=False, compare=False)

    @property
    def tensors(self) -> list[str]:
        """The tensors the swap wrote (as ``SurgeryReport.tensors``)."""
        return self.reset_tensors

    @property
    def num_tensors(self) -> int:
        return len(self.reset_tensors)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "block_map"}
        return {**out, "num_tensors": self.num_tensors}


def _width(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise RelearnError(f"cannot tell the hidden width of {type(config).__name__}")


def load_encoder(spec: str, config_overrides: str | dict | None = None, seed: int = 0) -> nn.Module:
    """The encoder ``spec`` names, as users have one: a model type built from its config (``t5``, ``bert``: the bare
    encoder), or a folder / Hub id holding an encoder-only model (``T5EncoderModel``, ``BertModel``, ...) or a whole
    encoder-decoder (its encoder). An encoder-only wrapper is loaded as the class it was saved as, so its weights
    load as they are; ``swap_encoder`` takes the stack out of it."""
    from .modeling import is_config_name, load_model, resolve_architecture

    head = "base"
    if not is_config_name(spec):
        _, cls = resolve_architecture(spec, config_overrides, None)
        if cls.__name__.endswith("EncoderModel"):
            head = None  # the folder's own class (T5EncoderModel), not AutoModel's whole encoder-decoder
    new = load_model(spec, config_overrides, head=head, seed=seed)
    return new.get_encoder() if getattr(new.config, "is_encoder_decoder", False) else new


def _unwrap_encoder(new_encoder: nn.Module, old_encoder: nn.Module) -> nn.Module:
    """An encoder-only wrapper (``T5EncoderModel``, ``MT5EncoderModel``) whose stack is of the model's own kind
    (``T5Stack``): take the stack out of it, as one loads "a T5 encoder" from the Hub or a config."""
    if type(new_encoder) is type(old_encoder) or not hasattr(new_encoder, "get_encoder"):
        return new_encoder
    inner = new_encoder.get_encoder()
    return inner if type(inner) is type(old_encoder) else new_encoder


def _decoder_only(cfg) -> bool:
    """An architecture that transformers knows only as a causal LM (GPT-2, Llama, ...): its stack attends causally,
    so it cannot serve as an encoder even with ``is_decoder`` unset. BERT-like models (also masked LMs) pass."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    kind = getattr(cfg, "model_type", None)
    encoder_kinds = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in encoder_kinds


def _check_is_encoder(encoder: nn.Module) -> None:
    cfg = getattr(encoder, "config", None)
    if cfg is None:
        raise RelearnError(f"new encoder {type(encoder).__name__} is not a transformers model (no config)")
    # an encoder stack of an enc-dec (T5Stack) shares its parent's config, is_encoder_decoder included: judge the module
    inner = getattr(encoder, "model", None)
    whole = getattr(encoder, "decoder", None) is not None or getattr(inner, "decoder", None) is not None
    if getattr(cfg, "is_decoder", False) or whole or _decoder_only(cfg):
        raise RelearnError(
            f"new encoder {type(encoder).__name__} is not an encoder (it is a decoder or a whole encoder-decoder; "
            "pass model.get_encoder() or an encoder-only model)"
        )
    if hasattr(encoder, "get_output_embeddings") and encoder.get_output_embeddings() is not None:
        raise RelearnError(
            f"new encoder {type(encoder).__name__} has an LM head; pass the bare encoder (e.g. AutoModel)"
        )


def _cross_parts(model: PreTrainedModel, block_map: BlockMap | None = None) -> list[str]:
    bmap = block_map or BlockMap(model)
    if "decoder" not in bmap.stacks:
        raise RelearnError(f"{type(model).__name__} has no decoder stack")
    layers = bmap.stacks["decoder"].layers
    if not all("cross_attention" in layer.parts for layer in layers):
        raise RelearnError(
            f"the decoder of {type(model).__name__} has no cross-attention (for a GPT-2/BERT decoder in an "
            "EncoderDecoderModel, build it with add_cross_attention=True, is_decoder=True)"
        )
    return [n for layer in layers for n in layer.parts["cross_attention"]]


def _resize_kv(model: PreTrainedModel, cross_params: list[str], old: int, new: int) -> list[str]:
    """Rebuild the key/value projections of every cross-attention to read ``new``-wide encoder states."""
    resized = []
    modules = sorted({n.rsplit(".", 1)[0] for n in cross_params})
    for path in modules:
        parent_path, name = path.rsplit(".", 1)
        module = model.get_submodule(path)
        if name not in _KV_NAMES or not isinstance(module, nn.Linear) or module.in_features != old:
            continue
        fresh = nn.Linear(new, module.out_features, bias=module.bias is not None, dtype=module.weight.dtype)
        setattr(model.get_submodule(parent_path), name, fresh.to(module.weight.device))
        resized.append(path)
    if not resized:
        raise RelearnError(
            f"found no cross-attention key/value projection reading {old}-wide encoder states to resize"
        )
    return resized


def _check_options(model, cross_attention: str, freeze: str, stitch: str | None, stitch_batches) -> None:
    if cross_attention not in CROSS_ATTENTION:
        raise RelearnError(f"cross_attention must be one of {', '.join(CROSS_ATTENTION)}, got {cross_attention!r}")
    if freeze not in FREEZE_MODES:
        raise RelearnError(f"freeze must be one of {', '.join(FREEZE_MODES)}, got {freeze!r}")
    if not getattr(model.config, "is_encoder_decoder", False):
        raise RelearnError(f"{type(model).__name__} is not an encoder-decoder model; there is no encoder to swap")
    if not hasattr(model, "get_encoder") or model.get_encoder() is model:
        raise RelearnError(
            f"{type(model).__name__} has no encoder of its own to swap (a bare decoder stack?): give the whole "
            "encoder-decoder model"
        )
    if stitch is not None:
        if cross_attention != "keep":
            raise RelearnError(
                f"a stitch maps the new encoder to what the trained cross-attention reads; with cross_attention "
                f"{cross_attention!r} there is nothing trained to read it: use cross_attention 'keep'"
            )
        if not stitch_batches:
            raise RelearnError("a stitch is fitted on a sample of training rows: give stitch_batches")
        if isinstance(model, EncoderDecoderModel):
            raise RelearnError(
                "stitching an EncoderDecoderModel is not supported (its forward decides on enc_to_dec_proj from the "
                "encoder's config); swap without a stitch, or use a native encoder-decoder (T5, BART)"
            )
    elif freeze == "stitch-only":
        raise RelearnError("freeze 'stitch-only' needs a stitch (stitch='lstsq' or 'procrustes')")


def _install_native(model, new_encoder, old_encoder, cross: list[str], keep: bool) -> tuple[str, list[str]]:
    """A native encoder-decoder: the same vocabulary and encoder class; key/value resized unless kept."""
    old_vocab = getattr(old_encoder.config, "vocab_size", None)
    new_vocab = getattr(new_encoder.config, "vocab_size", None)
    if old_vocab is not None and new_vocab is not None and old_vocab != new_vocab:
        raise RelearnError(
            f"vocabularies differ: the model's encoder reads {old_vocab} token ids, the new one {new_vocab}; a "
            "native encoder-decoder feeds both the same ids"
        )
    if type(new_encoder) is not type(old_encoder):
        raise RelearnError(
            f"a {type(model).__name__} needs an encoder of its own kind ({type(old_encoder).__name__}), got "
            f"{type(new_encoder).__name__}; for mixed pairs use EncoderDecoderModel"
        )
    model.set_encoder(new_encoder)
    old_width, new_width = _width(old_encoder.config), _width(new_encoder.config)
    if new_width == old_width or keep:
        return "none", []
    return "resized-kv", _resize_kv(model, cross, old_width, new_width)


def _install_pair(model: EncoderDecoderModel, new_encoder) -> str:
    """An EncoderDecoderModel: the new encoder, and ``enc_to_dec_proj`` (re)built where the widths differ."""
    model.encoder = new_encoder
    model.config.encoder = new_encoder.config
    dec_width, new_width = _width(model.decoder.config), _width(new_encoder.config)
    if new_width != dec_width and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None:
        model.enc_to_dec_proj = nn.Linear(new_width, dec_width).to(next(model.decoder.parameters()).device)
        return "enc_to_dec_proj"
    if hasattr(model, "enc_to_dec_proj"):
        del model.enc_to_dec_proj
    return "none"


def swap_encoder(
    model: PreTrainedModel,
    new_encoder: nn.Module,
    cross_attention: str = "reset",
    freeze: str = "decoder-except-cross",
    seed: int = 0,
    block_map: BlockMap | None = None,
    stitch: str | None = None,
    stitch_batches: list[dict] | None = None,
) -> SwapReport:
    """Install ``new_encoder`` in ``model`` (in place), adapt the decoder to its width, reset the cross-attention.

    ``cross_attention``: ``reset`` (the model's own init), ``zero`` (reset, then output projections zeroed: the
    decoder starts as if cross-attention were absent, Flamingo-style) or ``keep`` (left as trained: the encoders must
    have one width, or a stitch must map between them). ``stitch``: ``lstsq`` or ``procrustes`` fits a linear map from
    the new encoder's output to the old one's on ``stitch_batches`` (batches of training rows with ``input_ids`` and
    ``attention_mask``) and applies it to the encoder's output (``stitch.py``); needs ``keep``. ``freeze``:
    ``decoder-except-cross`` (only cross-attention, the projection and the stitch train; the new encoder is frozen),
    ``encoder-trainable`` (plus the new encoder), ``all-trainable``, ``stitch-only``. Raises ``RelearnError`` for a
    model that is not an encoder-decoder, a decoder without cross-attention, a new encoder that is not an encoder,
    mismatched vocabularies (native models, whose encoder reads the same token ids as the decoder), widths that cannot
    be read, a kept cross-attention the new width cannot feed, or a stitch sample too small for the fit.
    """
    _check_options(model, cross_attention, freeze, stitch, stitch_batches)
    _check_is_encoder(new_encoder)
    old_encoder = model.get_encoder()
    new_encoder = _unwrap_encoder(new_encoder, old_encoder)
    old_width, new_width = _width(old_encoder.config), _width(new_encoder.config)
    if cross_attention == "keep" and stitch is None and new_width != old_width:
        raise RelearnError(
            f"the kept cross-attention reads {old_width}-wide encoder states and the new encoder gives {new_width}: "
            "reset it, or add a stitch (stitch='lstsq') that maps one width to the other"
        )
    cross = _cross_parts(model, block_map)
    old_states = encoder_states(old_encoder, stitch_batches) if stitch else None
    if isinstance(model, EncoderDecoderModel):
        adapter, resized = _install_pair(model, new_encoder), []
    else:
        adapter, resized = _install_native(model, new_encoder, old_encoder, cross, cross_attention == "keep")
    fit = None
    if stitch:
        map_, fit = fit_stitch(encoder_states(new_encoder, stitch_batches), old_states, stitch)
        install_stitch(model, map_)
        adapter = "stitch"
    swapped = BlockMap(model)  # the encoder changed: the one map of the swapped model
    targets = [] if cross_attention == "keep" else ["decoder.*.cross_attention"]
    targets += ["enc_to_dec_proj"] if adapter == "enc_to_dec_proj" else []
    reset_names: list[str] = []
    for name in targets:  # every cross-attention (and the projection) reset with the model's own init
        init = "zero" if cross_attention == "zero" and "cross" in name else "scratch"
        reset_names += reset(model, name, init=init, seed=seed, block_map=swapped).tensors
    if stitch:  # the stitch's tensors are written by the swap as a reset's are
        reset_names += [n for n, _ in model.named_parameters() if n.startswith(STITCH_MODULE + ".")]
    trainable = _make_trainable(model, freeze, bool(stitch), adapter, swapped)
    params = dict(model.named_parameters(remove_duplicate=False))
    size = sum(params[n].numel() for n in set(reset_names) if n in params)
    return SwapReport(
        old_width,
        new_width,
        adapter,
        resized,
        reset_names,
        trainable,
        cross_attention,
        freeze,
        size,
        fit.to_dict() if fit else None,
        swapped,
    )


def _make_trainable(model, freeze: str, stitched: bool, adapter: str, block_map: BlockMap) -> list[str]:
    """Leave trainable what ``freeze`` names; return the trainable names."""
    if freeze == "all-trainable":
        for p in model.parameters():
            p.requires_grad_(True)
        # every name, tied ones included (T5's lm_head and decoder.embed_tokens are the shared embedding): the
        # frozen-tensor proof checks by name, and a tied name left out would read as a frozen tensor that moved
        return [n for n, _ in model.named_parameters(remove_duplicate=False)]
    blocks = [STITCH_MODULE] if stitched else []
    if freeze != "stitch-only":
        blocks += ["decoder.*.cross_attention"] + (["enc_to_dec_proj"] if adapter == "enc_to_dec_proj" else [])
    if freeze == "encoder-trainable":
        blocks.append("encoder")
    return freeze_except(model, *blocks, block_map=block_map)


def unsaveable_reason(model: PreTrainedModel, report: SwapReport) -> str | None:
    """Why ``save_pretrained`` of this swapped model would not load back as the same model, or None if it may.

    ``from_pretrained`` rebuilds a native encoder-decoder (T5, BART) from its one config: one ``d_model`` and one set
    of layer counts and sizes for both stacks. So the architecture that config describes is built on the meta device
    and its parameter names and shapes compared with the swapped model's; any difference (a new encoder of another
    width, depth or feed-forward size, resized cross-attention key/value) means it cannot be saved faithfully. A
    same-shape native swap may be saved (transformers 5.24 stores the new encoder's own embedding and does not re-tie
    it on load, its values differing from the decoder's), as may an ``EncoderDecoderModel``, which keeps both configs
    and its ``enc_to_dec_proj``. ``hf-relearn swap`` still reloads what it saved and compares logits before keeping
    anything (that also catches config differences that change no shape).
    """
    if is_stitched(model):
        return (
            "a stitched model cannot be saved so that it loads back as the same model: its stitch is applied by a "
            "forward hook on the encoder, which save_pretrained does not store. Measure the stitched swap in memory "
            "with `hf-relearn relearn --swap_encoder ... --swap_stitch lstsq` (or a study's sweep.swap_stitch). "
            "Nothing was written."
        )
    if isinstance(model, EncoderDecoderModel):
        return None
    import copy

    with torch.device("meta"):
        described = type(model)(copy.deepcopy(model.config))
    want = {n: tuple(p.shape) for n, p in described.named_parameters(remove_duplicate=False)}
    have = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    diffs = [f"{n} {have[n]} where the config builds {want[n]}" for n in have if n in want and have[n] != want[n]]
    diffs += [f"{n} is not in the architecture the config describes" for n in have if n not in want]
    diffs += [f"{n} is missing (the config describes it)" for n in want if n not in have]
    if not diffs:
        return None
    return (
        f"a swapped {type(model).__name__} cannot be saved so that it loads back as the same model: transformers "
        f"rebuilds it from one config (d_model={report.old_width} for both stacks), which does not describe the new "
        f"encoder ({len(diffs)} differences, e.g. {'; '.join(diffs[:2])}). Measure the swap in memory with "
        "`hf-relearn relearn --swap_encoder ...` (or a study's sweep.swaps), or use an EncoderDecoderModel pair, whose "
        "two configs and enc_to_dec_proj are saved and reloaded. Nothing was written."
    )


def check_forward_backward(model: PreTrainedModel, vocab: int, seq: int = 8) -> torch.Tensor:
    """One forward and backward pass on random ids below ``vocab``: the swapped model's shapes fit. Returns the loss.

    Gradients are left in the parameters' ``.grad`` (the caller may inspect or clear them)."""
    ids = torch.randint(3, vocab, (2, seq))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach()


def check_reloads(model: PreTrainedModel, folder: Path, vocab: int) -> None:
    """Reload what was saved in ``folder`` and demand bit-identical logits (``torch.equal``) on a fixed batch;
    raises ``RelearnError`` otherwise (the save would silently be another model)."""
    from .modeling import load_model

    reloaded = load_model(str(folder)).eval()
    model.eval()
    ids = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids, decoder_input_ids=ids).logits
        b = reloaded(input_ids=ids, decoder_input_ids=ids).logits
    if not torch.equal(a, b):
        raise RelearnError(
            f"the saved model does not load back as the swapped one (logits differ by up to {(a - b).abs().max():.3g}); "
            "nothing was written. Measure the swap in memory with `hf-relearn relearn --swap_encoder ...`"
        )
