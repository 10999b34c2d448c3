"""What both link ends share: settings, endpoint parsing, socket tuning, the keeper thread."""
from __future__ import annotations

import logging
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Callable

import zmq

from tpi.errors import GroupError
from tpi.transport.protocol import DEFAULT_MAX_FRAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSettings:
    """Timing and size limits of a link; the master's heartbeat/timeout are sent to workers."""

    heartbeat_s: float = 1.0
    timeout_s: float = 10.0        # a peer silent this long is lost
    step_timeout_s: float = 300.0  # longest one allreduce/gather/step may wait for a live peer
    join_timeout_s: float = 30.0
    max_frame: int = DEFAULT_MAX_FRAME
    chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class JoinRequest:
    """A device that proved it holds the token and now waits for admit() or refuse()."""

    peer: bytes            # control-channel routing id
    name: str
    profile: dict
    cached_hashes: tuple
    address: str
    device_key: bytes      # Z85 CURVE public key; b"" on insecure links


@dataclass
class PeerRecord:
    """Keeper-owned record of one control-channel peer."""

    name: str
    address: str
    device_key: bytes
    state: str = "pending"  # pending | admitted | lost | closed (its connection closed before admission)
    last_seen: float = 0.0
    peer_id: str = ""


def parse_endpoint(text: str) -> tuple[str, int]:
    """'tcp://host:port' or 'host:port' -> (host, port); raises GroupError if malformed."""
    body = text.removeprefix("tcp://")
    host, sep, port = body.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise GroupError(f"address {text!r} is not HOST:PORT (for example 192.168.1.20:7700)")
    return host.strip("[]"), int(port)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P+1 both free: a master binds its control channel on P and data on P+1."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind((host, 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind((host, port + 1))
                except OSError:
                    continue
                return port
    raise GroupError(f"no two adjacent free ports on {host}")


def tune_socket(sock: zmq.Socket, settings: LinkSettings) -> None:
    sock.linger = 0
    sock.maxmsgsize = settings.max_frame + 65536  # libzmq drops a peer that sends more
    # ZMTP pings let libzmq notice dead TCP connections; app heartbeats name the peer.
    sock.heartbeat_ivl = int(settings.heartbeat_s * 1000)
    sock.heartbeat_timeout = int(settings.timeout_s * 1000)


def frame_meta(frame: zmq.Frame, key: str) -> str:
    try:
        return frame.get(key)
    except zmq.ZMQError:
        return ""


class Keeper:
    """A thread that owns one control socket; other threads hand it work through a queue."""

    def __init__(self, ctx: zmq.Context, name: str):
        self._ctx = ctx
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._wake_pull = ctx.socket(zmq.PULL)
        self._wake_pull.bind(f"inproc://wake-{name}")
        self._wake_push = ctx.socket(zmq.PUSH)
        self._wake_push.connect(f"inproc://wake-{name}")
        self._wake_lock = threading.Lock()
        self._stopping = threading.Event()
        self._closed = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run_guarded, name=f"tpi-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the keeper thread (in submission order)."""
        if self.failure is not None:
            raise GroupError(f"link thread failed: {self.failure}; restart this process")
        self._commands.put(fn)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # wake-ups already queued: the keeper will drain every command anyway

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout=5)
        self._wake_push.close(0)

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception as e:  # a keeper bug must surface to the caller, not vanish
            log.exception("link thread failed")
            self.failure = e
        finally:
            self._wake_pull.close(0)

    def _drain_control(self) -> None:
        """Handle up to 64 waiting control messages, so one busy peer cannot starve the loop."""
        for _ in range(64):
            try:
                frames = self._control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_control(frames)

    def _drain_commands(self) -> None:
        while True:
            try:
                self._wake_pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            fn()

    def _run(self) -> None:
        raise NotImplementedError
