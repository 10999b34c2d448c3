"""ZeroMQ links: the master's ROUTERs and a worker's DEALERs, CURVE, admission, heartbeats.

Each device pair has two channels. The control channel (the port the user types) carries
the join handshake, heartbeats and shard transfer; a background keeper thread owns it on
both sides. The data channel (control port + 1) carries steps and allreduces only; the
caller's thread owns it through a Communicator (allreduce.py), so shard streaming and
heartbeats never sit in front of a step and the hot path takes no locks.
"""
from __future__ import annotations

import logging
import queue
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import zmq

from tpi.errors import GroupError, ProtocolError
from tpi.transport import security
from tpi.transport.keeper import (JoinRequest, Keeper, LinkSettings, PeerRecord, frame_meta, parse_endpoint,
                                  tune_socket)
from tpi.transport.protocol import (Assign, Heartbeat, Hello, Message, Refuse, ShardChunk, ShardRequest, Stop,
                                    VersionMismatch, decode, encode)
from tpi.transport.transfer import ShardServer

log = logging.getLogger(__name__)

__all__ = ["JoinRequest", "LinkProbe", "NoAnswerError", "LinkSettings", "MasterLink", "WorkerLink", "parse_endpoint"]

# A link probe reuses the shard messages under a hash no shard has: the master sends a
# ShardChunk of n bytes to a joined (not yet admitted) device, whose keeper thread echoes an
# empty ShardRequest at once. Timing both in the keeper threads gives RTT and bandwidth.
PROBE_HASH = "link-probe"
GOODBYE_LINGER_MS = 500  # how long closing waits to deliver Stop to devices (a dead one costs this once)
# The refusals a master sends only to a peer it does not know. An admitted worker that gets
# one is talking to a master that restarted on the same port and has forgotten it.
NOT_ADMITTED = "not admitted: join with a valid token first"
VERSION_REFUSAL = "protocol version mismatch: "


class NoAnswerError(GroupError):
    """The master did not answer in time (it may be down, or still forming its group)."""


@dataclass(frozen=True)
class LinkProbe:
    """A device's control link as the master measured it before admission."""

    rtt_s: float  # fastest empty round trip
    bandwidth_bytes_s: float  # master -> device, from the extra time a payload takes
    payload_bytes: int


