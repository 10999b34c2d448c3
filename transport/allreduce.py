"""Rank 0's end of the star: allreduce through the master, step broadcast, gather (star_worker.py: ranks > 0;
star_frames.py: the frame helpers both ends share; ring.py: the ring).

Star allreduce: each worker sends its partial in the wire dtype (f32, bf16 bits or int8
blocks); the master adds its own partial and the received ones in fp32, in rank order, and
sends the sum back in the wire dtype. With bf16 or int8 the master rounds the sum once and uses
that rounded value itself, so every rank holds bit-identical state.

Two ranks with the f32 wire swap partials instead (star_frames.exchange): each posts its partial
the moment it has it and adds the two itself, master's first (x0 + x1, the star's own sum, so the
same bits on both ranks): the worker waits one hop for its sum instead of two. The messages and
bytes are the star's; the master's Partial goes where its Reduced went.

Hot path: both ends know the exact header of the message they await (version, type, step,
op, dtype, shape), so a received header is validated by one byte comparison and its buffer
is received straight into a preallocated array (`recv_into`), checked for its exact size.
Anything else takes the full `protocol.decode` path, which validates every field.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import zmq

from tpi.errors import GroupError
from tpi.transport.comm import CommStats
from tpi.transport.protocol import (WIRE_DTYPES, Logits, Message, Partial, Ready, Step, Stop, Truncate, encode,
                                    header_packer)
from tpi.transport.star_frames import (PARTIAL, POLL_SLICE_MS, RCVMORE, REDUCED, SNDMORE, ZERO_COPY_MIN, check_wire,
                                       decode_rest, drain, exchange, frame_size, frames_nbytes, size_error, zget,
                                       zsend)
from tpi.transport.wire import from_wire, to_wire, wire_shape

log = logging.getLogger(__name__)


class StarMaster:
    """Rank 0: owns the data ROUTER; broadcasts steps, reduces partials, gathers slices."""

    rank = 0

    def __init__(self, sock: zmq.Socket, peer_ids: list[str], names: list[str], wire_dtype: str,
                 lost: Callable[[], dict[str, str]], step_timeout_s: float, max_frame: int, first_seq: int = 0,
                 star_only: bool = False):
        """first_seq: the step number of the communicator this one replaces (a regrouped group), so
        a worker's late message from an abandoned step can never match a new step."""
        check_wire(wire_dtype)
        self._sock = sock
        sock.rcvtimeo = POLL_SLICE_MS
        self._ids = [p.encode() for p in peer_ids]  # index i -> rank i + 1
        self._rank_of = {rid: i + 1 for i, rid in enumerate(self._ids)}
        self._names = ["master", *names]
        self.world = len(peer_ids) + 1
        self.wire_dtype = wire_dtype
        self.star_only = star_only  # sent to every worker in its Assign
        self._lost = lost
        self._step_timeout_s = step_timeout_s
        self._max_frame = max_frame
        self._seq = first_seq
        self._op = 0
        self._header = header_packer()
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

    # ---- receiving ----

    def _next(self, waiting: set[int], deadline: float, what: str) -> tuple[int | None, bytes | None]:
        """(rank, header frame) of the next message; rank None (dropped) for an unknown peer."""
        sock = self._sock
        while True:
            try:
                rid = sock.recv()
            except zmq.Again:  # RCVTIMEO slice passed: is everyone we wait for still alive?
                self._check_alive(waiting, deadline, what)
                continue
            rank = self._rank_of.get(rid)
            self.stats.bytes_received += len(rid)
            if rank is None:
                drain(sock)
                log.warning("dropped data message from unknown peer id %r", rid[:16])
                return None, None
            if not zget(sock, RCVMORE):  # a DEALER cannot send zero frames, but do not trust that
                self._dropped(rank, "empty message")
                return None, None
            head = sock.recv()
            self.stats.bytes_received += len(head)
            return rank, head

    def _finish(self, rank: int, head: bytes, more: bool | None = None) -> Message | None:
        """The rest of a message decoded in full (see decode_rest); None, logged, if malformed."""
        msg = decode_rest(self._sock, head, more, self.stats, self._max_frame)
        if isinstance(msg, str):
            self._dropped(rank, msg)
            return None
        return msg

    def _dropped(self, rank: int, why: str) -> None:
        log.warning("dropped malformed data message from %s: %s", self._names[rank], why)

    def _recv(self, waiting: set[int], deadline: float, what: str) -> tuple[int, Message]:
        """Next valid message from a rank in the group; raises GroupError on loss/timeout."""
        while True:
            rank, head = self._next(waiting, deadline, what)
            msg = None if rank is None else self._finish(rank, head)
            if msg is not None:
                return rank, msg

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

    def _collect_partials(self, head: bytes, dtype: np.dtype, shape: tuple) -> list[np.ndarray | None]:
        """Every worker's partial for the current op: header compared, buffer taken without a copy.

        Frames are received as zmq Frames: their `more` flag costs no getsockopt, and a partial
        is read in place (np.frombuffer over the received message). The loop is written out (no
        helper calls) because every step of it sits between a worker's send and its sum;
        anything unexpected goes to `_slow_partial`.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        parts: list[np.ndarray | None] = [None] * self.world
        waiting = set(range(1, self.world))
        deadline = time.monotonic() + self._step_timeout_s
        sock, rank_of, stats = self._sock, self._rank_of, self.stats
        while waiting:
            try:
                first = sock.recv(copy=False)
            except zmq.Again:  # RCVTIMEO slice passed: is everyone we wait for still alive?
                self._check_alive(waiting, deadline, "partial")
                continue
            rid = first.bytes
            rank = rank_of.get(rid)
            h = sock.recv(copy=False) if rank in waiting and first.more else None
            if h is not None and h.more and h.bytes == head:  # the hot path
                data = sock.recv(copy=False)
                n = len(data)
                stats.bytes_received += len(rid) + len(head) + n
                if n == nbytes and not data.more:
                    parts[rank] = np.frombuffer(data, dtype).reshape(shape)  # read-only, in place
                    waiting.discard(rank)
                else:
                    self._dropped(rank, f"Partial {size_error(sock, n, nbytes, data.more)}")
                continue
            got = self._slow_partial(rid, rank, h.bytes if h is not None else None, h is not None and h.more)
            if got is not None and rank in waiting:
                parts[rank] = got
                waiting.discard(rank)
        return parts

    def _slow_partial(self, rid: bytes, rank: int | None, head: bytes | None, more: bool) -> np.ndarray | None:
        """A message the hot path did not take (head: its header if received, more: frames follow it):
        decoded in full; the partial's array if it is the awaited one (valid, though not encoded
        as this side would: another msgpack), else None."""
        self.stats.bytes_received += len(rid) + (len(head) if head is not None else 0)
        if rank is None:
            drain(self._sock)
            log.warning("dropped data message from unknown peer id %r", rid[:16])
            return None
        if head is None:  # a rank not waited for (a duplicate), or a message of nothing but its id
            if not zget(self._sock, RCVMORE):
                self._dropped(rank, "empty message")
                return None
            head, more = self._sock.recv(), None
            self.stats.bytes_received += len(head)
        msg = self._finish(rank, head, more)
        if type(msg) is Partial and msg.op == self._op and msg.seq == self._seq:
            return msg.x
        if msg is not None:
            log.debug("dropped stale %s from rank %d", type(msg).__name__, rank)
        return None

    # ---- sending ----

    def _send_all(self, frames: list, best_effort: bool = False) -> None:
        """Send to every worker; best_effort skips lost or unreachable ones instead of raising."""
        lost = self._lost() if best_effort else {}
        size = frames_nbytes(frames)
        sock, last = self._sock, len(frames) - 1
        for rank, rid in enumerate(self._ids, start=1):
            if rid.decode() in lost:
                continue
            try:
                sock.send(rid, zmq.SNDMORE)  # ROUTER_MANDATORY: raises here for a vanished peer
                for i, f in enumerate(frames):
                    sock.send(f, zmq.SNDMORE if i < last else 0, copy=frame_size(f) < ZERO_COPY_MIN)
            except zmq.ZMQError as e:
                reason = self._lost().get(rid.decode(), str(e))
                if best_effort:
                    log.debug("could not reach %s (rank %d): %s", self._names[rank], rank, reason)
                    continue
                raise GroupError(f"device {self._names[rank]} (rank {rank}) is unreachable: {reason}") from e
            self.stats.bytes_sent += size

    def _send_sum(self, head: bytes, wire: np.ndarray, copy: bool = False) -> None:
        """head + wire to every worker; copy: always copy wire (the caller reuses its buffer)."""
        sock, copy = self._sock, copy or wire.nbytes < ZERO_COPY_MIN
        try:
            for rid in self._ids:  # ROUTER_MANDATORY: the id's send raises for a vanished peer
                zsend(sock, rid, SNDMORE, True, False)
                zsend(sock, head, SNDMORE, True, False)
                zsend(sock, wire, 0, copy, False)
        except zmq.ZMQError:
            self._send_all([head, wire])  # the slow way, which names the device that is gone
            return
        self.stats.bytes_sent += len(self._ids) * (len(head) + wire.nbytes)

    # ---- the communicator API ----

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Sum x over all ranks (fp32); with a bf16 or int8 wire the sum is rounded on every rank."""
        t0 = time.perf_counter()
        self._op += 1
        wire_dtype, seq, op, header = self.wire_dtype, self._seq, self._op, self._header
        f32 = wire_dtype == "f32"
        shape = x.shape if f32 else wire_shape(x.shape, wire_dtype)
        descs = [[wire_dtype, list(shape)]]
        part_head = header(PARTIAL, seq, [op], descs)
        swap = exchange(self.world, wire_dtype, self.star_only)
        if swap:  # my partial goes out now (copied: x is a graph's output buffer, reused by the next graph)
            x = np.ascontiguousarray(x, np.float32)
            self._send_sum(part_head, x, copy=True)
        parts = self._collect_partials(part_head, WIRE_DTYPES[wire_dtype], shape)
        acc = None
        for rank in range(1, self.world):
            part = parts[rank] if f32 else from_wire(parts[rank])
            if part.shape != x.shape:
                raise GroupError(f"device {self._names[rank]} sent a partial of shape {part.shape}, "
                                 f"expected {x.shape}: the group disagrees on the plan")
            if acc is None:  # fp32, rank order: ((x0 + x1) + x2) + ...
                acc = np.add(x, part, dtype=np.float32)
            else:
                acc += part
        if acc is None:
            acc = np.array(x, dtype=np.float32)
        wire = acc if f32 else to_wire(acc, wire_dtype)
        if not swap:
            self._send_sum(header(REDUCED, seq, [op], descs), wire)
        out = acc if f32 else from_wire(wire)
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
        return [from_wire(p) for p in parts]
