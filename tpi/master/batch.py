"""Continuous batching (issue 17): many sequences in one step, each in its own KV slot on every rank.

A `Batch` drives rank 0's Engine one step at a time. Each step carries the decode row of every
running sequence plus prompt chunks of the sequences still reading their prompt, at most
`prefill_budget` prompt tokens per step (SARATHI's chunked prefill: a long prompt delays the others'
next token by one budget's worth of compute, not by the whole prompt). Sequences join and leave
between steps. Each sequence is the SequenceState a lone request runs (tpi.master.generate), so
sampling, stop strings and streaming are the same; only the steps are shared. With a speculator
(`--speculate`), a decoding sequence's run carries its drafted tokens too, verified in the same step
(tpi.master.batch_spec).

Numbers: a sequence's logits are its lone run's where the matmul kernels round a batched row as a
lone one (tests/test_rows.py states the rule per weight type); elsewhere they differ in the last bits.

A lost device costs a pause here too (issue 16, tpi.master.resume): when a step fails because the
group lost a device, every running sequence pauses (`pause`), `resume` waits for the re-formed group
with the engine's Resumer, computes each slot's tokens again by the lone replay's rule over the steps
that slot ran (`Slot.runs`: its prompt chunks fell where the other sequences left room, so not where
a lone prefill puts them) and the batch goes on with the same SequenceStates.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tpi.errors import TpiError
from tpi.master.batch_spec import BatchSpeculation
from tpi.master.generate import Generation, SequenceState
from tpi.master.resume import LOSS, replay_steps
from tpi.model.config import PREFILL_CHUNK
from tpi.model.rows import Rows

log = logging.getLogger(__name__)

DEFAULT_PREFILL_BUDGET = 128  # prompt tokens per step while others decode (SARATHI's chunk)
MAX_DEFAULT_SLOTS = 4  # --parallel's default at most: a home group's concurrent users
KV_SHARE = 4  # the default gives the KV caches at most 1/KV_SHARE of the memory there is


def default_slots(cfg, context: int, backend: str, room_bytes: int) -> int:
    """--parallel's default: as many whole-model KV caches (F16 on ggml, f32 elsewhere) as fit in
    1/KV_SHARE of room_bytes (free memory, or --memory-budget), 1..MAX_DEFAULT_SLOTS; 1 on torch."""
    if backend == "torch":
        return 1
    per_slot = 2 * cfg.n_layers * cfg.kv_dim * context * (2 if backend == "ggml" else 4)
    return max(1, min(MAX_DEFAULT_SLOTS, room_bytes // KV_SHARE // per_slot))


@dataclass
class Running:
    """One admitted sequence and where its results go."""

    seq: SequenceState
    on_text: Callable[[str], None]
    on_done: Callable[[Generation | None, TpiError | None], None]  # exactly once: (generation, None) or (None, error)
    cancelled: Callable[[], bool]
    admitted: float = field(default_factory=time.perf_counter)
    first_token: float = 0.0
    pieces: list[str] = field(default_factory=list)


@dataclass
class Slot:
    """A KV slot: the tokens every rank holds in it, and the sequence running there (None: free)."""

    index: int
    cached: list[int] = field(default_factory=list)
    run: Running | None = None
    runs: list[tuple[int, int]] = field(default_factory=list)  # (start, rows) of the steps that computed `cached`


@dataclass
class Pause:
    """Running sequences waiting for the group to re-form: what each slot held, from when, and why."""

    since: float  # time.monotonic() of the failed step
    epoch: int  # engine.epoch the failed step ran in
    failure: TpiError
    held: dict[int, tuple[list[int], list[tuple[int, int]]]]  # slot -> (cached, runs) to compute again


class Batch:
    """Runs admitted sequences together on an Engine with `engine.slots` KV slots; one thread calls it."""

    def __init__(self, engine, prefill_budget: int = DEFAULT_PREFILL_BUDGET):
        if not 1 <= prefill_budget <= PREFILL_CHUNK:
            raise TpiError(f"prefill budget {prefill_budget} must be 1..{PREFILL_CHUNK} tokens per step")
        self.engine = engine
        self.prefill_budget = prefill_budget
        self.slots = [Slot(i) for i in range(engine.slots)]
        self.steps = self.rows = 0  # steps run, rows they carried
        self.step_s = 0.0  # seconds in engine.step
        self._spec: BatchSpeculation | None = None
        self.pause: Pause | None = None  # a device loss interrupted the running sequences: resume() them
        self.closing = threading.Event()  # the owner shuts down: a pause ends at once

    @property
    def running(self) -> int:
        return sum(s.run is not None for s in self.slots)

    @property
    def free(self) -> int:
        return len(self.slots) - self.running

    def admit(self, run: Running) -> int:
        """Put a sequence in a free slot (the one whose cache shares the longest prefix with it); returns the slot."""
        history = run.seq.history()
        kv = self.engine.model.kv
        best, best_common = None, -1
        for s in self.slots:
            if s.run is not None:
                continue
            s.cached = s.cached[:kv.lengths[s.index]]  # a re-formed group holds nothing
            # engine.reuse_prefix (--prompt-cache): a slot's cached prefix serves the next request that starts with it
            common = _common_prefix(s.cached, history) if self.engine.reuse_prefix else 0
            if common > best_common:
                best, best_common = s, common
        if best is None:
            raise TpiError("no free KV slot; admit a sequence only when Batch.free > 0")
        best.cached = best.cached[:min(best_common, len(history) - 1)]  # at least one row must run for logits
        best.run = run
        run.seq.out.prefill_tokens += len(history) - len(best.cached)
        return best.index

    def step(self) -> None:
        """One step over every running sequence: decode rows (each with its drafts when speculating),
        then prompt chunks within the budget."""
        for s in self.slots:
            if s.run is not None and s.run.cancelled():
                self._finish(s, "cancelled")
        busy = [s for s in self.slots if s.run is not None]
        history = {s.index: s.run.seq.history() for s in busy}  # a slot's history changes only in _advance
        decoding = [s for s in busy if len(history[s.index]) - len(s.cached) == 1]
        spec = self._speculation()
        drafts = spec.plan([(s.index, history[s.index], s.run.seq.max_tokens - len(s.run.seq.tokens))
                            for s in decoding], self.engine.context) if spec is not None and decoding else {}
        plan: list[tuple[Slot, list[int], int]] = []  # (slot, tokens it runs, logits rows) in step order
        for s in decoding:
            d = drafts.get(s.index, [])
            plan.append((s, history[s.index][-1:] + d, 1 + len(d)))  # a verify run: every row's logits
        budget = self.prefill_budget
        for s in sorted(busy, key=lambda s: s.run.admitted):  # prompts in arrival order
            left = len(history[s.index]) - len(s.cached)
            if left > 1 and budget > 0:
                n = min(left, budget)
                plan.append((s, history[s.index][len(s.cached):len(s.cached) + n], int(n == left)))
                budget -= n
        if not plan:
            return
        extra = sum(len(d) for d in drafts.values())
        ids = [t for _, chunk, _ in plan for t in chunk]
        rows = Rows(tuple(s.index for s, _, _ in plan), tuple(len(s.cached) for s, _, _ in plan),
                    tuple(len(c) for _, c, _ in plan), tuple(o for _, _, o in plan), exact=extra > 0)
        t0 = time.perf_counter()
        logits = self._run_step(ids, rows)
        if logits is None:  # paused: the group lost a device, resume() goes on
            return
        seconds = time.perf_counter() - t0
        self.steps += 1
        self.rows += len(ids)
        self.step_s += seconds
        if spec is not None and len(plan) == len(decoding):  # decode rows only: a cost sample
            spec.record_step(len(decoding), extra, seconds)
        at, rollbacks = 0, []
        for s, chunk, out in plan:
            s.cached += chunk
            if out:  # a decode run (its drafts verified when speculating), or a prompt's last chunk
                self._advance(s, logits[at:at + out], history[s.index], spec if s.index in drafts else None,
                              rollbacks)
                at += out
        epoch = self.engine.epoch
        for index, keep in rollbacks:  # rejected drafts' keys/values: dropped on every rank, that slot only
            try:
                self.engine.truncate(keep, index)
            except TpiError as e:  # the broadcast failed as a step can: a lost device pauses every slot
                if not self._failed(e, epoch):
                    raise
                return

    def _speculation(self):
        """The batch's BatchSpeculation while the engine has a speculator (None: plain decoding)."""
        spec = getattr(self.engine, "speculator", None)
        if spec is None:
            self._spec = None
        elif self._spec is None or self._spec.speculator is not spec:
            self._spec = BatchSpeculation(spec)
        return self._spec

    def _run_step(self, ids: list[int], rows: Rows) -> np.ndarray | None:
        """engine.step, noting each slot's step; None when a lost device paused the running sequences."""
        epoch = self.engine.epoch
        try:
            logits = self.engine.step(ids, rows)
        except TpiError as e:
            if not self._failed(e, epoch):
                raise
            return None
        self._ran(rows)
        return logits

    def _failed(self, e: TpiError, epoch: int) -> bool:
        """The group failed a step or a rollback begun in epoch: what every slot holds is suspect. True: a
        lost device paused the running sequences; False: they failed with e (the caller raises it)."""
        held = {s.index: (s.cached, s.runs) for s in self.slots if s.run is not None}
        for s in self.slots:
            s.cached, s.runs = [], []
        if isinstance(e, LOSS) and self.engine.resume is not None:  # a group that re-forms: pause
            self.pause = Pause(time.monotonic(), epoch, e, held)
            log.warning("%d running sequence(s) paused: %s", len(held), e)
            return True
        for s in self.slots:
            self._fail(s, e)
        return False

    def _ran(self, rows: Rows) -> None:
        """Note the step each slot ran (a replay repeats it: tpi.master.resume.replay_steps)."""
        for slot, start, count, exact in zip(rows.slots, rows.starts, rows.counts, rows.exact_runs):
            s = self.slots[slot]
            ran = [(start + i, 1) for i in range(count)] if exact else [(start, count)]  # an exact run: one-row bits
            s.runs = _runs_below(s.runs, start) + ran

    def resume(self) -> None:
        """Ride out a pause (the caller does not hold engine.lock): wait for the re-formed group with the
        engine's Resumer, compute every running slot's tokens again and go on; the sequences fail only where
        a lone one would (the group degrades, or does not serve again within --resume-timeout)."""
        resumer, pause = self.engine.resume, self.pause
        everyone_gone = _AllCancelled(self)
        while self.pause is not None:
            try:
                cause = resumer.wait(self.engine, pause.epoch, pause.failure, everyone_gone)
            except TpiError as e:
                self.fail_all(e)
                return
            if self.closing.is_set():  # the owner fails what runs (fail_all)
                return
            with self.engine.lock:
                for s in self.slots:
                    if s.run is not None and s.run.cancelled():
                        self._finish(s, "cancelled")
                if not self.running:
                    self.pause = None
                    return
                pause.epoch, t0 = self.engine.epoch, time.monotonic()
                try:
                    self._replay(pause.held, resumer.chunk)
                except LOSS as e:  # lost again during the replay: the pause goes on
                    pause.failure = e
                    continue
                except TpiError as e:
                    self.fail_all(e)
                    return
                self.pause = None
                for s in self.slots:
                    if s.run is not None:
                        paused = resumer.resumed(s.run.seq.out, pause.since, cause, len(pause.held[s.index][0]), t0)
                        if s.run.first_token:  # its decode time leaves the pause out, as a lone one's does
                            s.run.first_token += paused

    def _replay(self, held: dict, chunk: int) -> None:
        """Compute each running slot's held tokens again on every rank, in the steps replay_steps gives for
        the steps it ran, the slots side by side (each row's attention is its own slot's); at each round
        the slots whose step is exact run in one exact step, the others in one plain step."""
        self.engine.reset()
        for s in self.slots:
            s.cached, s.runs = [], []
        plans = []  # (slot, tokens, steps)
        for s in self.slots:
            if s.run is not None:
                tokens, runs = held[s.index]
                plans.append((s, tokens, replay_steps(_runs_below(runs, len(tokens)), chunk)))
        for i in range(max((len(steps) for _, _, steps in plans), default=0)):
            for exact in (False, True):
                now = [(s, tokens, steps[i]) for s, tokens, steps in plans if i < len(steps) and steps[i][2] is exact]
                if now:
                    self._replay_step(now, exact)

    def _replay_step(self, now: list, exact: bool) -> None:
        """One replay step: (slot, tokens, (start, rows, exact)) side by side."""
        ids = [t for _, tokens, (start, n, _) in now for t in tokens[start:start + n]]
        counts = tuple(n for _, _, (_, n, _) in now)  # exact runs return every row's logits (Rows.exact_runs)
        rows = Rows(tuple(s.index for s, _, _ in now), tuple(start for _, _, (start, _, _) in now), counts,
                    counts if exact else (0,) * len(now), exact)
        self.engine.step(ids, rows)
        self._ran(rows)
        for s, tokens, (start, n, _) in now:
            s.cached += tokens[start:start + n]

    def _advance(self, s: Slot, logits: np.ndarray, history: list[int], spec, rollbacks: list) -> None:
        """A sequence's next tokens from its rows' logits (sampled, or its drafts verified and the rejected
        ones cut from s.cached, their (slot, keep) added to rollbacks for the caller to drop on every rank:
        a lost device there pauses the batch, not just this sequence), accepted until one ends it; its errors
        end only it."""
        run = s.run
        try:
            if spec is None:
                tokens = [run.seq.sample(logits[-1])]
            else:
                tokens = spec.decided(s.index, logits, history, run.seq.params, run.seq.seed)
                keep = len(history) + len(tokens) - 1  # history and the kept drafts; the bonus token is not cached
                if keep < len(s.cached):
                    s.cached = s.cached[:keep]
                    rollbacks.append((s.index, keep))
            now = time.perf_counter()
            if not run.first_token:
                run.first_token = now
                run.seq.out.ttft_s = now - run.admitted
                run.seq.out.prefill_s += now - run.admitted
            for token in tokens:
                piece = run.seq.accept(token, cancelled=run.cancelled())
                if piece:
                    run.pieces.append(piece)
                    run.on_text(piece)
                if run.seq.finished:  # a stop string, a stop id or max_tokens inside the accepted drafts
                    break
        except Exception as e:  # a receiver or sampling bug fails this sequence, not the batch
            log.exception("sequence in slot %d failed", s.index)
            self._fail(s, e if isinstance(e, TpiError) else TpiError(f"internal error during generation: {e!r}"))
            return
        if run.seq.finished:
            self._finish(s, None)

    def _finish(self, s: Slot, reason: str | None) -> None:
        run, s.run = s.run, None
        out = run.seq.out
        if self._spec is not None:
            out.speculation = self._spec.leave(s.index)
        if reason:
            out.finish_reason = reason
        if run.first_token:
            out.decode_s += time.perf_counter() - run.first_token
        try:
            tail = run.seq.tail() if reason is None else ""
            if tail:
                run.pieces.append(tail)
                run.on_text(tail)
        except Exception:
            log.exception("streaming the tail of slot %d failed", s.index)
        out.text = "".join(run.pieces)
        run.on_done(out, None)

    def _fail(self, s: Slot, error: TpiError) -> None:
        run, s.run = s.run, None
        if self._spec is not None:
            self._spec.leave(s.index)
        if run is not None:
            run.on_done(None, error)

    def fail_all(self, error: TpiError) -> None:
        """End every running sequence with error (the service shuts down, a pause ends without a group)."""
        self.pause = None
        for s in self.slots:
            if s.run is not None:
                self._fail(s, error)


class _AllCancelled:
    """Ends a paused batch's wait early (Resumer.wait's cancel): nobody is left to resume."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def is_set(self) -> bool:
        runs = [s.run for s in self.batch.slots if s.run is not None]
        return self.batch.closing.is_set() or all(r.cancelled() for r in runs)


def _runs_below(runs: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """The steps (start, rows) cut to the positions below end."""
    return [(start, min(n, end - start)) for start, n in runs if start < end]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
