"""Tiny model configs built offline from their config class (shared by tests and benchmarks)."""

from hf_relearn.model.modeling import load_model

TINY = {
    "gpt2": dict(n_layer=4, n_embd=64, n_head=2, vocab_size=256, n_positions=128),
    "gpt_neox": dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "llama": dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "qwen2": dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "bert": dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=128,
    ),
    "roberta": dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=130,
    ),
    "distilbert": dict(n_layers=4, dim=64, n_heads=2, hidden_dim=256, vocab_size=256, max_position_embeddings=128),
    "t5": dict(num_layers=4, d_model=64, d_ff=256, num_heads=2, d_kv=32, vocab_size=256),
    "bart": dict(
        encoder_layers=4,
        decoder_layers=4,
        d_model=64,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    ),
}


def tiny(model_type: str, seed: int = 0, **overrides):
    """A tiny model of ``model_type`` built from config with its usual head."""
    return load_model(model_type, {**TINY[model_type], **overrides}, seed=seed)
