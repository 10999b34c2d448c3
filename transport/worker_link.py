"""The worker's end of a link: join with the token, fetch the shard, keep heartbeats, open the data channel.

See tpi.transport.link for the two channels; the worker's keeper thread owns its control DEALER and
answers heartbeats and link probes, and the caller's thread owns the data DEALER through StarWorker.
"""
from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from tpi.errors import GroupError, NoAnswerError, ProtocolError
from tpi.transport import security
from tpi.transport.star_worker import StarWorker
from tpi.transport.keeper import Keeper, LinkSettings, parse_endpoint, tune_socket
from tpi.transport.protocol import (Assign, Heartbeat, Hello, Message, Probe, ProbeEcho, Refuse, Stop, decode,
                                    encode)
from tpi.transport.transfer import fetch_shard

log = logging.getLogger(__name__)

# The refusals a master sends only to a peer it does not know. An admitted worker that gets
# one is talking to a master that restarted on the same port and has forgotten it.
NOT_ADMITTED = "not admitted: join with a valid token first"
VERSION_REFUSAL = "protocol version mismatch: "


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
        self._stop: Stop | None = None
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

    def fetch_shard(self, dest: Path, expected_hash: str, size: int, identity, progress: bool = False):
        """Download (or resume, or find cached) this device's shard; returns TransferStats.

        identity(path) names a complete file (tpi.transport.transfer.fetch_shard)."""
        self._drop_stale_replies()
        return fetch_shard(Path(dest), expected_hash, size, self.send,
                           lambda: self.reply(self.settings.step_timeout_s, "a shard chunk"), identity,
                           self.settings.chunk_bytes, progress)

    def master_lost(self) -> str | None:
        """Why the master counts as lost (silent, stopped, refused), or None while it is alive."""
        return self._lost_reason

    def master_stopped(self) -> Stop | None:
        """The Stop the master sent on the control channel, or None."""
        return self._stop

    def data_socket(self) -> zmq.Socket:
        """The data-channel DEALER (connected once, owned by the caller's thread from then on)."""
        if self.assign is None:
            raise GroupError("join the group before opening the data channel")
        if self.data is None:
            self.data = self._socket(zmq.DEALER)
            self.data.routing_id = self.assign.peer_id.encode()
            self.data.connect(self._data_endpoint or f"tcp://{self.host}:{self.assign.data_port}")
        return self.data

    def communicator(self) -> StarWorker:
        """This rank's StarWorker on the data channel; announces Ready to the master."""
        a = self.assign
        if a is None:
            raise GroupError("join the group before opening the data channel")
        comm = StarWorker(self.data_socket(), a.rank, a.world, a.wire_dtype, self.master_lost,
                          self.settings.step_timeout_s, self.settings.max_frame, star_only=a.star_only)
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
        if isinstance(msg, Probe):  # answered here, on the keeper thread, so the master times the link alone
            self._control.send_multipart(encode(ProbeEcho(msg.offset)))
            return
        if isinstance(msg, Assign):
            self.assign = msg
            self._heartbeat_s = msg.heartbeat_s  # the master's pace: it times us out by it
            # Our own timeout must outlast two of the master's beats, or a live master looks lost.
            self._timeout_s = msg.timeout_s if self._timeout_from_master else max(
                self.settings.timeout_s, 2 * msg.heartbeat_s)
        elif isinstance(msg, Stop):
            self._stop = msg
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
