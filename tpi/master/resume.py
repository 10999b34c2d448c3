"""A lost device costs a pause, not the answer: resume an interrupted sequence on the re-formed group.

When a step fails because the group lost a device (tpi.errors.GroupError from the communicator, or
GroupUnavailableError while the supervisor recovers), `Resumer.run` lets go of the engine, waits for the
group to serve again (the device rejoined from its cache, or a re-plan without it), computes the
sequence's history again and goes on sampling from the same `SequenceState`: same RNG, same text
decoder and stop filter, so the client sees a pause and then the rest of the stream.

Bit-identical replay: ggml chooses kernels by a step's row count (tpi.model.ggml_exact states the
rules): flash attention over 64 or more query rows is tiled, and over ONE query row and 512+ cache rows
it splits the cache across threads, with chunk bounds set by the step's own 256-row bucket; a matmul
takes tinyBLAS (float types), the tiled kernel (K-quants, 8+ rows) or a repacked gemm (Q4_K, 4+ rows)
where one row takes vec_dot. So `replay_steps` computes the positions that one-row steps (decode rows,
or an exact verify pass's rows) produced again in exact steps (Rows.exact: every row as its one-row
step, attention over its own n_kv), and the prompt as it was read: a step of more than `replay_chunk`
rows as it ran, smaller ones joined into steps of up to `replay_chunk` rows (the rows one matmul may
carry and keep one-row bits, per weight type; 63 below the attention tile). Then the last token runs
alone: every rank's cache and the next logits are the undisturbed run's, bit for bit, at any position
and on every weight type (tests/test_resume_replay.py, tests/test_resume_long.py), and a greedy answer
is identical. `replay_steps` states that rule over the steps a sequence ran, so a batched sequence
(tpi.master.batch, whose prompt chunks fall where the other sequences left room) replays by the same
rule as a lone one.

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
from tpi.model.ggml_exact import rows_per_call
from tpi.quant.formats import ggml_type_info, is_ggml

log = logging.getLogger(__name__)

REPLAY_CHUNK = 63  # rows per joined prompt step at most: below ggml's 64-row flash-attention tile
EXACT_CHUNK = 64  # rows per exact replay step (any count keeps one-row bits; more rows, fewer steps)
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})  # the types ggml repacks for AVX2 (CPU_REPACK), by name
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
    """Rows per joined prompt step for a model (tpi.formats.ModelSource): at most the rows one matmul on
    each of its weight types carries with one-row bits (ggml_exact.rows_per_call), and REPLAY_CHUNK."""
    cfg = source.config
    mlp = ("router", "w_gate_exps", "w_up_exps", "w_down_exps") if cfg.is_moe else ("w_gate", "w_up", "w_down")
    names = [layer_name(i, m) for i in range(cfg.n_layers) for m in ("wq", "wk", "wv", "wo", *mlp)]
    chunk = REPLAY_CHUNK
    for fmt in set(map(source.weight_fmt, names)):  # MoE: the F32 router, and experts as plain matmuls (safe)
        name = ggml_type_info(fmt).name if is_ggml(fmt) else fmt.upper()  # f32, bf16: ggml's F32, BF16
        rows = rows_per_call(name, name in REPACKED_TYPES)
        chunk = min(chunk, rows or REPLAY_CHUNK)
    return chunk


def replay_steps(runs: list[tuple[int, int]], chunk: int = REPLAY_CHUNK,
                 exact_chunk: int = EXACT_CHUNK) -> list[tuple[int, int, bool]]:
    """The steps (start, rows, exact) that compute again what a sequence's steps `runs` (start, rows; in
    order, from position 0) computed, bit for bit: the rows of one-row steps (decode rows, exact verify
    rows) in exact steps of up to `exact_chunk` rows; a step of more than `chunk` rows as it ran; the
    other small ones (short prompt chunks) joined into plain steps of up to `chunk` rows, whose every
    row ggml computes as in their own step. See the module docstring."""
    steps: list[tuple[int, int, bool]] = []
    joined = None  # [start, rows, exact] of the steps being joined
    for start, rows in runs:
        if rows > chunk and rows > 1:
            kind = None  # runs as it ran
        else:
            kind = rows == 1
        if joined is not None and joined[2] is kind:
            joined[1] += rows
            continue
        if joined is not None:
            steps += _split(*joined, exact_chunk if joined[2] else chunk)
        joined = None
        if kind is None:
            steps.append((start, rows, False))
        else:
            joined = [start, rows, kind]
    return steps + (_split(*joined, exact_chunk if joined[2] else chunk) if joined else [])


def _split(start: int, rows: int, exact: bool, chunk: int) -> list[tuple[int, int, bool]]:
    return [(s, min(chunk, start + rows - s), exact) for s in range(start, start + rows, chunk)]


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
    for start, rows, exact in replay_steps(ran, chunk):
        # an exact run is one whose every row returns logits (Rows.exact_runs)
        engine.forward(history[start : start + rows], start, all_positions=exact, exact=exact)
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
