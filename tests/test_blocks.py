"""Block map: stacks, layers and parts discovered from the module tree, and the name grammar."""

import json

import pytest
import torch
from tiny import TINY, tiny

from hf_relearn import BlockMap, RelearnError
from hf_relearn.cli.main import main
from hf_relearn.model.modeling import load_model

EXPECTED = {
    # model type: (stacks, parts of every layer of the last stack)
    "gpt2": ({"decoder": "transformer.h"}, {"attention", "mlp", "norms"}),
    "gpt_neox": ({"decoder": "gpt_neox.layers"}, {"attention", "mlp", "norms"}),
    "llama": ({"decoder": "model.layers"}, {"attention", "mlp", "norms"}),
    "qwen2": ({"decoder": "model.layers"}, {"attention", "mlp", "norms"}),
    "bert": ({"encoder": "bert.encoder.layer"}, {"attention", "mlp", "norms"}),
    "roberta": ({"encoder": "roberta.encoder.layer"}, {"attention", "mlp", "norms"}),
    "distilbert": ({"encoder": "distilbert.transformer.layer"}, {"attention", "mlp", "norms"}),
    "t5": ({"encoder": "encoder.block", "decoder": "decoder.block"}, {"attention", "cross_attention", "mlp", "norms"}),
    "bart": (
        {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"},
        {"attention", "cross_attention", "mlp", "norms"},
    ),
}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_block_map_finds_stacks_layers_and_parts(model_type):
    model = tiny(model_type)
    bmap = BlockMap(model)
    stacks, parts = EXPECTED[model_type]
    assert {n: s.path for n, s in bmap.stacks.items()} == stacks
    last = list(bmap.stacks.values())[-1]
    assert len(last.layers) == 4
    for layer in last.layers:
        assert set(layer.parts) == parts
        # parts are disjoint and together cover the whole layer
        flat = [n for names in layer.parts.values() for n in names]
        assert len(flat) == len(set(flat))
        assert set(flat) == set(layer.params)
    assert bmap.embeddings and bmap.head
    # every listed name resolves, and every parameter of the model is in some listed block
    listed = {n for b in bmap.names() for n in b.params}
    assert set(dict(model.named_parameters(remove_duplicate=False))) - listed <= {
        n for n, _ in model.named_parameters() if "pooler" in n
    }


def test_encoder_stack_of_an_encoder_decoder_has_no_cross_attention():
    bmap = BlockMap(tiny("t5"))
    assert "cross_attention" not in bmap.stacks["encoder"].layers[0].parts
    assert all(n.startswith("decoder.block.") for n in bmap.resolve("decoder.*.cross_attention").params)
    assert "relative_attention_bias" in " ".join(bmap.resolve("decoder.0.attention").params)


def test_grammar():
    model = tiny("gpt2")
    bmap = BlockMap(model)
    assert bmap.resolve("decoder.-1").name == "decoder.3"
    assert bmap.resolve("layers.3").params == bmap.resolve("decoder.3").params
    assert bmap.resolve("decoder.3").params == bmap.resolve("transformer.h.3").params
    assert bmap.resolve("decoder.1:3").layers == (("decoder", 1), ("decoder", 2))
    assert bmap.resolve("decoder.1:3").name == "decoder.1:3"
    star = bmap.resolve("decoder.*.mlp")
    assert star.layers == tuple(("decoder", i) for i in range(4))
    assert all(".mlp." in n for n in star.params)
    assert bmap.resolve("decoder.2.ffn").params == bmap.resolve("decoder.2.mlp").params
    assert bmap.resolve("transformer.h.3.attn").params == bmap.resolve("decoder.3.attention").params
    assert bmap.resolve("transformer.h.0.ln_1.weight").params == ("transformer.h.0.ln_1.weight",)
    assert bmap.resolve("final_norm").params == ("transformer.ln_f.bias", "transformer.ln_f.weight")
    assert set(bmap.resolve("embeddings").params) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert bmap.resolve("head").params == ("lm_head.weight",)
    assert bmap.numel(bmap.resolve("decoder.0")) == sum(p.numel() for p in model.transformer.h[0].parameters())


def test_whole_stack_of_encoder_decoder_is_its_own_module():
    bmap = BlockMap(tiny("bart"))
    enc = bmap.resolve("encoder")
    assert enc.kind == "stack" and enc.modules == ("model.encoder",)
    assert all(n.startswith("model.encoder.") for n in enc.params)
    t5 = BlockMap(tiny("t5"))
    assert t5.resolve("decoder.final_norm").params == ("decoder.final_layer_norm.weight",)
    assert set(t5.resolve("final_norm").params) == {
        "encoder.final_layer_norm.weight",
        "decoder.final_layer_norm.weight",
    }


@pytest.mark.parametrize(
    "name, message",
    [
        ("decoder.4", "layer 4 out of range; decoder has 4 layers: use 0..3 or -4..-1"),
        ("decoder.-5", "out of range"),
        ("decoder.3.cross_attention", "has no 'cross_attention'; its parts are: attention, mlp, norms"),
        ("encoder.1", "unknown block 'encoder.1'"),
        ("decoder.x", "is not a layer index"),
        ("decoder.2:2", "selects no layer"),
        ("decoder.1.mlp.extra", "too many dots"),
        ("", "empty name"),
        ("transformer.h.9", "unknown block"),
    ],
)
def test_bad_names_get_one_clear_error_listing_valid_names(name, message):
    bmap = BlockMap(tiny("gpt2"))
    with pytest.raises(RelearnError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        bmap.resolve(name)
    if "unknown" in message:
        assert "decoder.0 .. decoder.3" in str(err.value) and "embeddings, head, final_norm" in str(err.value)


def test_albert_shared_layers_are_reported():
    from hf_relearn.model.modeling import load_model

    model = load_model(
        "albert",
        dict(
            num_hidden_layers=4,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            embedding_size=16,
        ),
    )
    bmap = BlockMap(model)
    stack = bmap.stacks["encoder"]
    assert len(stack.layers) == 1 and stack.applied_depth == 4
    assert "applied 4 times" in bmap.resolve("encoder.0").notes[0]


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("head", [None, "base"])
def test_the_listed_names_cover_every_parameter(model_type, head):
    """`hf-relearn blocks` lists every module one may reset: the listed names together hold every parameter."""
    model = load_model(model_type, TINY[model_type], head=head)
    listed = {n for block in BlockMap(model).names() for n in block.params}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert every - listed == set()


def test_bert_pooler_is_listed_and_resets_alone():
    from hf_relearn.model.surgery import changed_tensors, fingerprint, reset

    model = load_model("bert", TINY["bert"], head="base")
    bmap = BlockMap(model)
    assert "pooler" in [b.name for b in bmap.names()] and "pooler" in bmap.summary()
    with torch.no_grad():
        model.pooler.dense.bias.fill_(1.0)  # as trained: not at its init value
    before = fingerprint(model)
    report = reset(model, "pooler")
    assert set(changed_tensors(before, fingerprint(model))) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert report.block == "pooler"


# ----------------------------------------------------------- `hf-relearn blocks`: every name and its parameter count
GPT2_OVERRIDES = "n_layer=4,n_embd=32,n_head=2,n_positions=64"
T5_OVERRIDES = "num_layers=2,num_decoder_layers=2,d_model=32,d_ff=64,num_heads=2,d_kv=16"


def _distinct_numel(model, names) -> int:
    """Parameters of the named tensors, a tensor shared by several names counted once (by storage)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum({params[n].data_ptr(): params[n].numel() for n in names}.values())


@pytest.mark.parametrize("model_type, overrides", [("gpt2", GPT2_OVERRIDES), ("t5", T5_OVERRIDES)])
def test_blocks_prints_every_valid_name_with_its_distinct_parameter_count(model_type, overrides, capsys):
    model = load_model(model_type, overrides, seed=0)
    bmap = BlockMap(model)
    expected = {b.name: _distinct_numel(model, bmap.resolve(b.name).params) for b in bmap.names()}
    if model_type == "t5":  # tied tensors once: shared, encoder.embed_tokens and decoder.embed_tokens are one tensor
        assert len(bmap.resolve("embeddings").params) == 3 and expected["embeddings"] == model.shared.weight.numel()
    else:
        assert expected["decoder"] == sum(expected[f"decoder.{i}"] for i in range(4))

    assert main(["blocks", model_type, "--config-overrides", overrides, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"]: b["parameters"] for b in data["blocks"]} == expected

    assert main(["blocks", model_type, "--config-overrides", overrides]) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in expected:  # "  NAME  KIND  COUNT"
            printed[parts[0]] = int(parts[2].replace(",", ""))
    assert printed == expected
