"""Rank 0's engine: embed tokens, run one step on every rank of the group, gather the logits.

The engine runs one sequence at a time (slot 0) and knows which of its tokens every rank's KV cache
holds (`cached`). A step is a typed `Step` (tpi.transport.protocol) whose rows carry a slot and a
position; issue 17 (many sequences per step) and 18 (k+1 speculative rows per step, rejected rows
rolled back with `truncate`) extend what one step carries, not this shape.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from collections.abc import Callable, Sequence

import numpy as np

from tpi.errors import ContextOverflowError, TpiError
from tpi.master.generate import Generation, SequenceState, run_sequence
from tpi.master.sampler import SamplingParams
from tpi.model.config import PREFILL_CHUNK
from tpi.model.rows import Rows
from tpi.quant.formats import dequantize, take_rows
from tpi.transport.protocol import EXACT_ROWS, Step

DEFAULT_CONTEXT = 4096


def resolve_context(cfg, requested: int | None) -> int:
    ctx = requested or min(cfg.context, DEFAULT_CONTEXT)
    if ctx < 8:
        raise TpiError(f"--context {ctx} is too small; use at least 8")
    return ctx


def check_prompt(n_tokens: int, context: int) -> None:
    """The one prompt check: at least one token, and room for at least one more in the context."""
    if n_tokens == 0:
        raise ContextOverflowError("the prompt is empty; give at least one token")
    if n_tokens >= context:
        raise ContextOverflowError(f"the prompt has {n_tokens} tokens but the context holds {context}; "
                                   "shorten the prompt or raise --context")


class Engine:
    """Runs sequences on a model (one device or a whole group), one at a time."""

    def __init__(self, cfg, tokenizer, model, embed, context: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = model  # rank 0's Transformer; its communicator reaches the workers
        self.embed_table = embed  # QTensor [vocab, hidden]
        self.context = context
        self.cached: list[int] = []  # tokens whose keys/values sit in every rank's cache (slot 0)
        # Reusing the cached prefix of the previous request saves its prefill, but the last
        # prompt token then runs through the one-token path whose bf16 rounding differs from a
        # batched prefill, so a repeated request may sample differently. Off by default: the same
        # request gives the same answer. Multi-turn chat turns it on.
        self.reuse_prefix = False
        self.speculator = None  # tpi.master.speculation.Speculator: k drafts verified per forward
        self.lock = threading.Lock()
        self.epoch = 0  # counts communicator swaps: a step that failed before one may resume after it
        self.resume = None  # tpi.master.resume.Resumer of a group that re-forms after a device loss

    @property
    def comm(self):
        return self.model.comm

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        h = dequantize(take_rows(self.embed_table, np.asarray(ids, dtype=np.int64)))  # (T, hidden) float32
        scale = self.cfg.embed_scale
        return h if scale == 1.0 else h * np.float32(scale)  # gemma3: sqrtf(hidden), in fp32 as llama.cpp

    def forward(self, ids: Sequence[int], start: int, all_positions: bool = False, exact: bool = False) -> np.ndarray:
        """Run tokens at positions start.. on every rank; returns (T or 1, vocab) float32 logits.

        exact (a verify pass of speculative decoding): each row's logits are, bit for bit, what a
        one-token forward at its position gives (tpi.model.transformer).
        """
        if start + len(ids) > self.context:
            raise ContextOverflowError(f"{start + len(ids)} tokens exceed the context of {self.context}")
        h = self.embed(ids)
        self.comm.broadcast_step(Step.of_sequence(start, len(ids), h, all_logits=all_positions, exact=exact))
        local = self.model.forward(h, Rows.sequence(start, len(ids), all_positions, exact=exact))
        self.cached = self.cached[:start] + list(ids)
        return np.concatenate(self.comm.gather(local), axis=-1)

    def step(self, ids: Sequence[int], rows: Rows) -> np.ndarray:
        """Run one step of many sequences' rows (tokens ids, in rows' order) on every rank: (n_outputs, vocab)
        float32 logits of each run's last rows.outputs rows, in order (every rank computes only those).

        Slot 0's `cached` is the one-sequence path's; a batching caller keeps its own per slot.
        """
        for slot, start, count in zip(rows.slots, rows.starts, rows.counts):
            if start + count > self.context:
                raise ContextOverflowError(f"{start + count} tokens of slot {slot} exceed the context of {self.context}")
        self.model.kv.admit(rows)  # ShapeError here, before any worker sees the step
        h = self.embed(ids)
        sent = rows
        if not rows.n_outputs:  # earlier prompt chunks only: one row's logits anyway (no empty gather)
            sent = replace(rows, outputs=rows.outputs[:-1] + (1,))
        self.comm.broadcast_step(Step(0, EXACT_ROWS if rows.exact else 0, list(rows.slots), list(rows.starts),
                                      list(rows.counts), list(sent.outputs), h))
        logits = np.concatenate(self.comm.gather(self.model.forward(h, sent)), axis=-1)
        return logits if sent is rows else logits[:0]

    @property
    def slots(self) -> int:
        return self.model.kv.slots

    def truncate(self, keep: int, slot: int = 0) -> None:
        """Forget positions keep.. of a KV slot on every rank (a KV rollback, a freed slot): the slot's
        next step starts at or before `keep`."""
        if slot == 0:
            self.cached = self.cached[:keep]
        self.model.truncate(slot, keep)
        self.comm.broadcast_truncate(slot, keep)

    def reset(self) -> None:
        """Every slot empty on every rank (a new conversation in slot 0, a re-formed group)."""
        for slot in range(self.slots):
            self.truncate(0, slot)

    def swap_comm(self, comm) -> None:
        """Run the next steps through `comm` (recovery); every rank's cache is suspect, so it starts over."""
        with self.lock:  # a running request fails within its timeout and lets go of the lock
            self.model.comm = comm
            self.epoch += 1
            self.reset()

    def adopt(self, model, embed) -> None:
        """Take over a re-planned group's rank 0 (model and embedding); the old weights are closed."""
        with self.lock:
            old, self.model, self.embed_table = self.model.weights, model, embed
            self.epoch += 1
            self.reset()
        old.close()

    def prefill(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Compute the prompt, reusing the cached common prefix. Returns last logits and tokens computed."""
        common = 0
        for a, b in zip(self.cached if self.reuse_prefix else (), ids):
            if a != b:
                break
            common += 1
        start = min(common, len(ids) - 1)  # at least one token must run to get logits
        logits = None
        for i in range(start, len(ids), PREFILL_CHUNK):
            logits = self.forward(ids[i : i + PREFILL_CHUNK], i)
        return logits[-1], len(ids) - start

    def generate(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int, *, stop: Sequence[str] = (),
                 ignore_eos: bool = False, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        """Sample up to max_tokens after the prompt, streaming text pieces to on_text."""
        check_prompt(len(prompt), self.context)
        seq = SequenceState.start(prompt, params, min(max_tokens, self.context - len(prompt)), self.tokenizer,
                                  stop=stop, ignore_eos=ignore_eos)
        emit = on_text or (lambda s: None)
        if self.resume is not None:  # a group: a device loss pauses the sequence (tpi.master.resume)
            return self.resume.run(self, seq, emit, cancel)
        with self.lock:
            return run_sequence(self, seq, emit, cancel)
