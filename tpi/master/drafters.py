"""Drafters of speculative decoding: guess the next k tokens cheaply, on the master alone.

- `PromptLookup` (the default): the last n tokens (n = 8 down to 2) matched against everything
  before them, prompt included, and the tokens that followed the most recent match proposed. No
  second model; it pays on prompt-grounded work (edits, summaries, code) and proposes nothing
  where the text does not repeat.
- `DraftModel` (`--draft MODEL.gguf`): a small model with the target's vocabulary, run as a group
  of one on the master (no allreduce). Its KV cache follows the sequence: what it drafted and the
  target rejected is overwritten by position, as on the ranks.
"""
from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tpi.errors import TpiError
from tpi.master.acceptance import Dist
from tpi.master.sampler import SamplingParams, distribution
from tpi.model.config import PREFILL_CHUNK


def check_draft_path(path: str) -> None:
    """Refuse a --draft that names no file, before anything loads (whatever --parallel turns off)."""
    if not Path(path).exists():
        raise TpiError(f"--draft {path}: no such file; give a small GGUF model with the served model's "
                       "vocabulary, or drop --draft to use prompt lookup")


@dataclass(frozen=True)
class Draft:
    """Proposed tokens, with the draft model's distributions when it sampled them (else None)."""

    tokens: tuple[int, ...] = ()
    dists: tuple[Dist, ...] | None = None
    seconds: float = 0.0  # what drafting them cost


class PromptLookup:
    """n-gram lookup over the sequence so far: the continuation of the latest earlier match."""

    name = "lookup"

    def __init__(self, max_n: int = 8, min_n: int = 2):
        assert 1 <= min_n <= max_n
        self.max_n, self.min_n = max_n, min_n
        self._seq: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> end index of its latest occurrence
        self._indexed = 0  # n-grams ending before this index are in _last

    def _sync(self, history: Sequence[int]) -> None:
        """Index history's n-grams, except those ending at its last token (the query itself)."""
        n_seen = len(self._seq)
        if len(history) < n_seen or list(history[:n_seen]) != self._seq:
            self._seq, self._last, self._indexed = [], {}, 0  # another sequence: start over
        self._seq.extend(history[len(self._seq):])
        seq = self._seq
        for end in range(self._indexed, len(seq) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self._last[tuple(seq[end - n + 1:end + 1])] = end
        self._indexed = max(self._indexed, len(seq) - 1)

    def propose(self, history: Sequence[int], k: int, params: SamplingParams | None = None,
                rng_at: Callable[[int], np.random.Generator] | None = None) -> Draft:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        t0 = time.perf_counter()
        self._sync(history)
        seq = self._seq
        if k <= 0:
            return Draft(seconds=time.perf_counter() - t0)
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            end = self._last.get(tuple(seq[len(seq) - n:]))
            if end is not None:
                return Draft(tuple(seq[end + 1:end + 1 + k]), seconds=time.perf_counter() - t0)
        return Draft(seconds=time.perf_counter() - t0)

    def close(self) -> None:
        pass


def check_same_vocabulary(target, draft, draft_name: str) -> None:
    """TpiError unless the two tokenizers map every id to the same bytes."""
    n_t, n_d = target.vocab_size, draft.vocab_size
    if n_t != n_d:
        raise TpiError(f"the draft model {draft_name} has a vocabulary of {n_d} tokens, the served model {n_t}; "
                       "a draft model must share the served model's tokenizer (take a smaller model of the same "
                       "family), or drop --draft to use prompt lookup")
    for i in range(n_t):
        a, b = target.token_bytes(i), draft.token_bytes(i)
        if a != b:
            raise TpiError(f"the draft model {draft_name} spells token {i} as {b!r} where the served model has "
                           f"{a!r}; a draft model must share the served model's tokenizer (take a smaller model "
                           "of the same family), or drop --draft to use prompt lookup")


class DraftModel:
    """A small model on the master drafting k tokens one at a time (greedy, or sampled as the target is)."""

    name = "draft"

    def __init__(self, engine, label: str = "draft model"):
        self.engine = engine  # tpi.master.generate.Engine of a group of one
        self.label = label

    @classmethod
    def open(cls, path: str, target_tokenizer, context: int, threads: int | None, backend: str = "auto") -> "DraftModel":
        """Load the draft model on this device and check its vocabulary against the target's."""
        # here, not at the top: setup builds the speculator, so it imports this module
        from tpi.master.options import EngineOptions
        from tpi.master.setup import build_local_engine

        check_draft_path(path)
        try:
            engine = build_local_engine(EngineOptions(path, context, threads, backend))
        except TpiError as e:  # "README.md: not a readable GGUF file" alone does not say which flag named it
            raise TpiError(f"--draft {path} cannot be the draft model: {e}") from None
        try:
            check_same_vocabulary(target_tokenizer, engine.tokenizer, path)
        except TpiError:
            engine.model.weights.close()
            raise
        return cls(engine, path)

    def _catch_up(self, history: Sequence[int]) -> np.ndarray:
        """Logits after the whole history: computes only what the draft's cache lacks (at least the last token)."""
        eng = self.engine
        common = 0
        for a, b in zip(eng.cached, history):
            if a != b:
                break
            common += 1
        logits = None
        for i in range(min(common, len(history) - 1), len(history), PREFILL_CHUNK):
            logits = eng.forward(history[i:i + PREFILL_CHUNK], i)
        return logits[-1]

    def propose(self, history: Sequence[int], k: int, params: SamplingParams,
                rng_at: Callable[[int], np.random.Generator]) -> Draft:
        """k tokens from the draft model; rng_at(j) is position len(history) + j's draft generator."""
        t0 = time.perf_counter()
        eng = self.engine
        k = min(k, eng.context - len(history))
        if k <= 0:
            return Draft(seconds=time.perf_counter() - t0)
        logits = self._catch_up(history)
        seen, tokens, dists = list(history), [], []
        for j in range(k):
            ids, p = distribution(logits, params, seen)
            token = int(ids[0]) if params.greedy else int(ids[rng_at(j).choice(len(p), p=p)])
            tokens.append(token)
            dists.append((ids, p))
            seen.append(token)
            if j + 1 < k:
                logits = eng.forward([token], len(seen) - 1)[-1]
        return Draft(tuple(tokens), None if params.greedy else tuple(dists), time.perf_counter() - t0)

    def close(self) -> None:
        self.engine.model.weights.close()
