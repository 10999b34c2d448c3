"""The star's hot-path frame helpers, shared by both ends (allreduce.py: rank 0; star_worker.py: ranks > 0)."""
from __future__ import annotations

import os

import numpy as np
import zmq

from tpi.errors import GroupError, ProtocolError
from tpi.transport.comm import CommStats
from tpi.transport.protocol import Message, Partial, Reduced, decode
from tpi.transport.wire import REDUCE_DTYPES

POLL_SLICE_MS = 100  # how often a waiting rank checks liveness and deadlines
# The hot paths call pyzmq's Cython methods directly: its Python wrappers of send() and
# getsockopt() (and the .rcvmore attribute) cost ~1 µs a call, a fair part of a loopback round trip.
zsend = zmq.backend.cython._zmq.Socket.send  # (sock, data, flags, copy, track)
zget = zmq.backend.cython._zmq.Socket.get
RCVMORE, SNDMORE = zmq.RCVMORE, zmq.SNDMORE
PARTIAL, REDUCED = Partial.TYPE, Reduced.TYPE
ZERO_COPY_MIN = 1 << 16  # pyzmq copies smaller frames anyway; a zero-copy Frame costs more there


def star_only_from_env() -> bool:
    """TPI_STAR_ONLY=1 in the master's environment keeps two ranks on the star too (bench/tp_paired.py's
    A/B row). Only the master reads it: every rank must agree, so workers follow Assign.star_only."""
    return os.environ.get("TPI_STAR_ONLY") == "1"


def exchange(world: int, wire_dtype: str, star_only: bool = False) -> bool:
    """Whether an allreduce swaps partials (two ranks, f32 wire, star_only unset) rather than going
    through the star: each rank posts its partial at once and adds master's + worker's itself (allreduce.py)."""
    return world == 2 and wire_dtype == "f32" and not star_only


def frames_nbytes(frames: list) -> int:
    return sum(frame_size(f) for f in frames)


def frame_size(frame) -> int:
    return len(frame) if type(frame) is bytes else frame.nbytes  # memoryview or numpy array


def check_wire(wire_dtype: str) -> None:
    if wire_dtype not in REDUCE_DTYPES:
        raise GroupError(f"wire dtype must be one of {', '.join(REDUCE_DTYPES)}, not {wire_dtype!r}")


def drain(sock: zmq.Socket) -> int:
    """Receive and discard the rest of a multipart message; returns how many frames it had."""
    n = 0
    while zget(sock, RCVMORE):
        sock.recv(copy=False)
        n += 1
    return n


def rest_of(sock: zmq.Socket, first: bytes, more: bool | None = None) -> list:
    """first plus the remaining frames of its message (the slow, fully validated path);
    more: whether frames follow `first` (None: ask the socket)."""
    frames = [first]
    if more is None or more:
        if more:
            frames.append(sock.recv())
        while zget(sock, RCVMORE):
            frames.append(sock.recv())
    return frames


def decode_rest(sock: zmq.Socket, head: bytes, more: bool | None, stats: CommStats,
                 max_frame: int) -> Message | str:
    """Receive the rest of a message the hot path did not take and decode it in full: the
    Message, or why it is malformed. more: whether frames follow the header (None: ask)."""
    frames = rest_of(sock, head, more)
    stats.bytes_received += frames_nbytes(frames[1:])
    try:
        return decode(frames, max_frame)
    except ProtocolError as e:
        return str(e)


def size_error(sock: zmq.Socket, n: int, nbytes: int, more: bool = True) -> str:
    """Why a buffer received for a matching header is wrong (and drop the rest of its message)."""
    extra = drain(sock) if more else 0
    return (f"buffer of {n} bytes where its header needs {nbytes}" if n != nbytes
            else f"{extra} buffer frame(s) more than its header lists")


def exact_bf16_or_self(x: np.ndarray) -> np.ndarray:
    """bf16 bits of float32 x when that loses nothing (low 16 bits all zero), else x itself."""
    x = np.ascontiguousarray(x)
    if x.dtype != np.float32 or x.size == 0:
        return x
    bits = x.view(np.uint32)
    if np.bitwise_and(bits, 0xFFFF).any():
        return x
    return np.right_shift(bits, 16).astype(np.uint16)