class MasterLink(Keeper):
    """Master side: accepts joins on the control port, admits or refuses, serves shards."""

    def __init__(self, bind: str, key_dir: Path, *, insecure: bool = False,
                 settings: LinkSettings = LinkSettings()):
        host, port = parse_endpoint(bind)
        self.settings = settings
        self.insecure = insecure
        ctx = zmq.Context()
        super().__init__(ctx, "master")
        self._keys = security.load_or_create_keypair(key_dir, "master")
        self._key_dir = key_dir
        self._secret = security.load_or_create_join_secret(key_dir)
        self._admitted_keys = security.AdmittedKeys(key_dir)
        self.token = security.make_token(self._keys.public, self._secret)
        self._zap = None
        if insecure:
            log.warning("INSECURE link: no encryption and no device keys; use only for benchmarks")
        else:
            self._zap = ctx.socket(zmq.REP)
            self._zap.linger = 0
            self._zap.bind(security.ZAP_ENDPOINT)
        self._control = ctx.socket(zmq.ROUTER)
        self.data = ctx.socket(zmq.ROUTER)  # handed to the master Communicator
        self.data.router_mandatory = 1  # a send to a vanished worker raises instead of vanishing
        for sock, domain in ((self._control, security.CONTROL_DOMAIN), (self.data, security.DATA_DOMAIN)):
            tune_socket(sock, settings)
            if not insecure:
                security.configure_server(sock, self._keys, domain)
        try:
            self.port = self._bind(self._control, host, port)
            self.data_port = self._bind(self.data, host, port + 1 if port else 0)
        except GroupError:
            ctx.destroy(linger=0)  # nothing started yet: release every socket made above
            raise
        self.host = host
        self._peers: dict[bytes, PeerRecord] = {}
        self._data_keys: set[bytes] = set()
        self._lost: dict[str, str] = {}  # peer_id -> reason; read by communicators
        self._joins: queue.Queue[JoinRequest] = queue.Queue()
        self._shards = ShardServer()
        self._ranks: dict[int, tuple[str, str, int]] = {}  # rank -> (peer_id, name, world)
        self._probes: dict[bytes, tuple] = {}  # peer -> (probe offset, [send time], echo queue)
        self.start()

    @staticmethod
    def _bind(sock: zmq.Socket, host: str, port: int) -> int:
        try:
            sock.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError as e:
            raise GroupError(f"cannot listen on {host}:{port or 'any'} ({e}); pick another --port") from e
        return int(sock.last_endpoint.decode().rpartition(":")[2])

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
            peer = self._peers.get(join.peer)
            if peer is None:
                return
            if shard_path is not None:
                self._shards.register(join.peer, shard_path, sent.shard_hash)
            peer.state, peer.peer_id, peer.last_seen = "admitted", sent.peer_id, time.monotonic()
            if peer.device_key:
                self._admitted_keys.add(peer.device_key)
                self._data_keys.add(peer.device_key)
            self._send(join.peer, sent)
            log.info("admitted %s (%s) as rank %d", peer.name, peer.address, sent.rank)

        self._ranks[sent.rank] = (sent.peer_id, join.name, sent.world)
        self.call(run)
        return sent

    def communicator(self, wire_dtype: str = "f32", ready_timeout_s: float | None = None,
                     awaiting: set[int] | None = None, first_seq: int = 0):
        """The rank-0 StarMaster over every admitted rank, once all announced Ready.

        Regrouping a running group: awaiting names the ranks just (re)admitted, the only ones
        that announce Ready again; first_seq continues the replaced communicator's step numbers.
        """
        from tpi.transport.allreduce import StarMaster

        ranks = sorted(self._ranks)
        worlds = {w for _, _, w in self._ranks.values()}
        if ranks != list(range(1, len(ranks) + 1)) or worlds != {len(ranks) + 1}:
            raise GroupError(f"admitted ranks {ranks} with world sizes {sorted(worlds)} do not form a "
                             "group; admit ranks 1..N-1 with world N")
        comm = StarMaster(self.data, [self._ranks[r][0] for r in ranks], [self._ranks[r][1] for r in ranks],
                          wire_dtype, self.lost_peers, self.settings.step_timeout_s, self.settings.max_frame,
                          first_seq)
        comm.wait_ready(ready_timeout_s if ready_timeout_s is not None else self.settings.step_timeout_s, awaiting)
        return comm

    def forget_ranks(self) -> None:
        """Drop every rank assignment, before admitting a re-planned group from rank 1 again."""
        self._ranks.clear()

    def refuse(self, join: JoinRequest, reason: str) -> None:
        """Turn a device away with a reason it will show its user."""
        def run() -> None:
            self._peers.pop(join.peer, None)
            log.warning("refused %s (%s): %s", join.name, join.address, reason)
            self._send(join.peer, Refuse(reason))

        self.call(run)

    def probe(self, join: JoinRequest, payload_bytes: int = 1 << 20, rounds: int = 4,
              timeout_s: float = 5.0) -> LinkProbe | None:
        """Time empty and payload round trips to a joined device; None if it does not echo in time."""
        assert payload_bytes > 0 and rounds > 0
        echoes: queue.Queue[tuple[int, float]] = queue.Queue()
        payload = np.zeros(payload_bytes, dtype=np.uint8)
        best = {0: float("inf"), payload_bytes: float("inf")}
        deadline = time.monotonic() + timeout_s
        for i in range(2 * rounds):
            size = 0 if i % 2 == 0 else payload_bytes
            chunk = ShardChunk(PROBE_HASH, i, size, 0, payload[:size])
            sent: list[float] = []

            def run(chunk: ShardChunk = chunk, sent: list = sent) -> None:
                if join.peer not in self._peers:
                    return
                self._probes[join.peer] = (chunk.offset, sent, echoes)
                sent.append(time.perf_counter())
                self._send(join.peer, chunk)

            self.call(run)
            while True:
                try:
                    offset, arrived = echoes.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self.call(lambda: self._probes.pop(join.peer, None))
                    log.warning("%s (%s) did not answer the link probe; planning with assumed link figures",
                                join.name, join.address)
                    return None
                if offset == i:
                    break
            best[size] = min(best[size], arrived - sent[0])
        self.call(lambda: self._probes.pop(join.peer, None))
        rtt = best[0]
        extra = max(best[payload_bytes] - rtt, 1e-7)  # loopback can beat the timer's resolution
        return LinkProbe(rtt_s=rtt, bandwidth_bytes_s=payload_bytes / extra, payload_bytes=payload_bytes)

    def serve_shard(self, join: JoinRequest, path: Path, expected_hash: str) -> None:
        """(Re)register the shard file an admitted device may fetch."""
        self.call(lambda: self._shards.register(join.peer, path, expected_hash))

    def lost_peers(self) -> dict[str, str]:
        """peer_id -> why it is lost (silent past the timeout, left, or misbehaved)."""
        return dict(self._lost)

    def transfer_progress(self) -> dict[str, tuple[int, int]]:
        """Device name -> (shard bytes sent, shard size); a snapshot for a progress display."""
        box: queue.Queue = queue.Queue()
        self.call(lambda: box.put({self._peers[p].name: v for p, v in self._shards.progress().items()
                                   if p in self._peers}))
        return box.get(timeout=5)

    def close(self) -> None:
        """Tell admitted devices the group is over, then release sockets and threads."""
        if self._closed:
            return
        self._closed = True

        def run() -> None:
            for rid, peer in self._peers.items():
                if peer.state == "admitted":
                    self._send(rid, Stop("master is shutting down"))
            self._control.linger = GOODBYE_LINGER_MS  # flush the goodbyes, then close

        if not self._stopping.is_set():
            try:
                self.call(run)
            except GroupError:
                pass  # the keeper already died and said why in the log
        self.stop()
        self.data.close(GOODBYE_LINGER_MS)  # a Stop broadcast just before still reaches live workers
        self._ctx.term()

    # ---- keeper thread ----

    def _send(self, rid: bytes, msg: Message) -> None:
        self._control.send_multipart([rid, *encode(msg)], copy=False)

    def _mark_lost(self, peer: PeerRecord, reason: str) -> None:
        if peer.state == "admitted":
            peer.state = "lost"
            self._lost[peer.peer_id] = reason
            self._data_keys.discard(peer.device_key)
            log.warning("lost device %s (%s): %s", peer.name, peer.address, reason)

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self._control, self._wake_pull, self._zap):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        hb = self.settings.heartbeat_s
        next_beat = time.monotonic() + hb
        while not self._stopping.is_set():
            events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
            if self._zap is not None and self._zap in events:
                self._zap.send_multipart(security.zap_reply(self._zap.recv_multipart(), self._zap_allows))
            if self._wake_pull in events:
                self._drain_commands()
            if self._control in events:
                self._drain_control()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + hb
                self._beat(now)
        self._shards.close()
        self._control.close()  # linger 0, or GOODBYE_LINGER_MS once close() queued the goodbyes
        if self._zap is not None:
            self._zap.close(0)

    def _zap_allows(self, domain: bytes, key: bytes) -> bool:
        # Anyone may attempt the control handshake (the token decides); data needs admission.
        return domain == security.CONTROL_DOMAIN or key in self._data_keys

    def _beat(self, now: float) -> None:
        for rid, peer in self._peers.items():
            if peer.state != "admitted":
                continue
            if now - peer.last_seen > self.settings.timeout_s:
                self._mark_lost(peer, f"silent for {now - peer.last_seen:.1f}s "
                                      f"(timeout {self.settings.timeout_s}s)")
            else:
                self._send(rid, Heartbeat())

    def _on_control(self, frames: list[zmq.Frame]) -> None:
        rid = frames[0].bytes
        address = frame_meta(frames[-1], "Peer-Address") or "?"
        peer = self._peers.get(rid)
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
        elif peer is not None and isinstance(msg, ShardRequest) and msg.shard_hash == PROBE_HASH:
            probe = self._probes.get(rid)
            if probe is not None and probe[0] == msg.offset and probe[1]:
                probe[2].put((msg.offset, time.perf_counter()))
        elif isinstance(msg, Hello):
            key = frame_meta(frames[-1], "User-Id").encode() if not self.insecure else b""
            self._on_hello(rid, msg, address, key)
        elif peer is None or not isinstance(msg, Heartbeat):
            log.warning("refused %s: %s before admission", who, type(msg).__name__)
            self._send(rid, Refuse(NOT_ADMITTED))

    def _on_hello(self, rid: bytes, hello: Hello, address: str, key: bytes) -> None:
        known = bool(key) and key in self._admitted_keys
        # Re-read the secret per join (a small file): `tpi token rotate` takes effect at once.
        self._secret = security.load_or_create_join_secret(self._key_dir)
        self.token = security.make_token(self._keys.public, self._secret)
        if not (known or security.proof_is_valid(hello.proof, self._secret, self._keys.public, key)):
            log.warning("refused device %r from %s: wrong join token", hello.name, address)
            self._send(rid, Refuse("wrong join token: use the token printed by the current tpi serve"))
            return
        self._peers[rid] = PeerRecord(hello.name, address, key, last_seen=time.monotonic())
        self._joins.put(JoinRequest(rid, hello.name, hello.profile, tuple(hello.cached_hashes),
                                    address, key))

    def _on_admitted(self, rid: bytes, peer: PeerRecord, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, ShardRequest):
            self._send(rid, self._shards.answer(rid, msg))
        elif isinstance(msg, Stop):
            self._mark_lost(peer, f"left the group ({msg.reason})")
            self._shards.unregister(rid)
        else:
            log.warning("dropped unexpected %s from %s (%s)", type(msg).__name__, peer.name, peer.address)


