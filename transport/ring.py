"""Ring allreduce over DEALER->ROUTER links, kept only to compare with the star (bench/allreduce.py)."""
from __future__ import annotations

import time

import numpy as np
import zmq

from tpi.errors import GroupError
from tpi.transport.comm import CommStats
from tpi.transport.protocol import Partial, Reduced, decode, encode
from tpi.transport.wire import from_bf16, from_wire, to_bf16, to_wire


class RingAllreduce:
    """Ring allreduce (reduce-scatter + allgather) over DEALER->ROUTER links; benchmarks only.

    Each rank binds endpoints[rank] and sends to its right neighbour. It needs 2(N-1)
    sequential hops per call, against the star's 2, which is why tpi does not use it.
    """

    def __init__(self, rank: int, world: int, endpoints: list[str], wire_dtype: str = "f32",
                 timeout_s: float = 30.0, max_frame: int = 256 << 20):
        if wire_dtype not in ("f32", "bf16"):
            raise GroupError(f"the ring carries f32 or bf16, not {wire_dtype!r}")
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
        self._right.send_multipart(encode(kind(self._op, to_wire(send, self.wire_dtype), step)), copy=False)
        try:
            frames = self._inbox.recv_multipart()
        except zmq.Again as e:
            left = (self.rank - 1) % self.world
            raise GroupError(f"ring rank {left} sent nothing for {self._timeout_s:.0f}s") from e
        msg = decode(frames[1:], self._max_frame)
        if type(msg) is not kind or msg.op != self._op or msg.seq != step:
            raise GroupError(f"ring out of step: got {type(msg).__name__} op {msg.op} hop {msg.seq}")
        return from_wire(msg.x)

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
