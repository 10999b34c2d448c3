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


RANDOM_SEED = -1  # llama.cpp's server and CLI read seed -1 as "pick one at random"


def sequence_seed(seed: int | None) -> int:
    """The base seed of one request: the user's (same seed, same answer), else (None, or -1 as
    llama.cpp means it) fresh entropy."""
    fresh = seed is None or seed == RANDOM_SEED
    return int(np.random.SeedSequence().entropy) if fresh else int(seed) % (1 << 64)


def token_rng(base: int, position: int, stream: int = 0) -> np.random.Generator:
    """The randomness of the token at `position`: the same however the tokens before it were found.

    Keyed by position, not drawn from one running stream, so speculative decoding (which samples some
    positions inside a verify pass and may re-sample others) draws each token from the very
    generator plain decoding would. Stream 1 is a draft model's own sampling.
    """
    return np.random.default_rng([base, position, stream])


def apply_repeat_penalty(logits: np.ndarray, history: list[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's rule: divide positive logits of recent tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or not history:
        return logits
    recent = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    out = logits.copy()
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def distribution(logits: np.ndarray, params: SamplingParams, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's final distribution: (token ids, probabilities), most likely first, summing to 1.

    Repeat penalty, temperature, top-k, top-p and min-p, in llama.cpp's order; greedy is the
    point mass on the argmax. Plain sampling draws from it; speculative acceptance compares it.
    """
    logits = apply_repeat_penalty(logits, history, params.repeat_penalty, params.repeat_last_n)
    if params.greedy:
        return np.array([int(np.argmax(logits))]), np.ones(1)
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
    return cand[:keep], p[:keep] / p[:keep].sum()


def sample(logits: np.ndarray, params: SamplingParams, history: list[int], rng: np.random.Generator) -> int:
    """Pick the next token from a (vocab,) float32 logits vector."""
    ids, p = distribution(logits, params, history)
    if params.greedy:
        return int(ids[0])
    return int(ids[rng.choice(len(p), p=p)])
