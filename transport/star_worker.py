"""Rank > 0's end of the star: steps in, partials out, sums back (allreduce.py explains the star and
the two-rank swap)."""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import zmq

from tpi.errors import GroupError
from tpi.transport.comm import CommStats
from tpi.transport.protocol import (Logits, Message, Partial, Ready, Reduced, Step, Stop, Truncate, encode,
                                    header_packer)
from tpi.transport.star_frames import (PARTIAL, POLL_SLICE_MS, RCVMORE, REDUCED, SNDMORE, ZERO_COPY_MIN, check_wire,
                                       decode_rest, exact_bf16_or_self, exchange, frames_nbytes, size_error, zget,
                                       zsend)
from tpi.transport.wire import from_wire, to_wire

log = logging.getLogger(__name__)


class StarWorker:
    """Rank > 0: owns its data DEALER; receives steps, sends partials, receives sums."""

    def __init__(self, sock: zmq.Socket, rank: int, world: int, wire_dtype: str,
                 master_lost: Callable[[], str | None], step_timeout_s: float, max_frame: int,
                 star_only: bool = False):
        check_wire(wire_dtype)
        self._sock = sock
        sock.rcvtimeo = POLL_SLICE_MS
        self.rank, self.world, self.wire_dtype = rank, world, wire_dtype
        self.star_only = star_only  # as the master's Assign says: both ends must agree on the swap
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
        self.stats.bytes_sent += frames_nbytes(frames)

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
        """The rest of a message decoded in full (see decode_rest); None, logged, if malformed."""
        msg = decode_rest(self._sock, head, more, self.stats, self._max_frame)
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
            part_head = self._header(PARTIAL, seq, [op], [[wire_dtype, list(payload.shape)]])
        swap = exchange(self.world, wire_dtype, self.star_only)  # then the master's partial comes back, not the sum
        zsend(sock, part_head, SNDMORE, True, False)
        # copied when swapping: the master's partial may be here before mine has left, and x is a
        # graph's output buffer, which the next graph reuses
        zsend(sock, payload, 0, swap or nbytes < ZERO_COPY_MIN, False)
        # While the partial travels: what the sum will look like, where it lands (f32 sums in the
        # array returned; bf16/int8 ones in a reused buffer, then widened), and the header of the
        # next allreduce's partial if it has the same shape (the usual case: 2 per layer).
        descs = [[wire_dtype, list(payload.shape)]]
        sum_head = part_head if swap else self._header(REDUCED, seq, [op], descs)
        kind = Partial if swap else Reduced
        self._next_part = ((seq, op + 1, wire_dtype, payload.shape), self._header(PARTIAL, seq, [op + 1], descs))
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
                if n == nbytes and not zget(sock, RCVMORE):  # swap: master's + mine, the star's order
                    out = np.add(typed, payload, out=typed) if swap else typed if f32 else from_wire(typed)
                    break
                log.warning("dropped malformed data message from the master: %s %s", kind.__name__,
                            size_error(sock, n, nbytes))
                continue
            stats.bytes_received += len(head)
            msg = self._finish(head, frame.more)
            if type(msg) is kind and msg.op == op and msg.seq == seq:
                if msg.x.dtype != payload.dtype or msg.x.shape != payload.shape:
                    raise GroupError(f"the master sent a {msg.x.dtype} {kind.__name__} of shape {msg.x.shape} for "
                                     f"a {payload.dtype} partial of shape {payload.shape}: versions differ?")
                # valid, though not encoded as this side would
                out = np.add(msg.x, payload) if swap else from_wire(msg.x.copy())
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
        wire = exact_bf16_or_self(x)
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
