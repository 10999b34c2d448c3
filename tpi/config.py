"""Model configuration: one frozen dataclass; architectures differ only by a few flags."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from tpi.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ("llama3"), or linear scaling; None type means off."""

    kind: str | None = None  # None | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    tied_embeddings: bool = False
    name: str = "model"

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def with_context(self, context: int) -> "ModelConfig":
        return replace(self, context=context)

    def validate(self) -> "ModelConfig":
        if self.arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unknown model architecture '{self.arch}'; tpi supports {', '.join(sorted(ARCHITECTURES))}"
            )
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of KV heads"
        return self


# What differs per architecture. A new architecture is an entry here plus its loader names.
# rope_neox: rotate-half RoPE on the (HF-ordered) q/k rows. GGUF llama files store q/k rows
# permuted for adjacent-pair RoPE; the GGUF loader undoes that so the model has one RoPE.
ARCHITECTURES: dict[str, dict] = {
    "llama": {"qkv_bias": False},
    "mistral": {"qkv_bias": False},
    "qwen2": {"qkv_bias": True},
}

# Canonical tensor names, independent of file format. {i} is the layer index.
# Linear weights are [out, in] (N, K), as in nn.Linear.
GLOBAL_TENSORS = ("embed", "norm", "lm_head")
LAYER_TENSORS = (
    "attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo",
    "mlp_norm", "w_gate", "w_up", "w_down",
)


def layer_name(i: int, short: str) -> str:
    return f"layers.{i}.{short}"
