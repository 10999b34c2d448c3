"""A lost device costs a pause, not the answer: resume an interrupted sequence on the re-formed group.

When a step fails because the group lost a device (tpi.errors.GroupError from the communicator, or
GroupUnavailableError while the supervisor recovers), `Resumer.run` lets go of the engine, waits for the
group to serve again (the device rejoined from its cache, or a re-plan without it), computes the
sequence's history again and goes on sampling from the same `SequenceState`: same RNG, same text
decoder and stop filter, so the client sees a pause and then the rest of the stream.

Bit-identical replay: ggml computes each row of a small step exactly as a one-token decode step does,
but not of a large one: flash attention over 64 or more query rows takes a tiled path (GGML_FA_TILE_Q),
and a matmul on weights ggml repacked (CPU_REPACK: Q4_0, Q4_K, IQ4_NL) over 4 or more rows takes gemm
instead of gemv (ggml-cpu/repack.cpp); both round differently. So the replay runs the prompt as the
first prefill did, the streamed tokens in steps of `replay_chunk` rows (63, or 3 with repacked weight
types), and the last one alone: every rank's cache and the next logits are the undisturbed run's, bit
for bit (tests/test_resume_replay.py), and a greedy answer is identical. `replay_steps` states that
rule over the steps a sequence ran, so a batched sequence (tpi.master.batch, whose prompt chunks fall
where the other sequences left room) replays by the same rule as a lone one.

The request fails (GroupUnavailableError, a 503) only when the group degrades (no group can be formed),
or does not serve again within GroupOptions.resume_bound_s.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from tpi.errors import GroupError, GroupUnavailableError
from tpi.master.events import RequestResumed
from tpi.master.generate import Generation, SequenceState, run_sequence
from tpi.model.config import PREFILL_CHUNK, layer_name
from tpi.quant.formats import ggml_type_info, is_ggml

log = logging.getLogger(__name__)

REPLAY_CHUNK = 63  # rows per replay step: below ggml's 64-row flash-attention tile (see the docstring)
REPACKED_CHUNK = 3  # ... and below the 4 rows from which ggml multiplies repacked weights by gemm
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})  # tpi.quant.ggml_backend.REPACK_TYPES, by name
POLL_S = 0.05
LOSS = (GroupError, GroupUnavailableError)  # what a step raises when the group lost a device


class Resumer:
    """Runs sequences on a group's engine, pausing them across a device loss (one per group)."""

    def __init__(self, group, report: Callable[[object], None], chunk: int = REPLAY_CHUNK):
        self.group = group
        self.report = report  # the supervisor's: RequestResumed joins the group's events on /health
        self.chunk = chunk  # rows per replay step (replay_chunk)
        self.paused: dict | None = None  # while a request waits: since (unix time), cause

    def status(self) -> dict:
        return {"paused": dict(self.paused)} if self.paused else {}

    def run(self, engine, seq: SequenceState, emit: Callable[[str], None],
            cancel: threading.Event | None = None) -> Generation:
        """run_sequence, resumed after every device loss the group recovers from; see the module docstring."""
        kept: list[str] = []  # every piece streamed, across resumptions

        def keep(piece: str) -> None:
            kept.append(piece)
            emit(piece)

        pause: dict = {}  # from a failed step until the replay is done: since (monotonic), cause
        while True:
            with engine.lock:
                epoch = engine.epoch
                try:
                    if pause:
                        out = self._resume(engine, seq, keep, cancel, pause)
                    else:
                        out = run_sequence(engine, seq, keep, cancel)
                    out.text = "".join(kept)
                    return out
                except LOSS as e:
                    failure = e
                    pause.setdefault("since", time.monotonic())  # a loss during the replay extends the pause
            pause["cause"] = self.wait(engine, epoch, failure, cancel)
            if cancel is not None and cancel.is_set():  # cancelled during the pause: end it here
                seq.out.finish_reason, seq.out.text = "cancelled", "".join(kept)
                return seq.out

    def _resume(self, engine, seq: SequenceState, emit, cancel, pause: dict) -> Generation:
        """Compute the history again on the re-formed group (see the module docstring), then go on."""
        t0 = time.monotonic()
        replayed = replay(engine, seq, self.chunk)
        self.resumed(seq.out, pause.pop("since"), pause.pop("cause"), replayed, t0)
        with _reusing_cache(engine):  # the last token runs alone, as the undisturbed decode step did
            return run_sequence(engine, seq, emit, cancel)

    def resumed(self, out: Generation, since: float, cause: str, replayed: int, replay_t0: float) -> float:
        """Record a pause that ended (monotonic since, replay_t0) in out.pauses and the group's events;
        returns its length."""
        now = time.monotonic()
        paused = now - since
        out.pauses.append({"paused_s": round(paused, 3), "cause": cause, "replayed_tokens": replayed,
                           "replay_s": round(now - replay_t0, 3)})
        self.report(RequestResumed(round(paused, 2), cause, replayed))
        log.info("request resumed after %.2fs (%s); %d tokens re-prefilled", paused, cause, replayed)
        return paused

    def wait(self, engine, epoch: int, failure: Exception, cancel) -> str:
        """Block until the group serves on a new communicator; returns the pause's cause.

        epoch: engine.epoch when the failed step began. cancel (anything with is_set(), or None) ends
        the wait early.

        Raises the failure itself when the group saw no loss (a device that is slow, not gone), and
        GroupUnavailableError when the group degrades or does not re-form within the bound.
        """
        group, opts = self.group, self.group.opts
        start = time.monotonic()
        grace = start + _grace_s(group)
        cause = group.reason or str(failure)
        self.paused = {"since": time.time(), "cause": cause}
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    return cause
                state = group.state
                if state != "serving":
                    cause = group.reason or cause
                    self.paused["cause"] = cause
                if state == "degraded":
                    raise GroupUnavailableError(f"the request stopped: the group cannot re-form ({group.reason})")
                if state == "serving" and engine.epoch != epoch:
                    return cause
                now = time.monotonic()
                if state == "serving" and now > grace:
                    raise failure  # no loss: the step failed for another reason, as it did before
                if now - start > opts.resume_bound_s:
                    raise GroupUnavailableError(
                        f"the request stopped: the group did not serve again within {opts.resume_bound_s:.0f}s "
                        f"after {cause}")
                time.sleep(POLL_S)
        finally:
            self.paused = None


