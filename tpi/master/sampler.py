"""Token sampling on the master: greedy, temperature, top-k, top-p, min-p, repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def apply_repeat_penalty(logits: np.ndarray, history: list[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's rule: divide positive logits of recent tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or not history:
        return logits
    recent = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    out = logits.copy()
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample(logits: np.ndarray, params: SamplingParams, history: list[int], rng: np.random.Generator) -> int:
    """Pick the next token from a (vocab,) float32 logits vector."""
    logits = apply_repeat_penalty(logits, history, params.repeat_penalty, params.repeat_last_n)
    if params.greedy:
        return int(np.argmax(logits))
    k = params.top_k if 0 < params.top_k < logits.shape[0] else logits.shape[0]
    cand = np.argpartition(-logits, k - 1)[:k] if k < logits.shape[0] else np.arange(logits.shape[0])
    cand = cand[np.argsort(-logits[cand], kind="stable")]  # descending
    z = logits[cand].astype(np.float64) / params.temperature
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = len(p)
    if 0.0 < params.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(p), params.top_p) + 1))
    if params.min_p > 0.0:
        keep = min(keep, max(1, int(np.sum(p >= params.min_p * p[0]))))
    p = p[:keep] / p[:keep].sum()
    return int(cand[rng.choice(keep, p=p)])
