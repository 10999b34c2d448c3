"""ZeroMQ links, the master's end: the control ROUTER's keeper thread, composed of its four parts.

Each device pair has two channels. The control channel (the port the user types) carries
the join handshake, heartbeats, link probes and shard transfer; a background keeper thread owns it on
both sides. The data channel (control port + 1) carries steps and allreduces only; the
caller's thread owns it through a Communicator (allreduce.py), so shard streaming and
heartbeats never sit in front of a step and the hot path takes no locks.

On the master the keeper routes control messages to the parts that own them:
admission and auth (transport/admission.py), liveness (liveness.py: heartbeats, and closed connections
seen through a socket monitor), link probes (probe.py),
shard serving (transfer.py), and the data plane: ranks and the communicator (dataplane.py).
The worker's end is transport/worker_link.py.
"""
from __future__ import annotations

import logging
import queue
import secrets
import time
from dataclasses import replace
from pathlib import Path

import zmq

from tpi.errors import GroupError, ProtocolError, VersionMismatch
from tpi.transport import security
from tpi.transport.admission import Admission
from tpi.transport.allreduce import StarMaster
from tpi.transport.dataplane import DataPlane
from tpi.transport.keeper import JoinRequest, Keeper, LinkSettings, PeerRecord, frame_meta, parse_endpoint, tune_socket
from tpi.transport.liveness import ConnectionWatch, PeerTable
from tpi.transport.probe import LinkProbe, Prober
from tpi.transport.protocol import (Assign, Heartbeat, Hello, Message, ProbeEcho, Refuse, ShardRequest, Stop, decode,
                                    encode)
from tpi.transport.transfer import ShardServer
from tpi.transport.worker_link import NOT_ADMITTED, VERSION_REFUSAL

log = logging.getLogger(__name__)

GOODBYE_LINGER_MS = 500  # how long closing waits to deliver Stop to devices (a dead one costs this once)


