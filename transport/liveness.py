"""Liveness on the master: the control channel's peers, heartbeats owed, and who is lost and why."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from tpi.transport.keeper import PeerRecord

log = logging.getLogger(__name__)


class PeerTable:
    """Peers by control routing id (the keeper thread's); `lost` (peer_id -> reason) is read by communicators."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.records: dict[bytes, PeerRecord] = {}
        self.lost: dict[str, str] = {}

    def get(self, rid: bytes) -> PeerRecord | None:
        return self.records.get(rid)

    def add(self, rid: bytes, record: PeerRecord) -> None:
        self.records[rid] = record

    def drop(self, rid: bytes) -> None:
        self.records.pop(rid, None)

    def admitted(self) -> Iterator[tuple[bytes, PeerRecord]]:
        return ((rid, p) for rid, p in self.records.items() if p.state == "admitted")

    def admit(self, rid: bytes, peer_id: str) -> PeerRecord | None:
        peer = self.records.get(rid)
        if peer is not None:
            peer.state, peer.peer_id, peer.last_seen = "admitted", peer_id, time.monotonic()
        return peer

    def lose(self, peer: PeerRecord, reason: str) -> bool:
        """Mark an admitted peer lost; True when it was not lost already."""
        if peer.state != "admitted":
            return False
        peer.state = "lost"
        self.lost[peer.peer_id] = reason
        log.warning("lost device %s (%s): %s", peer.name, peer.address, reason)
        return True

    def silent(self, now: float) -> list[tuple[PeerRecord, str]]:
        """Admitted peers silent past the timeout, with the reason to lose them for."""
        return [(p, f"silent for {now - p.last_seen:.1f}s (timeout {self.timeout_s}s)")
                for _, p in self.admitted() if now - p.last_seen > self.timeout_s]
