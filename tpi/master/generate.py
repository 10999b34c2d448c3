"""The master's generation loop: prefill, then sample and step one token at a time, streaming text.

A request's whole progress lives in one `SequenceState`: prompt, tokens sampled (and streamed) so far,
the RNG, the text decoder and the stop-string filter. `run_sequence` prefills whatever of the
sequence's history the ranks do not hold, then decodes until it finishes, so the same call runs a new
sequence or resumes an interrupted one (issue 16: after the group re-forms, call it again with the same
state; the history is re-prefilled and sampling continues). Each position's token draws from its own
generator (`token_rng(seed, position)`), so a resumed or speculative run (tpi.master.speculation, which
finds several tokens per forward) samples exactly what plain decoding samples.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

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
    pauses: list[dict] = field(default_factory=list)  # device losses survived: paused_s, cause (tpi.master.resume)

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
            "paused_s": sum(p["paused_s"] for p in self.pauses),
            "pause_cause": "; ".join(p["cause"] for p in self.pauses),
        }


class StopStringFilter:
    """Holds back streamed text that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, piece: str) -> str:
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:  # the text ends where the first stop string begins, whichever it is
            out, self.pending, self.hit = self.pending[:min(found)], "", True
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


@dataclass
class SequenceState:
    """One request's progress: all a re-formed group needs to resume it (prompt, tokens so far, RNG)."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int  # token_rng(seed, position) samples the token at each position
    stream: object  # tpi.model.tokenizer.TextStream: token bytes -> text, holding back partial UTF-8
    stops: StopStringFilter
    stop_ids: frozenset[int]  # end-of-generation tokens (none when ignore_eos)
    out: Generation
    finished: bool = False

    @classmethod
    def start(cls, prompt: Sequence[int], params: SamplingParams, max_tokens: int, tokenizer, *,
              stop: Sequence[str] = (), ignore_eos: bool = False) -> "SequenceState":
        return cls(list(prompt), params, max_tokens, sequence_seed(params.seed), tokenizer.stream(),
                   StopStringFilter(stop), frozenset() if ignore_eos else frozenset(tokenizer.stop_ids),
                   Generation(prompt_tokens=len(prompt)), finished=max_tokens <= 0)

    @property
    def tokens(self) -> list[int]:
        return self.out.tokens

    def history(self) -> list[int]:
        """The tokens every rank's KV cache must hold before the next step: prompt + sampled."""
        return self.prompt + self.out.tokens

    def sample(self, logits: np.ndarray) -> int:
        history = self.history()
        return sample(logits, self.params, history, token_rng(self.seed, len(history)))

    def accept(self, token: int, cancelled: bool) -> str:
        """Take a sampled token: returns the text it releases; marks the sequence finished when it is."""
        if token in self.stop_ids:
            return self._finish("stop")
        self.out.tokens.append(token)
        piece = self.stops.push(self.stream.push(token))
        if self.stops.hit:
            self._finish("stop")
        elif cancelled:
            self._finish("cancelled")
        elif len(self.out.tokens) >= self.max_tokens:
            self._finish("length")
        return piece

    def _finish(self, reason: str) -> str:
        self.out.finish_reason, self.finished = reason, True
        return ""

    def tail(self) -> str:
        """Text held back until the end (an incomplete UTF-8 sequence, a possible stop-string start)."""
        return "" if self.stops.hit else self.stops.push(self.stream.flush()) + self.stops.flush()


def run_sequence(engine, seq: SequenceState, emit: Callable[[str], None],
                 cancel: threading.Event | None = None) -> Generation:
    """Prefill what the ranks lack of seq's history, then decode until it finishes; the caller holds engine.lock."""
    out = seq.out
    t0 = time.perf_counter()
    logits, computed = engine.prefill(seq.history())
    out.prefill_tokens += computed
    out.prefill_s += time.perf_counter() - t0
    t1 = time.perf_counter()
    pieces = [out.text] if out.text else []
    spec = getattr(engine, "speculator", None)
    stats = spec.new_stats() if spec is not None else None
    pending = [seq.sample(logits)] if not seq.finished else []
    while not seq.finished:
        token = pending.pop(0)
        if not out.ttft_s:
            out.ttft_s = time.perf_counter() - t0
            t1 = time.perf_counter()
        piece = seq.accept(token, cancelled=cancel is not None and cancel.is_set())
        if piece:
            pieces.append(piece)
            emit(piece)
        if not seq.finished and not pending:
            pending = _decode_step(engine, seq, spec, stats)
    out.decode_s += time.perf_counter() - t1
    if stats is not None:
        out.speculation = stats.as_dict()
    tail = seq.tail()
    if tail:
        pieces.append(tail)
        emit(tail)
    out.text = "".join(pieces)
    return out


def _decode_step(engine, seq: SequenceState, spec, stats) -> list[int]:
    """The next tokens after seq's history (its last token not yet cached): one forward, plain or speculative."""
    if spec is not None:
        return spec.step(engine, seq.history(), seq.params, seq.seed, seq.max_tokens - len(seq.tokens), stats)
    logits = engine.forward([seq.tokens[-1]], len(seq.history()) - 1)[-1]
    return [seq.sample(logits)]
