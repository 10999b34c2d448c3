"""The master's generation loop: embed, forward through the group, sample, stream text."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tpi.errors import ContextOverflowError
from tpi.model.config import PREFILL_CHUNK
from tpi.master.sampler import SamplingParams, sample, sequence_seed, token_rng

@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the KV cache)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    speculation: dict = field(default_factory=dict)  # SpeculationStats.as_dict() when a speculator ran

    @property
    def decode_tokens(self) -> int:
        return max(0, len(self.tokens) - 1)

    def stats(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": self.prefill_s,
            "prefill_tok_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_tok_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "ttft_s": self.ttft_s,
            "finish_reason": self.finish_reason,
            **self.speculation,
        }


class StopStringFilter:
    """Holds back streamed text that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, piece: str) -> str:
        self.pending += piece
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending, self.hit = self.pending[:i], "", True
                return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """Runs sequences on a model (one device or a whole group), one at a time."""

    def __init__(self, cfg, tokenizer, model, embed, context: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = model  # rank 0's Transformer; its communicator reaches the workers
        self.embed_table = embed  # QTensor [vocab, hidden]
        self.context = context
        self.cached: list[int] = []  # tokens whose keys/values sit in every rank's cache
        # Reusing the cached prefix of the previous request saves its prefill, but the last
        # prompt token then runs through the one-token path whose bf16 rounding differs from a
        # batched prefill, so a repeated request may sample differently. Off by default: the same
        # request gives the same answer. Multi-turn chat turns it on.
        self.reuse_prefix = False
        self.speculator = None  # tpi.master.speculation.Speculator: drafts verified k+1 rows per forward
        self.lock = threading.Lock()

    @property
    def comm(self):
        return self.model.comm

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        from tpi.quant.formats import dequantize, take_rows

        return dequantize(take_rows(self.embed_table, np.asarray(ids, dtype=np.int64)))  # (T, hidden)

    def forward(self, ids: Sequence[int], start: int, all_positions: bool = False, exact: bool = False) -> np.ndarray:
        """Run tokens at positions start.. on every rank; returns (T or 1, vocab) float32 logits.

        exact: the rows are decode steps (a verify pass): each row's logits are bit for bit what a
        one-token forward at its position gives (tpi.model.transformer).
        """
        if start + len(ids) > self.context:
            raise ContextOverflowError(f"{start + len(ids)} tokens exceed the context of {self.context}")
        h = self.embed(ids)
        comm = self.comm
        if comm.world > 1:
            comm.broadcast_step({"request_id": 0, "start_pos": start, "n_tokens": len(ids), "all": all_positions,
                                 "exact": exact}, h)
        local = self.model.forward(h, start, all_positions, exact)
        self.cached = self.cached[:start] + list(ids)
        if comm.world == 1:
            return local
        return np.concatenate(comm.gather(local), axis=-1)

    def reset(self) -> None:
        self.cached = []

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

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        max_tokens: int,
        *,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        if not prompt:
            raise ContextOverflowError("the prompt is empty; give at least one token")
        if len(prompt) >= self.context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.context}; "
                "shorten the prompt or raise --context"
            )
        max_tokens = min(max_tokens, self.context - len(prompt))
        seed = sequence_seed(params.seed)
        stream, stops = self.tokenizer.stream(), StopStringFilter(stop)
        out = Generation(prompt_tokens=len(prompt))
        history = list(prompt)
        emit = on_text or (lambda s: None)
        spec = self.speculator
        from tpi.master.speculation import SpeculationStats

        spec_stats = SpeculationStats()
        with self.lock:
            t0 = time.perf_counter()
            logits, out.prefill_tokens = self.prefill(prompt)
            out.prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            pieces = []
            pending = [sample(logits, params, history, token_rng(seed, len(history)))]
            for n in range(max_tokens):
                tok = pending.pop(0)
                if n == 0:
                    out.ttft_s = time.perf_counter() - t0
                    t1 = time.perf_counter()
                if tok in self.tokenizer.stop_ids and not ignore_eos:
                    out.finish_reason = "stop"
                    break
                out.tokens.append(tok)
                history.append(tok)
                piece = stops.push(stream.push(tok))
                if piece:
                    pieces.append(piece)
                    emit(piece)
                if stops.hit:
                    out.finish_reason = "stop"
                    break
                if cancel is not None and cancel.is_set():
                    out.finish_reason = "cancelled"
                    break
                if n + 1 < max_tokens and not pending:
                    pending = self._decode_step(history, params, seed, max_tokens - n - 1, spec_stats)
            out.decode_s = time.perf_counter() - t1
            tail = "" if stops.hit else stops.push(stream.flush()) + stops.flush()
            if tail:
                pieces.append(tail)
                emit(tail)
            out.text = "".join(pieces)
            if spec is not None:
                out.speculation = spec_stats.as_dict()
        return out

    def _decode_step(self, history: list[int], params: SamplingParams, seed: int, budget: int, stats) -> list[int]:
        """The tokens after history (history[-1] not yet cached): one forward, plain or speculative."""
        if self.speculator is not None:
            return self.speculator.step(self, history, params, seed, budget, stats)
        logits = self.forward([history[-1]], len(history) - 1)[-1]
        return [sample(logits, params, history, token_rng(seed, len(history)))]
