"""llama.cpp's own cost of a step by rows: the ceiling a batching or speculating engine can reach.

A step of k rows (k sequences one token each, or one sequence's k-token chunk) is timed through
llama-cpp-python's low-level API (llama_decode on a multi-sequence batch), in the same run as the
bench that compares against it. If llama.cpp's k-row step costs c(k) one-row steps, no engine on
these kernels serves k sequences faster than k / c(k) times one, and a verify pass of k drafts at
full acceptance gains at most (k + 1) / c(k + 1).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

from common import median

PROMPT = 100  # tokens in each sequence's cache before the timed steps (a chat's system prompt)


class LlamaRows:
    """One llama.cpp context with `seqs` sequences, each holding PROMPT tokens; times steps of k rows."""

    def __init__(self, model: str, threads: int, seqs: int, context: int = 4096):
        import llama_cpp as lc  # the reference engine: imported only by the benches that time it

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(model.encode(), lc.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"error: llama.cpp could not load {model}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = context, 512, 512, seqs
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.batch = lc.llama_batch_init(512, 0, seqs)
        for s in range(seqs):
            self._decode([5] * PROMPT, list(range(PROMPT)), [s] * PROMPT, last_only=True)

    def _decode(self, tokens, positions, seqs, last_only: bool = False) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s) in enumerate(zip(tokens, positions, seqs)):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, p, 1
            b.seq_id[i][0] = s
            b.logits[i] = int(not last_only or i == len(tokens) - 1)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise SystemExit("error: llama_decode failed")

    def step_s(self, k: int, kind: str) -> float:
        """Seconds of one step of k rows with every row's logits ("seqs": k sequences at PROMPT, one
        token each; "chunk": k tokens of sequence 0), then rolled back."""
        if kind == "seqs":
            toks, pos, seqs = [7] * k, [PROMPT] * k, list(range(k))
        else:
            toks, pos, seqs = [7] * k, list(range(PROMPT, PROMPT + k)), [0] * k
        t0 = time.perf_counter()
        self._decode(toks, pos, seqs)
        dt = time.perf_counter() - t0
        mem = self.lc.llama_get_memory(self.ctx)
        for s in set(seqs):
            self.lc.llama_memory_seq_rm(mem, s, PROMPT, -1)
        return dt

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def step_costs(model: str, threads: int, counts: Sequence[int], reps: int, kinds=("seqs", "chunk")) -> dict:
    """Median seconds of llama.cpp's k-row steps: {(kind, k): s}, interleaved rounds of 3 steps each."""
    rows = LlamaRows(model, threads, max(counts))
    times: dict = {(kind, k): [] for kind in kinds for k in counts}
    try:
        for _ in range(reps):
            for k in counts:
                for kind in kinds:
                    rows.step_s(k, kind)  # warm: a new batch shape sizes llama.cpp's graph
                    times[kind, k] += [rows.step_s(k, kind) for _ in range(3)]
    finally:
        rows.close()
    return {key: median(v) for key, v in times.items()}


def default_model() -> str:
    """The embedded SmolLM2 GGUF (what tpi runs when no model is named)."""
    from tpi.formats import default_model_path  # the bench's default model, as tpi finds it

    return os.fspath(default_model_path())

