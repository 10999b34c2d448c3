"""The master's generation service: running sequences, a bounded FIFO queue, cancellation, stats.

Every front end (HTTP API, chat TUI) submits a `GenerationRequest` here and receives its text through
a `Ticket`. A single worker thread owns the engine: with one KV slot it runs `Engine.generate` for
one request at a time; with several (`tpi serve --parallel N`) it runs up to N requests together
through a `tpi.master.batch.Batch`, each step carrying every running sequence. Callers never block
the engine, and a cancelled ticket frees its slot at the next step.
"""
from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tpi.errors import NotReadyError, QueueFullError, RequestError, TpiError
from tpi.master.batch import DEFAULT_PREFILL_BUDGET, Batch, Running
from tpi.master.engine import check_prompt
from tpi.master.generate import Generation, SequenceState
from tpi.master.sampler import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 8  # waiting requests (the running ones are not counted)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class ServiceEvent:
    """What a ticket receives: kind 'text' (a piece), then exactly one 'done' or 'error'."""

    kind: str
    text: str = ""
    generation: Generation | None = None
    error: TpiError | None = None


class Ticket:
    """One submitted request: its events arrive through `sink` (a queue by default)."""

    def __init__(self, request: GenerationRequest, sink: Callable[[ServiceEvent], None] | None, on_cancel):
        self.request = request
        self.events: queue.Queue[ServiceEvent] = queue.Queue()
        self.sink = sink or self.events.put
        self.cancel_event = threading.Event()
        self.finished = threading.Event()
        self.submitted_at = time.monotonic()
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Stop this request: drop it from the queue, or end its generation at the next token."""
        if not self.cancel_event.is_set():
            self.cancel_event.set()
            self._on_cancel(self)

    def emit(self, event: ServiceEvent) -> None:
        try:
            self.sink(event)
        except Exception:  # the receiver is gone (closed event loop): nobody reads this request
            log.debug("dropping an event for a request whose receiver is gone", exc_info=True)
            self.cancel_event.set()
        if event.kind in ("done", "error"):
            self.finished.set()

    def result(self, on_text: Callable[[str], None] | None = None, timeout: float | None = None) -> Generation:
        """Block until done (default sink only); text pieces go to on_text; errors are raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                raise TpiError(f"no answer within {timeout} s; the group may be stuck, check `tpi` logs") from None
            if ev.kind == "text" and on_text:
                on_text(ev.text)
            elif ev.kind == "done":
                return ev.generation
            elif ev.kind == "error":
                raise ev.error


@dataclass
class ServiceStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0  # queue full
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pauses: int = 0  # device losses requests were paused across and resumed after (tpi.master.resume)
    paused_s: float = 0.0
    last_pause: str = ""  # the last pause's length and cause
    last: dict = field(default_factory=dict)  # Generation.stats() of the last finished request
    recent_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16))


