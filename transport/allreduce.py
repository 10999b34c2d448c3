"""Communicators: the star allreduce through the master, step broadcast, gather; ring for benchmarks.

Star allreduce: each worker sends its partial (f32, or bf16 bits when the wire dtype is bf16);
the master adds its own partial and the received ones in fp32, in rank order, and sends the
sum back. With bf16 the master rounds the sum to bf16 once and uses that rounded value
itself, so every rank holds bit-identical state.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import zmq

from tpi.errors import GroupError, ProtocolError
from tpi.transport.comm import CommStats
from tpi.transport.protocol import (REDUCE_DTYPES, Logits, Message, Partial, Ready, Reduced, Step, Stop, Truncate,
                                    decode, encode, from_bf16, to_bf16)

log = logging.getLogger(__name__)

_POLL_SLICE_MS = 100  # how often a waiting rank checks liveness and deadlines


def _nbytes(frames: list) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def _to_wire(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    return to_bf16(x) if wire_dtype == "bf16" else np.ascontiguousarray(x, dtype=np.float32)


def _from_wire(x: np.ndarray) -> np.ndarray:
    return from_bf16(x) if x.dtype == np.uint16 else x


def _exact_bf16_or_self(x: np.ndarray) -> np.ndarray:
    """bf16 bits of float32 x when that loses nothing (low 16 bits all zero), else x itself."""
    x = np.ascontiguousarray(x)
    if x.dtype != np.float32 or x.size == 0:
        return x
    bits = x.view(np.uint32)
    if np.bitwise_and(bits, 0xFFFF).any():
        return x
    return np.right_shift(bits, 16).astype(np.uint16)


class StarMaster:
    """Rank 0: owns the data ROUTER; broadcasts steps, reduces partials, gathers slices."""

    rank = 0

    def __init__(self, sock: zmq.Socket, peer_ids: list[str], names: list[str], wire_dtype: str,
                 lost: Callable[[], dict[str, str]], step_timeout_s: float, max_frame: int, first_seq: int = 0):
        """first_seq: the step number of the communicator this one replaces (a regrouped group), so
        a worker's late message from an abandoned step can never match a new step."""
        if wire_dtype not in REDUCE_DTYPES:
            raise GroupError(f"wire dtype must be f32 or bf16, not {wire_dtype!r}")
        self._sock = sock
        sock.rcvtimeo = _POLL_SLICE_MS
        self._ids = [p.encode() for p in peer_ids]  # index i -> rank i + 1
        self._rank_of = {rid: i + 1 for i, rid in enumerate(self._ids)}
        self._names = ["master", *names]
        self.world = len(peer_ids) + 1
        self.wire_dtype = wire_dtype
        self._lost = lost
        self._step_timeout_s = step_timeout_s
        self._max_frame = max_frame
        self._seq = first_seq
        self._op = 0
        self.stats = CommStats()

    @property
    def seq(self) -> int:
        """The number of the last step broadcast."""
        return self._seq

    def wait_ready(self, timeout_s: float, ranks: set[int] | None = None) -> None:
        """Block until every worker (or those in ranks) announced Ready on the data channel."""
        waiting = set(range(1, self.world)) if ranks is None else set(ranks)
        deadline = time.monotonic() + timeout_s
        while waiting:
            rank, msg = self._recv(waiting, deadline, "the ready signal")
            if isinstance(msg, Ready):
                waiting.discard(rank)

    # ---- hot path ----

    def _recv(self, waiting: set[int], deadline: float, what: str) -> tuple[int, Message]:
        """Next valid message from a rank in the group; raises GroupError on loss/timeout."""
        while True:
            try:
                frames = self._sock.recv_multipart()
            except zmq.Again:  # RCVTIMEO slice passed: is everyone we wait for still alive?
                self._check_alive(waiting, deadline, what)
                continue
            self.stats.bytes_received += _nbytes(frames)
            rank = self._rank_of.get(frames[0])
            if rank is None:
                log.warning("dropped data message from unknown peer id %r", frames[0][:16])
                continue
            try:
                return rank, decode(frames[1:], self._max_frame)
            except ProtocolError as e:
                log.warning("dropped malformed data message from %s: %s", self._names[rank], e)

    def _check_alive(self, waiting: set[int], deadline: float, what: str) -> None:
        lost = self._lost()
        for rank in sorted(waiting):
            reason = lost.get(self._ids[rank - 1].decode())
            if reason:
                raise GroupError(f"device {self._names[rank]} (rank {rank}) was lost while the master "
                                 f"waited for {what}: {reason}")
        if time.monotonic() > deadline:
            names = ", ".join(self._names[r] for r in sorted(waiting))
            raise GroupError(f"device(s) {names} sent no {what} within {self._step_timeout_s:.0f}s "
                             "though still alive; they may be overloaded or stuck")

    def _send_all(self, frames: list, best_effort: bool = False) -> None:
        """Send to every worker; best_effort skips lost or unreachable ones instead of raising."""
        lost = self._lost() if best_effort else {}
        size = _nbytes(frames)
        for rank, rid in enumerate(self._ids, start=1):
            if rid.decode() in lost:
                continue
            try:
                self._sock.send_multipart([rid, *frames], copy=False)
            except zmq.ZMQError as e:
                reason = self._lost().get(rid.decode(), str(e))
                if best_effort:
                    log.debug("could not reach %s (rank %d): %s", self._names[rank], rank, reason)
                    continue
                raise GroupError(f"device {self._names[rank]} (rank {rank}) is unreachable: {reason}") from e
            self.stats.bytes_sent += size

    def _collect(self, op: int, kind: type, what: str) -> list[np.ndarray | None]:
        parts: list[np.ndarray | None] = [None] * self.world
        waiting = set(range(1, self.world))
        deadline = time.monotonic() + self._step_timeout_s
        while waiting:
            rank, msg = self._recv(waiting, deadline, what)
            if type(msg) is kind and msg.op == op and msg.seq == self._seq and rank in waiting:
                parts[rank] = msg.x
                waiting.discard(rank)
            else:
                log.debug("dropped stale %s from rank %d", type(msg).__name__, rank)
        return parts

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Sum x over all ranks (fp32); with bf16 wire the sum is bf16-rounded on every rank."""
        t0 = time.perf_counter()
        self._op += 1
        parts = self._collect(self._op, Partial, "partial")
        acc = None
        for rank in range(1, self.world):
            part = _from_wire(parts[rank])
            if part.shape != x.shape:
                raise GroupError(f"device {self._names[rank]} sent a partial of shape {part.shape}, "
                                 f"expected {x.shape}: the group disagrees on the plan")
            if acc is None:  # fp32, rank order: ((x0 + x1) + x2) + ...
                acc = np.add(x, part, dtype=np.float32)
            else:
                acc += part
        if acc is None:
            acc = np.array(x, dtype=np.float32)
        wire = _to_wire(acc, self.wire_dtype)
        self._send_all(encode(Reduced(self._op, wire, self._seq)))
        out = from_bf16(wire) if self.wire_dtype == "bf16" else acc
        self.stats.allreduce_count += 1
        self.stats.allreduce_seconds += time.perf_counter() - t0
        return out

    def broadcast_step(self, step: Step) -> None:
        """Start a step on every worker (numbered here: replies of an abandoned step never match it)."""
        self._seq += 1
        self._op = 0
        self._send_all(encode(replace(step, x=np.ascontiguousarray(step.x), seq=self._seq)))
        self.stats.steps += 1

    def broadcast_truncate(self, slot: int, keep: int) -> None:
        """Tell every reachable worker to forget positions keep.. of a KV slot (lost ones are skipped)."""
        self._send_all(encode(Truncate(slot, keep)), best_effort=True)

    def broadcast_stop(self, reason: str, rejoin: bool = False) -> None:
        """Tell every reachable worker to leave its step loop, and to join again with rejoin (lost ones are skipped)."""
        self._send_all(encode(Stop(reason, rejoin)), best_effort=True)

    def gather(self, x: np.ndarray) -> list[np.ndarray]:
        """All ranks' arrays in rank order."""
        self._op += 1
        parts = self._collect(self._op, Logits, "gather slice")
        parts[0] = x
        self.stats.gather_count += 1
        return [_from_wire(p) for p in parts]


