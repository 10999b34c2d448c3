"""Model configuration: one frozen dataclass; architectures differ only by a few flags."""
from __future__ import annotations

from dataclasses import dataclass, field

from tpi.errors import UnsupportedArchitectureError

PREFILL_CHUNK = 512  # tokens per forward pass at most; bounds activation memory on every rank


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
    rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (GGUF rope_freqs)
    qkv_bias: bool = False
    tied_embeddings: bool = False
    name: str = "model"
    # Mixture of experts (qwen3moe): every layer's MLP is n_experts experts of expert_ff columns, of
    # which a router picks n_experts_used per token (tpi.model.moe). 0 for dense models.
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ff: int = 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def validate(self) -> "ModelConfig":
        if self.arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unknown model architecture '{self.arch}'; tpi supports {', '.join(sorted(ARCHITECTURES))}"
            )
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert (self.n_experts == 0 and self.n_experts_used == 0) or (
            0 < self.n_experts_used <= self.n_experts and self.expert_ff > 0), "experts: 0 < used <= count, ff > 0"
        return self


# What differs per architecture. A new architecture is an entry here plus its loader names.
# The model has one RoPE: adjacent pairs (x[2j], x[2j+1]) rotate together, as in GGUF llama
# files. Loaders permute q/k rows (and biases) of rotate-half sources (HF folders, GGUF qwen2)
# into that order; q.k is unchanged because both sides get the same permutation.
ARCHITECTURES: dict[str, dict] = {
    "llama": {"qkv_bias": False},
    "mistral": {"qkv_bias": False},
    "qwen2": {"qkv_bias": True},
    "qwen3moe": {"qkv_bias": False},  # Qwen3's attention; every MLP a mixture of experts (tpi.model.moe)
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


def config_to_dict(cfg: ModelConfig) -> dict:
    """JSON/msgpack-able form, sent to workers in their assignment."""
    from dataclasses import asdict

    d = asdict(cfg)
    d["rope_freq_factors"] = list(cfg.rope_freq_factors) if cfg.rope_freq_factors else None
    return d


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of config_to_dict; validates field names and types (it crosses the wire)."""
    from dataclasses import fields

    from tpi.errors import ProtocolError

    if not isinstance(d, dict):
        raise ProtocolError("model config must be a mapping")
    names = {f.name: f for f in fields(ModelConfig)}
    unknown = set(d) - set(names)
    if unknown:
        raise ProtocolError(f"model config has unknown fields {sorted(unknown)}; are master and worker the same tpi version?")
    try:
        kw = dict(d)
        kw["rope_scaling"] = RopeScaling(**(d.get("rope_scaling") or {}))
        ff = d.get("rope_freq_factors")
        kw["rope_freq_factors"] = tuple(float(x) for x in ff) if ff else None
        for k in ("hidden", "intermediate", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab", "context"):
            if not isinstance(kw.get(k), int) or kw[k] <= 0:
                raise ProtocolError(f"model config field {k} must be a positive integer")
        for k in ("n_experts", "n_experts_used", "expert_ff"):
            if not isinstance(kw.get(k, 0), int) or kw.get(k, 0) < 0:
                raise ProtocolError(f"model config field {k} must be a non-negative integer")
        return ModelConfig(**kw).validate()
    except (TypeError, AssertionError) as e:
        raise ProtocolError(f"invalid model config: {e}") from None
