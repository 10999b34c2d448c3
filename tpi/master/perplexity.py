"""Perplexity over one window of tokens, as llama.cpp's perplexity tool computes it."""
from __future__ import annotations

import math

import numpy as np

from tpi.errors import TpiError
from tpi.model.config import PREFILL_CHUNK


def window_perplexity(engine, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of every token after the first."""
    if len(ids) < 2:
        raise TpiError("the text has fewer than 2 tokens; give a longer file")
    engine.reset()
    nll = []
    for i in range(0, len(ids) - 1, PREFILL_CHUNK):
        chunk = ids[i : min(i + PREFILL_CHUNK, len(ids) - 1)]
        logits = engine.forward(chunk, i, all_positions=True).astype(np.float64)  # (T, vocab)
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        targets = np.asarray(ids[i + 1 : i + 1 + len(chunk)])
        nll.append(logz - logits[np.arange(len(chunk)), targets])
    return float(math.exp(np.concatenate(nll).mean()))