class StarWorker:
    """Rank > 0: owns its data DEALER; receives steps, sends partials, receives sums."""

    def __init__(self, sock: zmq.Socket, rank: int, world: int, wire_dtype: str,
                 master_lost: Callable[[], str | None], step_timeout_s: float, max_frame: int):
        self._sock = sock
        sock.rcvtimeo = _POLL_SLICE_MS
        self.rank, self.world, self.wire_dtype = rank, world, wire_dtype
        self._master_lost = master_lost
        self._step_timeout_s = step_timeout_s
        self._max_frame = max_frame
        self._seq = 0
        self._op = 0
        self._held: Message | None = None  # a control that arrived while a step was running
        self.stats = CommStats()

    def announce_ready(self) -> None:
        """Tell the master this rank is connected and loaded."""
        self._send(encode(Ready()))

    def _send(self, frames: list) -> None:
        self._sock.send_multipart(frames, copy=False)
        self.stats.bytes_sent += _nbytes(frames)

    def _recv(self, what: str, deadline: float | None) -> Message:
        while True:
            try:
                frames = self._sock.recv_multipart()
            except zmq.Again:  # RCVTIMEO slice passed: is the master still alive?
                lost = self._master_lost()
                if lost:
                    raise GroupError(f"lost the master while waiting for {what}: {lost}")
                if deadline is not None and time.monotonic() > deadline:
                    raise GroupError(f"the master sent no {what} within {self._step_timeout_s:.0f}s")
                continue
            self.stats.bytes_received += _nbytes(frames)
            try:
                return decode(frames, self._max_frame)
            except ProtocolError as e:
                log.warning("dropped malformed data message from the master: %s", e)

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Send my partial, return the group's sum (identical bits on every rank)."""
        t0 = time.perf_counter()
        self._op += 1
        self._send(encode(Partial(self._op, _to_wire(x, self.wire_dtype), self._seq)))
        deadline = time.monotonic() + self._step_timeout_s
        while True:
            msg = self._recv(f"sum for allreduce {self._op}", deadline)
            if isinstance(msg, Reduced) and msg.op == self._op and msg.seq == self._seq:
                break
            if isinstance(msg, (Step, Truncate, Stop)):
                # The master gave up on this step (a device was lost) and moved on: keep the
                # control for the next recv_step() and fail this step.
                self._held = msg
                raise GroupError(f"the master abandoned step {self._seq} during allreduce {self._op} "
                                 f"and sent {type(msg).__name__}; call recv_step() to follow it")
            log.debug("dropped stale %s during allreduce", type(msg).__name__)
        out = from_bf16(msg.x) if msg.x.dtype == np.uint16 else msg.x.copy()
        self.stats.allreduce_count += 1
        self.stats.allreduce_seconds += time.perf_counter() - t0
        return out

    def gather(self, x: np.ndarray) -> None:
        """Send my slice to the master; workers get None.

        An fp32 slice whose every value is exactly a bf16 number (logits straight out of a torch
        output kernel) goes as bf16 bits: half the bytes, the same values.
        """
        self._op += 1
        wire = _exact_bf16_or_self(x)
        self._send(encode(Logits(self._op, wire, self._seq)))
        self.stats.gather_count += 1
        return None

    def recv_step(self) -> Step | Truncate | Stop:
        """Wait for the master's next control: a Step to compute, a Truncate, or a Stop."""
        while True:
            msg, self._held = (self._held, None) if self._held is not None else (self._recv("step", None), None)
            if isinstance(msg, Step):
                self._seq, self._op = msg.seq, 0
                self.stats.steps += 1
                return msg
            if isinstance(msg, (Truncate, Stop)):
                return msg
            log.debug("dropped stale %s while waiting for a step", type(msg).__name__)


