"""Published model dimensions, so `tpi plan` can predict a split without any weights."""
from __future__ import annotations

from tpi.model.config import ModelConfig, RopeScaling
from tpi.errors import ModelFormatError


def _llama(name, hidden, inter, layers, heads, kv, vocab, context, theta, rope=RopeScaling(), tied=False):
    return ModelConfig(arch="llama", hidden=hidden, intermediate=inter, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, head_dim=hidden // heads, vocab=vocab, context=context, rms_eps=1e-5,
                       rope_theta=theta, rope_scaling=rope, tied_embeddings=tied, name=name)


def _qwen2(name, hidden, inter, layers, heads, kv, vocab, tied):
    return ModelConfig(arch="qwen2", hidden=hidden, intermediate=inter, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, head_dim=hidden // heads, vocab=vocab, context=32768, rms_eps=1e-6,
                       rope_theta=1_000_000.0, qkv_bias=True, tied_embeddings=tied, name=name)


def _qwen3moe(name, hidden, layers, heads, kv, experts, used, expert_ff, vocab, context):
    return ModelConfig(arch="qwen3moe", hidden=hidden, intermediate=6144, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, head_dim=128, vocab=vocab, context=context, rms_eps=1e-6,
                       rope_theta=1_000_000.0, name=name, n_experts=experts, n_experts_used=used, expert_ff=expert_ff)


# Dimensions from each model's published config.json.
MODEL_SHAPES: dict[str, ModelConfig] = {
    "llama-2-7b": _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, 4096, 10000.0),
    "llama-2-13b": _llama("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, 4096, 10000.0),
    "llama-2-70b": _llama("llama-2-70b", 8192, 28672, 80, 64, 8, 32000, 4096, 10000.0),
    "llama-3-8b": _llama("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0),
    "llama-3-70b": _llama("llama-3-70b", 8192, 28672, 80, 64, 8, 128256, 8192, 500000.0),
    "qwen2.5-1.5b": _qwen2("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, tied=True),
    "qwen2.5-7b": _qwen2("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, tied=False),
    "qwen2.5-72b": _qwen2("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, tied=False),
    # Qwen3-30B-A3B: 128 experts of 768 columns, top 8 (about 30.5B weights; 3.0B multiplied per token)
    "qwen3-30b-a3b": _qwen3moe("qwen3-30b-a3b", 2048, 48, 32, 4, 128, 8, 768, 151936, 40960),
    "qwen3-235b-a22b": _qwen3moe("qwen3-235b-a22b", 4096, 94, 64, 4, 128, 8, 1536, 151936, 40960),
    "smollm2-135m": _llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 8192, 100000.0, tied=True),
}


def model_shape(name: str) -> ModelConfig:
    """The named model's dimensions (case-insensitive)."""
    key = name.strip().lower()
    if key not in MODEL_SHAPES:
        raise ModelFormatError(
            f"unknown model shape '{name}'; known shapes: {', '.join(MODEL_SHAPES)} "
            "(or pass a GGUF / safetensors model path)"
        )
    return MODEL_SHAPES[key]


def parameter_count(cfg: ModelConfig, active: bool = False) -> int:
    """Total weights, counting a tied embedding once; active=True: those one token multiplies (a MoE
    model's router and its k chosen experts, not all of them; no embedding table, only its lm_head)."""
    h = cfg.hidden
    attn = h * cfg.q_dim * 2 + h * cfg.kv_dim * 2
    bias = (cfg.q_dim + 2 * cfg.kv_dim) if cfg.qkv_bias else 0
    mlp = 3 * h * cfg.intermediate
    if cfg.is_moe:
        mlp = 3 * h * cfg.expert_ff * (cfg.n_experts_used if active else cfg.n_experts) + h * cfg.n_experts
    per_layer = attn + bias + mlp + 2 * h
    embed = cfg.vocab * h * (1 if cfg.tied_embeddings or active else 2)
    return cfg.n_layers * per_layer + embed + h
