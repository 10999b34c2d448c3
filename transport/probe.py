"""Link probes: the master times empty and payload round trips to a joined device (Probe / ProbeEcho).

Both ends answer on their keeper threads, so the figures are the link's, not the callers' scheduling.
"""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tpi.transport.keeper import JoinRequest
from tpi.transport.protocol import Probe, ProbeEcho

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkProbe:
    """A device's control link as the master measured it before admission."""

    rtt_s: float  # fastest empty round trip
    bandwidth_bytes_s: float  # master -> device, from the extra time a payload takes
    payload_bytes: int


class Prober:
    """Probes joined devices; `call` runs a function on the keeper thread, `send(rid, msg)` sends on it."""

    def __init__(self, call: Callable, send: Callable, known: Callable[[bytes], bool]):
        self._call, self._send, self._known = call, send, known
        self._pending: dict[bytes, tuple] = {}  # peer -> (probe offset, [send time], echo queue)

    def on_echo(self, rid: bytes, echo: ProbeEcho) -> None:
        """Keeper thread: an echo arrived."""
        pending = self._pending.get(rid)
        if pending is not None and pending[0] == echo.offset and pending[1]:
            pending[2].put((echo.offset, time.perf_counter()))

    def measure(self, join: JoinRequest, payload_bytes: int = 1 << 20, rounds: int = 4,
                timeout_s: float = 5.0) -> LinkProbe | None:
        """Time empty and payload round trips to a joined device; None if it does not echo in time."""
        assert payload_bytes > 0 and rounds > 0
        echoes: queue.Queue[tuple[int, float]] = queue.Queue()
        payload = np.zeros(payload_bytes, dtype=np.uint8)
        best = {0: float("inf"), payload_bytes: float("inf")}
        deadline = time.monotonic() + timeout_s
        for i in range(2 * rounds):
            size = 0 if i % 2 == 0 else payload_bytes
            probe = Probe(i, payload[:size])
            sent: list[float] = []

            def run(probe: Probe = probe, sent: list = sent) -> None:
                if not self._known(join.peer):
                    return
                self._pending[join.peer] = (probe.offset, sent, echoes)
                sent.append(time.perf_counter())
                self._send(join.peer, probe)

            self._call(run)
            while True:
                try:
                    offset, arrived = echoes.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self._call(lambda: self._pending.pop(join.peer, None))
                    log.warning("%s (%s) did not answer the link probe; planning with assumed link figures",
                                join.name, join.address)
                    return None
                if offset == i:
                    break
            best[size] = min(best[size], arrived - sent[0])
        self._call(lambda: self._pending.pop(join.peer, None))
        rtt = best[0]
        extra = max(best[payload_bytes] - rtt, 1e-7)  # loopback can beat the timer's resolution
        return LinkProbe(rtt_s=rtt, bandwidth_bytes_s=payload_bytes / extra, payload_bytes=payload_bytes)