class RingAllreduce:
    """Ring allreduce (reduce-scatter + allgather) over DEALER->ROUTER links; benchmarks only.

    Each rank binds endpoints[rank] and sends to its right neighbour. It needs 2(N-1)
    sequential hops per call, against the star's 2, which is why tpi does not use it.
    """

    def __init__(self, rank: int, world: int, endpoints: list[str], wire_dtype: str = "f32",
                 timeout_s: float = 30.0, max_frame: int = 256 << 20):
        self.rank, self.world, self.wire_dtype = rank, world, wire_dtype
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.ROUTER)
        self._inbox.linger = 0
        self._inbox.rcvtimeo = int(timeout_s * 1000)
        self._inbox.bind(endpoints[rank])
        self._right = self._ctx.socket(zmq.DEALER)
        self._right.linger = 0
        self._right.connect(endpoints[(rank + 1) % world])
        self._timeout_s, self._max_frame = timeout_s, max_frame
        self._op = 0
        self.stats = CommStats()

    def _hop(self, kind: type, step: int, send: np.ndarray) -> np.ndarray:
        self._right.send_multipart(encode(kind(self._op, _to_wire(send, self.wire_dtype), step)), copy=False)
        try:
            frames = self._inbox.recv_multipart()
        except zmq.Again as e:
            left = (self.rank - 1) % self.world
            raise GroupError(f"ring rank {left} sent nothing for {self._timeout_s:.0f}s") from e
        msg = decode(frames[1:], self._max_frame)
        if type(msg) is not kind or msg.op != self._op or msg.seq != step:
            raise GroupError(f"ring out of step: got {type(msg).__name__} op {msg.op} hop {msg.seq}")
        return _from_wire(msg.x)

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        self._op += 1
        n, r = self.world, self.rank
        flat = np.array(x, dtype=np.float32, copy=True).reshape(-1)
        bounds = np.linspace(0, flat.size, n + 1).astype(int)
        chunks = [flat[bounds[i]:bounds[i + 1]] for i in range(n)]  # views into flat
        for step in range(n - 1):  # reduce-scatter: afterwards rank r owns chunk r+1
            chunks[(r - step - 1) % n] += self._hop(Partial, step, chunks[(r - step) % n])
        own = chunks[(r + 1) % n]
        if self.wire_dtype == "bf16":
            own[:] = from_bf16(to_bf16(own))  # round once at the owner so every rank agrees
        for step in range(n - 1):  # allgather
            chunks[(r - step) % n][:] = self._hop(Reduced, step, chunks[(r + 1 - step) % n])
        self.stats.allreduce_count += 1
        self.stats.allreduce_seconds += time.perf_counter() - t0
        return flat.reshape(np.shape(x))

    def close(self) -> None:
        self._inbox.close(0)
        self._right.close(0)
        self._ctx.term()