def replay_chunk(source) -> int:
    """Rows per replay step for a model (tpi.formats.ModelSource): see the module docstring."""
    cfg = source.config
    mlp = ("w_gate_exps", "w_up_exps", "w_down_exps") if cfg.is_moe else ("w_gate", "w_up", "w_down")  # MoE: experts
    names = [layer_name(i, m) for i in range(cfg.n_layers) for m in ("wq", "wk", "wv", "wo", *mlp)]
    types = {ggml_type_info(f).name for f in map(source.weight_fmt, names) if is_ggml(f)}
    return REPACKED_CHUNK if types & REPACKED_TYPES else REPLAY_CHUNK


def replay_steps(runs: list[tuple[int, int]], chunk: int = REPLAY_CHUNK) -> list[tuple[int, int]]:
    """The steps (start, rows) that compute again what a sequence's steps `runs` (start, rows; in order,
    from position 0) computed, bit for bit: a step of more than `chunk` rows as it ran (ggml's kernels
    for its row count), the small ones (decode rows, short prompt chunks) joined into steps of up to
    `chunk` rows, whose every row ggml computes as in a one-row step; see the module docstring."""
    steps: list[tuple[int, int]] = []
    small = None  # [start, rows] of the small steps being joined
    for start, rows in runs:
        if rows > chunk:
            if small:
                steps += _split(*small, chunk)
            steps.append((start, rows))
            small = None
        elif small is None:
            small = [start, rows]
        else:
            small[1] += rows
    return steps + (_split(*small, chunk) if small else [])


def _split(start: int, rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(chunk, start + rows - s)) for s in range(start, start + rows, chunk)]


def replay(engine, seq: SequenceState, chunk: int = REPLAY_CHUNK) -> int:
    """Put seq's history but its last token into every rank's cache, as the undisturbed run computed it.

    Returns the tokens computed. Nothing is replayed before the first token: run_sequence prefills the
    prompt itself then."""
    if not seq.tokens:
        return 0
    engine.reset()
    history = seq.history()
    prompt = len(seq.prompt)
    ran = [(i, min(PREFILL_CHUNK, prompt - i)) for i in range(0, prompt, PREFILL_CHUNK)]  # engine.prefill's steps
    ran += [(p, 1) for p in range(prompt, len(history) - 1)]  # then one decode step per token
    for start, rows in replay_steps(ran, chunk):
        engine.forward(history[start : start + rows], start)
    return len(history) - 1


@contextlib.contextmanager
def _reusing_cache(engine):
    """Let the next prefill reuse the cache just replayed (the engine's lock is held)."""
    saved, engine.reuse_prefix = engine.reuse_prefix, True
    try:
        yield
    finally:
        engine.reuse_prefix = saved


def _grace_s(group) -> float:
    """How long a failed step may wait for the supervisor to notice a loss: one heartbeat timeout."""
    settings = getattr(group.link, "settings", None)
    return 1.0 + (settings.timeout_s if settings is not None else 10.0)