class WorkerLink(Keeper):
    """Worker side: joins the master named by the token, fetches its shard, keeps heartbeats."""

    def __init__(self, connect: str, token: str, key_dir: Path, *, insecure: bool = False,
                 settings: LinkSettings = LinkSettings(), data_endpoint: str | None = None,
                 timeout_from_master: bool = True):
        """timeout_from_master=False keeps settings.timeout_s for noticing a silent master."""
        self.host, self.port = parse_endpoint(connect)
        self.settings = settings
        self._timeout_from_master = timeout_from_master
        self.insecure = insecure
        self._token = security.parse_token(token)
        self._data_endpoint = data_endpoint
        ctx = zmq.Context()
        super().__init__(ctx, "worker")
        self._keys = None if insecure else security.load_or_create_keypair(key_dir, "device")
        self._control = self._socket(zmq.DEALER)
        self._control.connect(f"tcp://{self.host}:{self.port}")
        self._monitor = self._control.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._replies: queue.Queue[Message] = queue.Queue()
        self.assign: Assign | None = None
        self._heartbeat_s, self._timeout_s = settings.heartbeat_s, settings.timeout_s
        self._last_seen = time.monotonic()
        self._lost_reason: str | None = None
        self._stop_reason: str | None = None
        self._handshake_error: str | None = None
        self.data: zmq.Socket | None = None
        if insecure:
            log.warning("INSECURE link: no encryption; use only for benchmarks")
        self.start()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        tune_socket(sock, self.settings)
        if self._keys is not None:
            security.configure_client(sock, self._keys, self._token.master_public)
        return sock

    # ---- caller API ----

    def join(self, name: str, profile: dict, cached_hashes: list[str]) -> Assign:
        """Present the token; returns the master's Assign or raises GroupError with its reason."""
        device_key = b"" if self._keys is None else self._keys.public
        proof = security.join_proof(self._token.secret, self._token.master_public, device_key)
        self._drop_stale_replies()
        self.send(Hello(name, profile, list(cached_hashes), proof))
        reply = self.reply(self.settings.join_timeout_s, "an answer to the join request")
        if isinstance(reply, Refuse):
            raise GroupError(f"master refused this device: {reply.reason}")
        if not isinstance(reply, Assign):
            raise GroupError(f"master answered the join with {type(reply).__name__}; versions differ?")
        return reply

    def send(self, msg: Message) -> None:
        """Queue a control message to the master."""
        frames = encode(msg)
        self.call(lambda: self._control.send_multipart(frames, copy=False))

    def _drop_stale_replies(self) -> None:
        """Forget answers to an earlier, abandoned exchange (e.g. chunks after a failure)."""
        while True:
            try:
                log.debug("dropped stale reply %s", type(self._replies.get_nowait()).__name__)
            except queue.Empty:
                return

    def reply(self, timeout: float, what: str) -> Message:
        """Next control reply (Assign, Refuse, ShardChunk); GroupError on silence or loss."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._replies.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pass
            if self._handshake_error:
                raise GroupError(self._handshake_error)
            if self._lost_reason:
                raise GroupError(f"lost the master while waiting for {what}: {self._lost_reason}")
            if time.monotonic() >= deadline:
                raise NoAnswerError(
                    f"no {what} from {self.host}:{self.port} within {timeout:.0f}s: check the address, "
                    "that tpi serve is running there, and that the token is current")

    def fetch_shard(self, dest: Path, expected_hash: str, size: int, progress: bool = False):
        """Download (or resume, or find cached) this device's shard; returns TransferStats."""
        from tpi.transport.transfer import fetch_shard

        self._drop_stale_replies()
        return fetch_shard(Path(dest), expected_hash, size, self.send,
                           lambda: self.reply(self.settings.step_timeout_s, "a shard chunk"),
                           self.settings.chunk_bytes, progress)

    def master_lost(self) -> str | None:
        """Why the master counts as lost (silent, stopped, refused), or None while it is alive."""
        return self._lost_reason

    def master_stopped(self) -> str | None:
        """The reason of the Stop the master sent on the control channel, or None."""
        return self._stop_reason

    def data_socket(self) -> zmq.Socket:
        """The data-channel DEALER (connected once, owned by the caller's thread from then on)."""
        if self.assign is None:
            raise GroupError("join the group before opening the data channel")
        if self.data is None:
            self.data = self._socket(zmq.DEALER)
            self.data.routing_id = self.assign.peer_id.encode()
            self.data.connect(self._data_endpoint or f"tcp://{self.host}:{self.assign.data_port}")
        return self.data

    def communicator(self):
        """This rank's StarWorker on the data channel; announces Ready to the master."""
        from tpi.transport.allreduce import StarWorker

        a = self.assign
        if a is None:
            raise GroupError("join the group before opening the data channel")
        comm = StarWorker(self.data_socket(), a.rank, a.world, a.wire_dtype, self.master_lost,
                          self.settings.step_timeout_s, self.settings.max_frame)
        comm.announce_ready()
        return comm

    def close(self) -> None:
        """Say goodbye to the master (if admitted), then release sockets and threads."""
        if self._closed:
            return
        self._closed = True
        if self.assign is not None and self._lost_reason is None and not self._stopping.is_set():
            try:
                self.send(Stop("device is leaving"))
            except GroupError:
                pass  # keeper already failed and logged why; nothing left to tell the master
        time.sleep(0.05)  # let the keeper flush the goodbye
        self.stop()
        if self.data is not None:
            self.data.close(0)
        self._ctx.term()

    # ---- keeper thread ----

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self._control, self._wake_pull, self._monitor):
            poller.register(sock, zmq.POLLIN)
        next_beat = time.monotonic() + self._heartbeat_s
        while not self._stopping.is_set():
            events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
            if self._wake_pull in events:
                self._drain_commands()
            if self._monitor in events:
                self._on_monitor()
            if self._control in events:
                self._drain_control()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self._heartbeat_s
                if self.assign is not None and self._lost_reason is None:
                    if now - self._last_seen > self._timeout_s:
                        self._lost_reason = f"master silent for {now - self._last_seen:.1f}s"
                        log.warning("lost the master at %s:%d: %s", self.host, self.port, self._lost_reason)
                    else:
                        self._control.send_multipart(encode(Heartbeat()))
        self._control.disable_monitor()
        self._monitor.close(0)
        self._control.close(0)

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(self._monitor)
        if self._handshake_error is not None:
            return  # libzmq retries the connection; one warning is enough
        self._handshake_error = (
            f"encrypted handshake with {self.host}:{self.port} failed (event {event['event']}): "
            "the token belongs to another master, or its key changed; get the current token")
        log.warning(self._handshake_error)

    def _on_control(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = decode([f.buffer for f in frames], self.settings.max_frame)
        except ProtocolError as e:
            log.warning("dropped malformed message from master %s:%d: %s", self.host, self.port, e)
            return
        self._last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, ShardChunk) and msg.shard_hash == PROBE_HASH:
            self._control.send_multipart(encode(ShardRequest(PROBE_HASH, msg.offset, 0, True)))
            return
        if isinstance(msg, Assign):
            self.assign = msg
            self._heartbeat_s = msg.heartbeat_s  # the master's pace: it times us out by it
            # Our own timeout must outlast two of the master's beats, or a live master looks lost.
            self._timeout_s = msg.timeout_s if self._timeout_from_master else max(
                self.settings.timeout_s, 2 * msg.heartbeat_s)
        elif isinstance(msg, Stop):
            self._stop_reason = msg.reason
            self._lost_reason = f"master stopped the group: {msg.reason}"
            log.debug(self._lost_reason)  # a deliberate Stop, not a fault: the worker reports it once
            return
        elif (isinstance(msg, Refuse) and self.assign is not None
              and msg.reason.startswith((NOT_ADMITTED, VERSION_REFUSAL))):
            # The master answers our heartbeats as a stranger's: it restarted and forgot us. Its
            # replies keep us from timing out, so this is the only sign we get. (Other refusals
            # after admission, e.g. of a wrong shard range, answer a request and go to reply().)
            if self._lost_reason is None:
                self._lost_reason = f"the master no longer knows this device (it restarted?): {msg.reason}"
                log.warning("lost the master at %s:%d: %s", self.host, self.port, self._lost_reason)
            return
        self._replies.put(msg)