class MasterLink(Keeper):
    """Master side: accepts joins on the control port, admits or refuses, serves shards, keeps liveness."""

    def __init__(self, bind: str, key_dir: Path, *, insecure: bool = False,
                 settings: LinkSettings = LinkSettings()):
        host, port = parse_endpoint(bind)
        self.settings = settings
        self.insecure = insecure
        ctx = zmq.Context()
        super().__init__(ctx, "master")
        self.admission = Admission(key_dir, insecure)
        self._zap = None
        if insecure:
            log.warning("INSECURE link: no encryption and no device keys; use only for benchmarks")
        else:
            self._zap = ctx.socket(zmq.REP)
            self._zap.linger = 0
            self._zap.bind(security.ZAP_ENDPOINT)
        self._control = ctx.socket(zmq.ROUTER)
        data = ctx.socket(zmq.ROUTER)  # handed to the master Communicator
        data.router_mandatory = 1  # a send to a vanished worker raises instead of vanishing
        for sock, domain in ((self._control, security.CONTROL_DOMAIN), (data, security.DATA_DOMAIN)):
            tune_socket(sock, settings)
            self.admission.secure(sock, domain)
        try:
            self.port = self._bind(self._control, host, port)
            self.data_port = self._bind(data, host, port + 1 if port else 0)
        except GroupError:
            ctx.destroy(linger=0)  # nothing started yet: release every socket made above
            raise
        self.host = host
        self.peers = PeerTable(settings.timeout_s)
        self._watch = ConnectionWatch(self._control)
        self.data = DataPlane(data, settings, self.lost_peers)
        self.prober = Prober(self.call, self._send, lambda rid: self.peers.get(rid) is not None)
        self._joins: queue.Queue[JoinRequest] = queue.Queue()
        self._shards = ShardServer()
        self.start()

    @staticmethod
    def _bind(sock: zmq.Socket, host: str, port: int) -> int:
        try:
            sock.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError as e:
            raise GroupError(f"cannot listen on {host}:{port or 'any'} ({e}); pick another --port") from e
        return int(sock.last_endpoint.decode().rpartition(":")[2])

    @property
    def token(self) -> str:
        return self.admission.token

    # ---- caller API (any thread) ----

    def next_join(self, timeout: float | None = None) -> JoinRequest | None:
        """The next device that presented a valid token, or None after timeout seconds."""
        try:
            return self._joins.get(timeout=timeout)
        except queue.Empty:
            return None

    def admit(self, join: JoinRequest, assign: Assign, shard_path: Path | None = None) -> Assign:
        """Admit a device: serve it shard_path (if given) and send it assign; returns what was sent."""
        sent = replace(assign, peer_id=secrets.token_hex(8), data_port=self.data_port,
                       heartbeat_s=self.settings.heartbeat_s, timeout_s=self.settings.timeout_s)

        def run() -> None:
            peer = self.peers.admit(join.peer, sent.peer_id)
            if peer is None:
                return
            if shard_path is not None:
                self._shards.register(join.peer, shard_path, sent.shard_hash)
            self.admission.admit(peer.device_key)
            self._send(join.peer, sent)
            log.info("admitted %s (%s) as rank %d", peer.name, peer.address, sent.rank)

        self.data.assign(sent.rank, sent.peer_id, join.name, sent.world, sent.star_only)
        self.call(run)
        return sent

    def communicator(self, wire_dtype: str = "f32", ready_timeout_s: float | None = None,
                     awaiting: set[int] | None = None, first_seq: int = 0) -> StarMaster:
        """The rank-0 StarMaster over every admitted rank (tpi.transport.dataplane.DataPlane.communicator)."""
        return self.data.communicator(wire_dtype, ready_timeout_s, awaiting, first_seq)

    def forget_ranks(self) -> None:
        """Drop every rank assignment, before admitting a re-planned group from rank 1 again."""
        self.data.forget()

    def refuse(self, join: JoinRequest, reason: str) -> None:
        """Turn a device away with a reason it will show its user."""
        def run() -> None:
            self.peers.drop(join.peer)
            log.warning("refused %s (%s): %s", join.name, join.address, reason)
            self._send(join.peer, Refuse(reason))

        self.call(run)

    def probe(self, join: JoinRequest, payload_bytes: int = 1 << 20, rounds: int = 4,
              timeout_s: float = 5.0) -> LinkProbe | None:
        """Time empty and payload round trips to a joined device; None if it does not echo in time."""
        return self.prober.measure(join, payload_bytes, rounds, timeout_s)

    def lose(self, peer_id: str, reason: str) -> None:
        """Count an admitted device lost now (its local process ended): its communicator fails at once."""
        def run() -> None:
            for _, peer in self.peers.admitted():
                if peer.peer_id == peer_id:
                    self._lose(peer, reason)

        self.call(run)

    def lost_peers(self) -> dict[str, str]:
        """peer_id -> why it is lost (silent past the timeout, left, or misbehaved)."""
        return dict(self.peers.lost)

    def transfer_progress(self) -> dict[str, tuple[int, int]]:
        """Device name -> (shard bytes sent, shard size); a snapshot for a progress display."""
        box: queue.Queue = queue.Queue()
        self.call(lambda: box.put({self.peers.records[p].name: v for p, v in self._shards.progress().items()
                                   if p in self.peers.records}))
        return box.get(timeout=5)

    def close(self) -> None:
        """Tell admitted devices the group is over, then release sockets and threads."""
        if self._closed:
            return
        self._closed = True

        def run() -> None:
            for rid, _ in self.peers.admitted():
                self._send(rid, Stop("master is shutting down"))
            self._control.linger = GOODBYE_LINGER_MS  # flush the goodbyes, then close

        if not self._stopping.is_set():
            try:
                self.call(run)
            except GroupError:
                pass  # the keeper already died and said why in the log
        self.stop()
        self.data.sock.close(GOODBYE_LINGER_MS)  # a Stop broadcast just before still reaches live workers
        self._ctx.term()

    # ---- keeper thread ----

    def _send(self, rid: bytes, msg: Message) -> None:
        self._control.send_multipart([rid, *encode(msg)], copy=False)

    def _lose(self, peer: PeerRecord, reason: str) -> None:
        if self.peers.lose(peer, reason):
            self.admission.revoke_data(peer.device_key)

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self._control, self._wake_pull, self._zap, self._watch.monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        hb = self.settings.heartbeat_s
        next_beat = time.monotonic() + hb
        while not self._stopping.is_set():
            events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
            if self._zap is not None and self._zap in events:
                self._zap.send_multipart(security.zap_reply(self._zap.recv_multipart(), self.admission.zap_allows))
            if self._wake_pull in events:
                self._drain_commands()
            if self._watch.monitor in events:
                self._on_closed()
            if self._control in events:
                self._drain_control()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + hb
                self._beat(now)
        self._shards.close()
        self._watch.close()
        self._control.close()  # linger 0, or GOODBYE_LINGER_MS once close() queued the goodbyes
        if self._zap is not None:
            self._zap.close(0)

    def _on_closed(self) -> None:
        for rid in self._watch.closed():
            peer = self.peers.closed(rid)
            if peer is not None:
                self._lose(peer, "its connection closed (the process ended, or its host reset the link)")
                self._shards.unregister(rid)

    def _beat(self, now: float) -> None:
        for peer, reason in self.peers.silent(now):
            self._lose(peer, reason)
        for rid, _ in self.peers.admitted():
            self._send(rid, Heartbeat())

    def _on_control(self, frames: list[zmq.Frame]) -> None:
        rid = frames[0].bytes
        address = frame_meta(frames[-1], "Peer-Address") or "?"
        peer = self.peers.get(rid)
        who = f"{peer.name} ({address})" if peer else address
        try:
            msg = decode([f.buffer for f in frames[1:]], self.settings.max_frame)
        except VersionMismatch as e:
            log.warning("refused %s: %s", who, e)
            if peer is None or peer.state != "admitted":
                self._send(rid, Refuse(f"{VERSION_REFUSAL}{e}"))
            return
        except ProtocolError as e:
            log.warning("dropped malformed message from %s: %s", who, e)
            return
        if peer is not None and peer.state == "admitted":
            peer.last_seen = time.monotonic()
            self._on_admitted(rid, peer, msg)
        elif peer is not None and isinstance(msg, ProbeEcho):
            self.prober.on_echo(rid, msg)
        elif isinstance(msg, Hello):
            key = frame_meta(frames[-1], "User-Id").encode() if not self.insecure else b""
            self._on_hello(rid, msg, address, key)
            if self.peers.get(rid) is not None:
                self._on_closed()  # first the closes queued before this connection was accepted
                self._watch.claim(rid, frames[-1])
        elif peer is None or not isinstance(msg, Heartbeat):
            log.warning("refused %s: %s before admission", who, type(msg).__name__)
            self._send(rid, Refuse(NOT_ADMITTED))

    def _on_hello(self, rid: bytes, hello: Hello, address: str, key: bytes) -> None:
        if not self.admission.proves_token(hello, key):
            log.warning("refused device %r from %s: wrong join token", hello.name, address)
            self._send(rid, Refuse("wrong join token: use the token printed by the current tpi serve"))
            return
        self.peers.add(rid, PeerRecord(hello.name, address, key, last_seen=time.monotonic()))
        self._joins.put(JoinRequest(rid, hello.name, hello.profile, tuple(hello.cached_hashes), address, key))

    def _on_admitted(self, rid: bytes, peer: PeerRecord, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, ShardRequest):
            self._send(rid, self._shards.answer(rid, msg))
        elif isinstance(msg, Stop):
            self._lose(peer, f"left the group ({msg.reason})")
            self._shards.unregister(rid)
        else:
            log.warning("dropped unexpected %s from %s (%s)", type(msg).__name__, peer.name, peer.address)
