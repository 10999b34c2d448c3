"""Model configuration: one frozen dataclass; architectures differ only by a few flags (Family)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from tpi.errors import ProtocolError, UnsupportedArchitectureError

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
class Family:
    """What an architecture computes differently from llama, as llama.cpp's graph for it does."""

    rope_neox: bool = False  # q/k rotate halves (loaders permute their rows into adjacent pairs)
    qk_norm: bool = False  # per-head RMSNorm of q and k over head_dim (one [hd] weight each), before RoPE
    post_norms: bool = False  # RMSNorm of each block's summed output before the residual add (gemma3)
    activation: str = "silu"  # of the gate: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    scale_q: bool = False  # q is multiplied by the attention scale before attention, not the scores
    embed_scale: bool = False  # token embeddings times sqrt(hidden), in fp32
    sliding_window: bool = False  # honours attention.sliding_window on its local layers
    gate_up_fused: bool = False  # the file stores gate|up as one ffn_up of 2 * ff rows (phi3)


# What differs per architecture. A new architecture is an entry here plus its loader names.
# The model has one RoPE layout: adjacent pairs (x[2j], x[2j+1]) rotate together, as in GGUF llama
# files. Loaders permute q/k rows (biases, q/k norm weights) of rotate-half sources (HF folders, the
# NEOX archs' GGUFs) into that order; q.k is unchanged because both sides get the same permutation.
ARCHITECTURES: dict[str, Family] = {
    "llama": Family(),  # also Mistral / Ministral dense, which convert to arch llama
    "mistral": Family(),
    "qwen2": Family(rope_neox=True),
    "qwen3": Family(rope_neox=True, qk_norm=True),
    "qwen3moe": Family(rope_neox=True, qk_norm=True),  # Qwen3's attention; every MLP experts (tpi.model.moe)
    "gemma3": Family(rope_neox=True, qk_norm=True, post_norms=True, activation="gelu_tanh", scale_q=True,
                     embed_scale=True, sliding_window=True),
    "phi3": Family(rope_neox=True, scale_q=True, gate_up_fused=True),
}


def supported_architectures() -> str:
    return ", ".join(sorted(ARCHITECTURES))


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a key of ARCHITECTURES
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
    # Sliding-window attention (gemma3): local layers see the query and the window - 1 positions
    # before it, and rotate on their own base without frequency scaling.
    sliding_window: int = 0  # 0: every layer attends to the whole context
    swa_layers: tuple[int, ...] = ()  # the local layers
    rope_theta_swa: float = 10000.0
    attn_scale: float = 0.0  # multiplies q.k; 0 means 1/sqrt(head_dim)
    final_softcap: float = 0.0  # logits = c * tanh(logits / c) when c > 0

    @property
    def family(self) -> Family:
        return ARCHITECTURES[self.arch]

    @property
    def scale(self) -> float:
        """The attention scale applied to q.k."""
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def embed_scale(self) -> float:
        """Embedding multiplier: sqrtf(hidden) in fp32 where the family scales (llama.cpp's value), else 1."""
        return float(np.sqrt(np.float32(self.hidden))) if self.family.embed_scale else 1.0

    def is_local(self, layer: int) -> bool:
        """Whether a layer attends through the sliding window."""
        return self.sliding_window > 0 and layer in self.swa_layers

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
                f"unknown model architecture '{self.arch}'; tpi runs {supported_architectures()}"
            )
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert all(0 <= i < self.n_layers for i in self.swa_layers), "local layers must be layers of the model"
        assert (self.n_experts == 0 and self.n_experts_used == 0) or (
            0 < self.n_experts_used <= self.n_experts and self.expert_ff > 0), "experts: 0 < used <= count, ff > 0"
        return self


# Canonical tensor names, independent of file format. {i} is the layer index.
# Linear weights are [out, in] (N, K), as in nn.Linear. q_norm / k_norm are [head_dim] (qk_norm
# families); post_attn_norm / post_mlp_norm [hidden] (post_norms families).
GLOBAL_TENSORS = ("embed", "norm", "lm_head")
LAYER_TENSORS = (
    "attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm", "wo", "post_attn_norm",
    "mlp_norm", "w_gate", "w_up", "w_down", "post_mlp_norm",
)


def layer_name(i: int, short: str) -> str:
    return f"layers.{i}.{short}"


def config_to_dict(cfg: ModelConfig) -> dict:
    """JSON/msgpack-able form, sent to workers in their assignment."""
    d = asdict(cfg)
    d["rope_freq_factors"] = list(cfg.rope_freq_factors) if cfg.rope_freq_factors else None
    d["swa_layers"] = list(cfg.swa_layers)
    return d


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of config_to_dict; validates field names and types (it crosses the wire)."""
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
        kw["swa_layers"] = tuple(int(i) for i in d.get("swa_layers") or ())
        for k in ("hidden", "intermediate", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab", "context"):
            if not isinstance(kw.get(k), int) or kw[k] <= 0:
                raise ProtocolError(f"model config field {k} must be a positive integer")
        for k in ("n_experts", "n_experts_used", "expert_ff"):
            if not isinstance(kw.get(k, 0), int) or kw.get(k, 0) < 0:
                raise ProtocolError(f"model config field {k} must be a non-negative integer")
        return ModelConfig(**kw).validate()
    except (TypeError, AssertionError) as e:
        raise ProtocolError(f"invalid model config: {e}") from None
