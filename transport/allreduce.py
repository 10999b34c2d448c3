"""Communicators: the star allreduce through the master, step broadcast, gather (ring.py: the ring).

Star allreduce: each worker sends its partial in the wire dtype (f32, bf16 bits or int8
blocks); the master adds its own partial and the received ones in fp32, in rank order, and
sends the sum back in the wire dtype. With bf16 or int8 the master rounds the sum once and uses
that rounded value itself, so every rank holds bit-identical state.

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

from tpi.errors import GroupError, ProtocolError
from tpi.transport.comm import CommStats
from tpi.transport.protocol import (WIRE_DTYPES, Logits, Message, Partial, Ready, Reduced, Step, Stop, Truncate,
                                    decode, encode, header_packer)
from tpi.transport.wire import REDUCE_DTYPES, from_bf16, from_wire, to_bf16, to_wire, wire_shape

log = logging.getLogger(__name__)

_POLL_SLICE_MS = 100  # how often a waiting rank checks liveness and deadlines
# The hot paths call pyzmq's Cython methods directly: its Python wrappers of send() and
# getsockopt() (and the .rcvmore attribute) cost ~1 µs a call, a fair part of a loopback round trip.
_send = zmq.backend.cython._zmq.Socket.send  # (sock, data, flags, copy, track)
_get = zmq.backend.cython._zmq.Socket.get
_RCVMORE, _SNDMORE = zmq.RCVMORE, zmq.SNDMORE
_PARTIAL, _REDUCED = Partial.TYPE, Reduced.TYPE
_ZERO_COPY_MIN = 1 << 16  # pyzmq copies smaller frames anyway; a zero-copy Frame costs more there


def _nbytes(frames: list) -> int:
    return sum(_size(f) for f in frames)


def _size(frame) -> int:
    return len(frame) if type(frame) is bytes else frame.nbytes  # memoryview or numpy array


def _check_wire(wire_dtype: str) -> None:
    if wire_dtype not in REDUCE_DTYPES:
        raise GroupError(f"wire dtype must be one of {', '.join(REDUCE_DTYPES)}, not {wire_dtype!r}")


def _drain(sock: zmq.Socket) -> int:
    """Receive and discard the rest of a multipart message; returns how many frames it had."""
    n = 0
    while _get(sock, _RCVMORE):
        sock.recv(copy=False)
        n += 1
    return n


def _rest(sock: zmq.Socket, first: bytes, more: bool | None = None) -> list:
    """first plus the remaining frames of its message (the slow, fully validated path);
    more: whether frames follow `first` (None: ask the socket)."""
    frames = [first]
    if more is None or more:
        if more:
            frames.append(sock.recv())
        while _get(sock, _RCVMORE):
            frames.append(sock.recv())
    return frames


def _decode_rest(sock: zmq.Socket, head: bytes, more: bool | None, stats: "CommStats",
                 max_frame: int) -> Message | str:
    """Receive the rest of a message the hot path did not take and decode it in full: the
    Message, or why it is malformed. more: whether frames follow the header (None: ask)."""
    frames = _rest(sock, head, more)
    stats.bytes_received += _nbytes(frames[1:])
    try:
        return decode(frames, max_frame)
    except ProtocolError as e:
        return str(e)


def _size_error(sock: zmq.Socket, n: int, nbytes: int, more: bool = True) -> str:
    """Why a buffer received for a matching header is wrong (and drop the rest of its message)."""
    extra = _drain(sock) if more else 0
    return (f"buffer of {n} bytes where its header needs {nbytes}" if n != nbytes
            else f"{extra} buffer frame(s) more than its header lists")


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
        _check_wire(wire_dtype)
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
                _drain(sock)
                log.warning("dropped data message from unknown peer id %r", rid[:16])
                return None, None
            if not _get(sock, _RCVMORE):  # a DEALER cannot send zero frames, but do not trust that
                self._dropped(rank, "empty message")
                return None, None
            head = sock.recv()
            self.stats.bytes_received += len(head)
            return rank, head

    def _finish(self, rank: int, head: bytes, more: bool | None = None) -> Message | None:
        """The rest of a message decoded in full (see _decode_rest); None, logged, if malformed."""
        msg = _decode_rest(self._sock, head, more, self.stats, self._max_frame)
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
                    self._dropped(rank, f"Partial {_size_error(sock, n, nbytes, data.more)}")
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
            _drain(self._sock)
            log.warning("dropped data message from unknown peer id %r", rid[:16])
            return None
        if head is None:  # a rank not waited for (a duplicate), or a message of nothing but its id
            if not _get(self._sock, _RCVMORE):
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
        size = _nbytes(frames)
        sock, last = self._sock, len(frames) - 1
        for rank, rid in enumerate(self._ids, start=1):
            if rid.decode() in lost:
                continue
            try:
                sock.send(rid, zmq.SNDMORE)  # ROUTER_MANDATORY: raises here for a vanished peer
                for i, f in enumerate(frames):
                    sock.send(f, zmq.SNDMORE if i < last else 0, copy=_size(f) < _ZERO_COPY_MIN)
            except zmq.ZMQError as e:
                reason = self._lost().get(rid.decode(), str(e))
                if best_effort:
                    log.debug("could not reach %s (rank %d): %s", self._names[rank], rank, reason)
                    continue
                raise GroupError(f"device {self._names[rank]} (rank {rank}) is unreachable: {reason}") from e
            self.stats.bytes_sent += size

    def _send_sum(self, head: bytes, wire: np.ndarray) -> None:
        sock, copy = self._sock, wire.nbytes < _ZERO_COPY_MIN
        try:
            for rid in self._ids:  # ROUTER_MANDATORY: the id's send raises for a vanished peer
                _send(sock, rid, _SNDMORE, True, False)
                _send(sock, head, _SNDMORE, True, False)
                _send(sock, wire, 0, copy, False)
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
        part_head, sum_head = header(_PARTIAL, seq, [op], descs), header(_REDUCED, seq, [op], descs)
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
        self._send_sum(sum_head, wire)
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


class StarWorker:
    """Rank > 0: owns its data DEALER; receives steps, sends partials, receives sums."""

    def __init__(self, sock: zmq.Socket, rank: int, world: int, wire_dtype: str,
                 master_lost: Callable[[], str | None], step_timeout_s: float, max_frame: int):
        _check_wire(wire_dtype)
        self._sock = sock
        sock.rcvtimeo = _POLL_SLICE_MS
        self.rank, self.world, self.wire_dtype = rank, world, wire_dtype
        self._master_lost = master_lost
        self._step_timeout_s = step_timeout_s
        self._max_frame = max_frame
        self._seq = 0
        self._op = 0
        self._held: Message | None = None  # a control that arrived while a step was running
        self._bufs: dict[int, tuple] = {}  # sum bytes -> (receive buffer, its typed view) for bf16/int8
        self._header = header_packer()
        self._next_part: tuple = (None, b"")  # (seq, op, wire, shape) -> its Partial header, packed early
        self.stats = CommStats()

    def announce_ready(self) -> None:
        """Tell the master this rank is connected and loaded."""
        self._send(encode(Ready()))

    def _send(self, frames: list) -> None:
        self._sock.send_multipart(frames, copy=False)
        self.stats.bytes_sent += _nbytes(frames)

    def _next(self, what: str) -> bytes:
        """The header frame of the next message; raises GroupError when the master is lost."""
        while True:
            try:
                head = self._sock.recv()
            except zmq.Again:  # RCVTIMEO slice passed: is the master still alive?
                self._check_master(what, None)
                continue
            self.stats.bytes_received += len(head)
            return head

    def _finish(self, head: bytes, more: bool | None = None) -> Message | None:
        """The rest of a message decoded in full (see _decode_rest); None, logged, if malformed."""
        msg = _decode_rest(self._sock, head, more, self.stats, self._max_frame)
        if isinstance(msg, str):
            log.warning("dropped malformed data message from the master: %s", msg)
            return None
        return msg

    def _recv(self, what: str) -> Message:
        while True:
            msg = self._finish(self._next(what))
            if msg is not None:
                return msg

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Send my partial, return the group's sum (identical bits on every rank)."""
        t0 = time.perf_counter()
        self._op += 1
        sock, wire_dtype, seq, op = self._sock, self.wire_dtype, self._seq, self._op
        f32 = wire_dtype == "f32"
        payload = np.ascontiguousarray(x, np.float32) if f32 else to_wire(x, wire_dtype)
        nbytes = payload.nbytes
        key = (seq, op, wire_dtype, payload.shape)
        part_head = self._next_part[1] if self._next_part[0] == key else None
        if part_head is None:
            part_head = self._header(_PARTIAL, seq, [op], [[wire_dtype, list(payload.shape)]])
        _send(sock, part_head, _SNDMORE, True, False)
        _send(sock, payload, 0, nbytes < _ZERO_COPY_MIN, False)
        # While the partial travels: what the sum will look like, where it lands (f32 sums in the
        # array returned; bf16/int8 ones in a reused buffer, then widened), and the header of the
        # next allreduce's partial if it has the same shape (the usual case: 2 per layer).
        descs = [[wire_dtype, list(payload.shape)]]
        sum_head = self._header(_REDUCED, seq, [op], descs)
        self._next_part = ((seq, op + 1, wire_dtype, payload.shape), self._header(_PARTIAL, seq, [op + 1], descs))
        if f32:
            buf = np.empty(nbytes, np.uint8)
            typed = buf.view(np.float32).reshape(x.shape)
        else:
            buf, typed = self._bufs.get(nbytes) or (None, None)
            if buf is None:
                buf = np.empty(nbytes, np.uint8)
                typed = buf.view(payload.dtype).reshape(payload.shape)
                self._bufs[nbytes] = (buf, typed)
        stats = self.stats
        stats.bytes_sent += len(part_head) + nbytes
        while True:  # written out, no helper calls: each step sits between the master's send and us
            try:
                frame = sock.recv(copy=False)  # a Frame: its `more` flag costs no getsockopt
            except zmq.Again:  # RCVTIMEO slice passed: is the master still alive?
                self._check_master(f"the sum of allreduce {op}", t0)
                continue
            head = frame.bytes
            if frame.more and head == sum_head:  # the hot path
                n = sock.recv_into(buf)
                stats.bytes_received += len(head) + n
                if n == nbytes and not _get(sock, _RCVMORE):
                    out = typed if f32 else from_wire(typed)
                    break
                log.warning("dropped malformed data message from the master: Reduced %s",
                            _size_error(sock, n, nbytes))
                continue
            stats.bytes_received += len(head)
            msg = self._finish(head, frame.more)
            if isinstance(msg, Reduced) and msg.op == op and msg.seq == seq:
                if msg.x.dtype != payload.dtype or msg.x.shape != payload.shape:
                    raise GroupError(f"the master sent a {msg.x.dtype} sum of shape {msg.x.shape} for a "
                                     f"{payload.dtype} partial of shape {payload.shape}: versions differ?")
                out = from_wire(msg.x.copy())  # valid, though not encoded as this side would
                break
            if isinstance(msg, (Step, Truncate, Stop)):
                # The master gave up on this step (a device was lost) and moved on: keep the
                # control for the next recv_step() and fail this step.
                self._held = msg
                raise GroupError(f"the master abandoned step {seq} during allreduce {op} "
                                 f"and sent {type(msg).__name__}; call recv_step() to follow it")
            if msg is not None:
                log.debug("dropped stale %s during allreduce", type(msg).__name__)
        stats.allreduce_count += 1
        stats.allreduce_seconds += time.perf_counter() - t0
        return out if f32 else out.reshape(np.shape(x))

    def _check_master(self, what: str, since: float | None) -> None:
        """GroupError when the master is lost, or silent for step_timeout_s since `since` (perf_counter)."""
        lost = self._master_lost()
        if lost:
            raise GroupError(f"lost the master while waiting for {what}: {lost}")
        if since is not None and time.perf_counter() - since > self._step_timeout_s:
            raise GroupError(f"the master sent no {what} within {self._step_timeout_s:.0f}s")

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
            msg, self._held = (self._held, None) if self._held is not None else (self._recv("step"), None)
            if isinstance(msg, Step):
                self._seq, self._op = msg.seq, 0
                self.stats.steps += 1
                return msg
            if isinstance(msg, (Truncate, Stop)):
                return msg
            log.debug("dropped stale %s while waiting for a step", type(msg).__name__)
