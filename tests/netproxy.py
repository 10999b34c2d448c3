"""A userspace TCP proxy that adds one-way delay each direction and can record every byte.

netem is missing on these machines, so tests and benchmarks emulate a slower link with this.
Each accepted connection gets one thread per direction reading from its source, and one per
direction writing each chunk once its delay has passed, so delay does not cap throughput.
An optional bandwidth caps each direction of each connection: a chunk leaves once the link
has carried the chunks before it at that rate, then travels the delay.
"""
from __future__ import annotations

import collections
import socket
import threading
import time

_CHUNK = 256 * 1024


class _Pipe:
    """One direction of one connection: read, hold for the delay, write."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float,
                 record: list | None, lock: threading.Lock, bytes_per_s: float | None = None):
        self._src, self._dst, self._delay = src, dst, delay_s
        self._rate, self._free_at = bytes_per_s, 0.0  # when the capped link has sent what it holds
        self._record, self._lock = record, lock
        self._queue: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while data := self._src.recv(_CHUNK):
                if self._record is not None:
                    with self._lock:
                        self._record.append(data)
                sent = time.monotonic()
                if self._rate:
                    self._free_at = max(sent, self._free_at) + len(data) / self._rate
                    sent = self._free_at
                with self._ready:
                    self._queue.append((sent + self._delay, data))
                    self._ready.notify()
        except OSError:
            pass  # the other side closed or stop() shut the socket: the pipe just ends
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _write(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._queue and not self._closed:
                        self._ready.wait()
                    if not self._queue:
                        break
                    due, data = self._queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._dst.sendall(data)
            self._dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # destination vanished; the reader side sees it too


class DelayProxy:
    """Forward 127.0.0.1:listen_port to target_host:target_port with one-way delay each way
    (and, with mbit_s, that bandwidth each way of each connection)."""

    def __init__(self, listen_port: int, target_host: str, target_port: int,
                 one_way_delay_s: float = 0.0, record_to: list | None = None, mbit_s: float | None = None):
        self._target = (target_host, target_port)
        self._delay = one_way_delay_s
        self._rate = mbit_s * 1e6 / 8 if mbit_s else None
        self._record = record_to
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", listen_port))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._pipes: list[_Pipe] = []
        self._stopped = False
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> "DelayProxy":
        self._accept_thread.start()
        return self

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def recorded(self) -> bytes:
        """Everything recorded so far, both directions concatenated in arrival order."""
        with self._lock:
            return b"".join(self._record or [])

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            self._pipes.append(_Pipe(client, upstream, self._delay, self._record, self._lock, self._rate))
            self._pipes.append(_Pipe(upstream, client, self._delay, self._record, self._lock, self._rate))

    def stop(self) -> None:
        """Close the listener and every forwarded connection, and join the threads."""
        self._stopped = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass  # never connected: nothing to wake
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its peer
            s.close()
        if self._accept_thread.is_alive():
            self._accept_thread.join(timeout=2)
        for pipe in self._pipes:
            for t in pipe.threads:
                t.join(timeout=2)
