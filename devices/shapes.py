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


def parameter_count(cfg: ModelConfig) -> int:
    """Total weights, counting a tied embedding once."""
    h = cfg.hidden
    attn = h * cfg.q_dim * 2 + h * cfg.kv_dim * 2
    bias = (cfg.q_dim + 2 * cfg.kv_dim) if cfg.qkv_bias else 0
    mlp = 3 * h * cfg.intermediate
    per_layer = attn + bias + mlp + 2 * h
    embed = cfg.vocab * h * (1 if cfg.tied_embeddings else 2)
    return cfg.n_layers * per_layer + embed + h