class GenerationService:
    """Runs requests on one engine (several at once when it has several KV slots) behind a bounded FIFO queue."""

    def __init__(self, engine, status: Callable[[], dict] | None = None, queue_size: int = DEFAULT_QUEUE_SIZE,
                 model_name: str | None = None, prefill_budget: int = DEFAULT_PREFILL_BUDGET):
        """engine may be None while the group forms (`tpi serve`); attach() it when ready."""
        if queue_size < 0:
            raise RequestError(f"queue size {queue_size} is negative; use 0 or more")
        self.prefill_budget = prefill_budget
        self.batch: Batch | None = None  # engines with several KV slots
        self._active = 0  # requests holding a slot
        self.status_fn = status or (lambda: {"devices": [{"rank": 0, "name": "local"}], "state": "ready"})
        self.queue_size = queue_size
        self.engine = None
        self.model_name = model_name
        self.context = 0
        self.tokenizer = None
        if engine is not None:
            self.attach(engine)
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: Ticket | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._stats = ServiceStats()
        self._thread = threading.Thread(target=self._loop, name="tpi-generation", daemon=True)
        self._thread.start()

    def attach(self, engine) -> None:
        """Start serving on `engine` (the group has formed)."""
        self.context = engine.context
        self.model_name = self.model_name or engine.cfg.name
        self.tokenizer = engine.tokenizer
        if getattr(engine, "slots", 1) > 1:  # an engine without slots runs one sequence
            self.batch = Batch(engine, self.prefill_budget)
        self.engine = engine

    @property
    def slots(self) -> int:
        return self.batch.engine.slots if self.batch is not None else 1

    def require_engine(self) -> None:
        if self.engine is None:
            state = self.status_fn().get("state", "starting")
            raise NotReadyError(f"the group is not serving yet (state: {state}); retry shortly, see GET /health")

    # -- submitting -----------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise ContextOverflowError or RequestError when the request cannot run on this context."""
        self.require_engine()
        check_prompt(len(request.prompt_ids), self.context)
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens is {request.max_tokens}; it must be at least 1")
        if request.max_tokens > self.context:
            raise RequestError(
                f"max_tokens {request.max_tokens} exceeds the context of {self.context} tokens; lower max_tokens"
            )

    def submit(self, request: GenerationRequest, sink: Callable[[ServiceEvent], None] | None = None) -> Ticket:
        """Queue a request; raises QueueFullError when every slot is taken."""
        self.check(request)
        ticket = Ticket(request, sink, self._cancelled)
        with self._cond:
            if self._closed:
                raise RequestError("the generation service is shut down; restart tpi")
            # every slot running plus queue_size waiting; requests not yet picked up count as running first
            if len(self._waiting) + self._active >= self.slots + self.queue_size:
                self._stats.rejected += 1
                raise QueueFullError(
                    f"the request queue is full ({self.queue_size} waiting); retry later", self._retry_after()
                )
            self._waiting.append(ticket)
            self._stats.submitted += 1
            self._cond.notify_all()
        return ticket

    def _retry_after(self) -> int:
        recent = self._stats.recent_s
        mean = sum(recent) / len(recent) if recent else 2.0
        return int(min(60, max(1, math.ceil(mean * (len(self._waiting) + 1) / self.slots))))

    def _cancelled(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._stats.cancelled += 1
                dropped = True
            else:
                dropped = False
        if dropped:
            ticket.emit(ServiceEvent("done", generation=Generation(finish_reason="cancelled",
                                                                    prompt_tokens=len(ticket.request.prompt_ids))))

    # -- the worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                if self.batch is None:
                    ticket = self._running = self._waiting.popleft()
                    self._active = 1
                else:
                    while self._waiting and self.batch.free:
                        self._admit(self._waiting.popleft())
            if self.batch is None:
                try:
                    self._run(ticket)
                finally:
                    with self._cond:
                        self._running, self._active = None, 0
                        self._cond.notify_all()
            else:
                self._step()
        if self.batch is not None:
            self.batch.fail_all(RequestError("the generation service shut down while this request ran"))

    def _admit(self, ticket: Ticket) -> None:
        """Give a waiting request a KV slot (the caller holds _cond)."""
        req = ticket.request
        seq = SequenceState.start(req.prompt_ids, req.params, min(req.max_tokens, self.context - len(req.prompt_ids)),
                                  self.tokenizer, stop=req.stop, ignore_eos=req.ignore_eos)
        started = time.monotonic()

        def done(gen: Generation | None, error: TpiError | None) -> None:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
            self._finished(ticket, gen, error, started)

        run = Running(seq, lambda piece: ticket.emit(ServiceEvent("text", text=piece)), done,
                      ticket.cancel_event.is_set)
        self.batch.admit(run)
        self._active += 1

    def _step(self) -> None:
        """One batched step; a failed step has already failed its sequences, or paused them (a group that
        lost a device: they wait here, outside the engine's lock, and resume on the re-formed group)."""
        with self.engine.lock:
            try:
                self.batch.step()
            except TpiError as e:
                log.warning("a batched step failed: %s", e)
            except Exception as e:  # a bug fails the running requests, not the service thread
                log.exception("a batched step failed")
                self.batch.fail_all(TpiError(f"internal error during generation: {e!r}; see the log"))
        if self.batch.pause is not None:
            try:
                self.batch.resume()
            except Exception as e:  # a bug fails the paused requests, not the service thread
                log.exception("resuming the paused requests failed")
                self.batch.fail_all(TpiError(f"internal error while resuming: {e!r}; see the log"))

    def _run(self, ticket: Ticket) -> None:
        req = ticket.request
        started = time.monotonic()
        try:
            gen = self.engine.generate(
                list(req.prompt_ids), req.params, req.max_tokens, stop=req.stop, ignore_eos=req.ignore_eos,
                on_text=lambda piece: ticket.emit(ServiceEvent("text", text=piece)), cancel=ticket.cancel_event,
            )
        except TpiError as e:
            self._finished(ticket, None, e, started)
            return
        except Exception as e:  # a bug must fail this request, not the service thread
            log.exception("generation failed")
            self._finished(ticket, None, TpiError(f"internal error during generation: {e!r}; see the log"), started)
            return
        self._finished(ticket, gen, None, started)

    def _finished(self, ticket: Ticket, gen: Generation | None, error: TpiError | None, started: float) -> None:
        """Count a request's end and tell its ticket."""
        if error is not None:
            with self._cond:
                self._stats.failed += 1
            ticket.emit(ServiceEvent("error", error=error))
            return
        with self._cond:
            st = self._stats
            st.completed += gen.finish_reason != "cancelled"
            st.cancelled += gen.finish_reason == "cancelled"
            st.prompt_tokens += gen.prompt_tokens
            st.completion_tokens += len(gen.tokens)
            st.pauses += len(gen.pauses)
            st.paused_s += sum(p["paused_s"] for p in gen.pauses)
            if gen.pauses:
                st.last_pause = f"{gen.pauses[-1]['paused_s']:.2f}s: {gen.pauses[-1]['cause']}"
            st.last = gen.stats()
            st.recent_s.append(time.monotonic() - started)
        ticket.emit(ServiceEvent("done", generation=gen))

    # -- state ----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Queue and counters; cheap enough for /health."""
        with self._cond:
            st = self._stats
            return {
                "model": self.model_name,
                "context": self.context,
                "busy": self._active > 0,
                "slots": self.slots,
                "running": self._active,
                "queued": len(self._waiting),
                "queue_size": self.queue_size,
                "submitted": st.submitted,
                "completed": st.completed,
                "cancelled": st.cancelled,
                "rejected": st.rejected,
                "failed": st.failed,
                "total_prompt_tokens": st.prompt_tokens,
                "total_completion_tokens": st.completion_tokens,
                "pauses": st.pauses,
                "paused_s": st.paused_s,
                "last_pause": st.last_pause,
                "last": dict(st.last),
                **({"batch": {"steps": self.batch.steps, "rows": self.batch.rows,
                              "step_seconds": round(self.batch.step_s, 6)}} if self.batch is not None else {}),
            }

    def status(self) -> dict:
        """The group's status (devices, state) as its owner reports it."""
        return self.status_fn()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the worker thread (the engine itself is the caller's)."""
        with self._cond:
            self._closed = True
            pending, self._waiting = list(self._waiting), collections.deque()
            running = self._running
            self._cond.notify_all()
        for t in pending:
            t.cancel_event.set()
            t.emit(ServiceEvent("error", error=RequestError("the generation service shut down before this request ran")))
        if running is not None:
            running.cancel_event.set()
        if self.batch is not None:  # a pause waiting for the group ends
            self.batch.closing.set()
        self._thread.join(timeout)


def sampling_params(temperature: float | None, top_p: float | None, seed: int | None, *,
                    top_k: int | None = None, min_p: float | None = None,
                    repeat_penalty: float | None = None) -> SamplingParams:
    """SamplingParams from optional request fields; unset ones keep `tpi run`'s defaults."""
    base = SamplingParams()
    return SamplingParams(
        temperature=base.temperature if temperature is None else temperature,
        top_k=base.top_k if top_k is None else top_k,
        top_p=base.top_p if top_p is None else top_p,
        min_p=base.min_p if min_p is None else min_p,
        repeat_penalty=base.repeat_penalty if repeat_penalty is None else repeat_penalty,
        seed=seed,
    )


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
