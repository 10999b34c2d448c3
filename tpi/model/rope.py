"""RoPE frequencies, shared by every backend (numpy only)."""
from __future__ import annotations

import math

import numpy as np

from tpi.model.config import ARCHITECTURES, ModelConfig

# GGUF archs whose q/k rows llama.cpp's converter permuted into adjacent pairs
ADJACENT_PAIR_ARCHS = tuple(a for a, family in ARCHITECTURES.items() if not family.rope_neox)


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim/2] (float64), with the model's scaling applied.

    local: a sliding-window layer's, on its own base and unscaled (llama.cpp's freq_scale_swa 1).
    """
    hd = cfg.head_dim
    if local:
        return 1.0 / (cfg.rope_theta_swa ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if cfg.rope_freq_factors is not None:  # GGUF stores llama3 scaling as divisors per pair
        factors = np.asarray(cfg.rope_freq_factors, dtype=np.float64)
        assert factors.shape == inv.shape, "rope_freqs length must be head_dim/2"
        return inv / factors
    rs = cfg.rope_scaling
    if rs.kind == "linear":
        return inv / rs.factor
    if rs.kind == "llama3":
        return _llama3(inv, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_context)
    return inv


def _llama3(inv: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, a smooth blend between."""
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return np.where(wavelen < high_wavelen, inv, np.where(wavelen > low_wavelen, inv / factor, blended))


def adjacent_pair_index(n_heads: int, head_dim: int) -> np.ndarray:
    """Row gather turning rotate-half (HF) q/k order into adjacent-pair order, tpi's RoPE layout.

    Adjacent-pair row h*hd + 2j + s holds rotate-half row h*hd + s*hd/2 + j (s in {0, 1}).
    """
    g = np.arange(n_heads * head_dim)
    h, rem = g // head_dim, g % head_dim
    return h * head_dim + (rem % 2) * (head_dim // 2) + rem // 2
