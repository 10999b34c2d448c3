"""Liveness on the master: the control channel's peers, heartbeats owed, closed connections, and who is
lost and why."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

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
        """Mark a joined peer admitted under peer_id; None (and lost at once) if it is gone meanwhile."""
        peer = self.records.get(rid)
        if peer is None:
            return None
        closed = peer.state == "closed"
        peer.state, peer.peer_id, peer.last_seen = "admitted", peer_id, time.monotonic()
        if closed:  # its communicator must fail at once, not wait for a Ready that never comes
            self.lose(peer, "its connection closed before it was admitted")
            return None
        return peer

    def closed(self, rid: bytes) -> PeerRecord | None:
        """The peer's connection closed: lose it if admitted, remember it if it waits for admission."""
        peer = self.records.get(rid)
        if peer is not None and peer.state == "pending":
            peer.state = "closed"
            return None
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


class ConnectionWatch:
    """The control ROUTER's connections by file descriptor: a peer whose connection closes (its process
    ended, its host reset the link) is lost at once, not a heartbeat timeout later.

    libzmq reports a closed connection only by its descriptor (socket monitor EVENT_DISCONNECTED), and a
    received message names the descriptor it came on (ZMQ_SRCFD), so each peer is tied to the descriptor
    of its first message. Descriptors are reused: before a new peer claims one, every event already queued
    is handled (the close of the connection that held it before is emitted before the new one is accepted).
    """

    def __init__(self, sock: zmq.Socket):
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock = sock
        self._owner: dict[int, bytes] = {}  # descriptor -> routing id of the peer that claimed it

    def closed(self) -> list[bytes]:
        """Routing ids whose connection closed since the last call (drains the monitor)."""
        gone = []
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return gone
            rid = self._owner.pop(int(event["value"]), None)
            if rid is not None:
                gone.append(rid)

    def claim(self, rid: bytes, frame: zmq.Frame) -> None:
        """Tie rid to the descriptor its message came on (call after closed(): see the class docstring)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return  # no descriptor known (another transport): the heartbeat timeout still applies
        self._owner[int(fd)] = rid

    def close(self) -> None:
        self._sock.disable_monitor()
        self.monitor.close(0)
