"""Perplexity of a text under llama.cpp, scored the same way any engine's logits can be scored.

Protocol (the Gemma 3 270M fidelity fixture): tokenize with the model's BOS, evaluate the whole text in one
context, score every next-token prediction (positions 0..T-2 predict tokens 1..T-1), perplexity =
exp(mean negative log-likelihood). llama-perplexity's chunked protocol differs; this one fits a short text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PERPLEXITY_BATCH = 64  # rows of logits kept at once: 64 x 262144 float32 = 64 MiB for Gemma 3


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row; logits (N, vocab), targets (N,) -> (N,) float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(targets)), targets]


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def llama_cpp_text_tokens(path: Path | str, text: str) -> list[int]:
    """The model's own tokenization of text with its BOS, as llama.cpp does it."""
    import llama_cpp

    vocab_only = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return vocab_only.tokenize(text.encode(), add_bos=True)
    finally:
        vocab_only.close()


def llama_cpp_perplexity(path: Path | str, tokens: list[int], n_ctx: int = 1024, threads: int = 2) -> float:
    """Perplexity of tokens under llama.cpp (F32 KV cache, no flash attention), in one n_ctx context."""
    import llama_cpp

    assert 1 < len(tokens) <= n_ctx
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=PERPLEXITY_BATCH, n_threads=threads,
                          n_threads_batch=threads, flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        vocab = llm.n_vocab()
        nll = []
        for start in range(0, len(tokens) - 1, PERPLEXITY_BATCH):
            chunk = tokens[start : start + PERPLEXITY_BATCH]
            llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)  # logits for every row
            llm._ctx.decode(llm._batch)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), vocab))
            targets = np.asarray(tokens[start + 1 : start + 1 + len(chunk)])
            nll.append(negative_log_likelihoods(logits[: len(targets)], targets))
        return perplexity(np.concatenate(nll))
    finally:
        llm.close()
