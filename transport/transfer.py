"""Shard streaming: chunked, crc32-checked, resumable, verified against the shard's identity.

The master side (``ShardServer``) answers ``ShardRequest`` with ``ShardChunk`` read from the
registered file. The worker side (``fetch_shard``) downloads into ``dest + '.part'``; on a
restart it first asks the master for checksums of what it already has, keeps the prefix
that matches, then fetches the rest with a few requests in flight, and finally checks the
file's identity against the one the master assigned. What the identity is belongs to the caller
(`identity(path)`): for tpi's shards, the shard store's content hash, re-checked block by block
(tpi.scheduler.store.verified_content_hash).
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tpi.errors import GroupError, ProtocolError
from tpi.transport.protocol import Message, Refuse, ShardChunk, ShardRequest

MAX_CHUNK = 16 << 20        # largest byte range sent in one ShardChunk
MAX_CHECKSUM_SPAN = 64 << 20  # largest range checksummed per request
VERIFY_SPAN = 8 << 20       # resume check granularity
IN_FLIGHT = 4               # requests outstanding while fetching


@dataclass(frozen=True)
class TransferStats:
    """What one fetch did: bytes moved over the network, bytes kept from a partial file."""

    bytes_transferred: int
    bytes_resumed: int
    seconds: float
    cached: bool
    refetched: bool


def _crc_of_file_range(fd: int, offset: int, length: int) -> int:
    crc, done = 0, 0
    while done < length:
        block = os.pread(fd, min(4 << 20, length - done), offset + done)
        if not block:
            break
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc


@dataclass
class _Served:
    path: Path
    fd: int
    size: int
    shard_hash: str
    sent: int = 0


class ShardServer:
    """Master side: which file each peer may read, and the answer to each request."""

    def __init__(self) -> None:
        self._served: dict[bytes, _Served] = {}

    def register(self, peer: bytes, path: Path, expected_hash: str) -> None:
        self.unregister(peer)
        fd = os.open(path, os.O_RDONLY)
        self._served[peer] = _Served(Path(path), fd, os.fstat(fd).st_size, expected_hash)

    def unregister(self, peer: bytes) -> None:
        served = self._served.pop(peer, None)
        if served is not None:
            os.close(served.fd)

    def progress(self) -> dict[bytes, tuple[int, int]]:
        """Per peer: (bytes sent, shard size)."""
        return {p: (s.sent, s.size) for p, s in self._served.items()}

    def answer(self, peer: bytes, req: ShardRequest) -> Message:
        """The chunk for a request, or a Refuse that names what is wrong."""
        served = self._served.get(peer)
        if served is None:
            return Refuse("no shard is being served to this device; rejoin the group")
        if req.shard_hash != served.shard_hash:
            return Refuse(f"shard {req.shard_hash[:12]} is not the one assigned ({served.shard_hash[:12]})")
        limit = MAX_CHECKSUM_SPAN if req.checksum_only else MAX_CHUNK
        if req.length > limit or req.offset + req.length > served.size:
            return Refuse(f"bad shard range {req.offset}+{req.length} (size {served.size}, max {limit})")
        if req.checksum_only:
            crc = _crc_of_file_range(served.fd, req.offset, req.length)
            return ShardChunk(req.shard_hash, req.offset, req.length, crc, np.empty(0, np.uint8))
        data = os.pread(served.fd, req.length, req.offset)
        served.sent += len(data)
        return ShardChunk(req.shard_hash, req.offset, len(data), zlib.crc32(data),
                          np.frombuffer(data, np.uint8))

    def close(self) -> None:
        for peer in list(self._served):
            self.unregister(peer)


# ---- worker side ----

Send = Callable[[Message], None]
Receive = Callable[[], Message]  # next reply from the master; raises GroupError on timeout/loss
Identity = Callable[[Path], "str | None"]  # a complete file's identity, None when it is not a valid one


def _expect_chunk(msg: Message) -> ShardChunk:
    if isinstance(msg, Refuse):
        raise GroupError(f"master refused the shard transfer: {msg.reason}")
    if not isinstance(msg, ShardChunk):
        raise ProtocolError(f"expected a shard chunk, got {type(msg).__name__}")
    return msg


def _verified_prefix(part: Path, expected_hash: str, send: Send, recv: Receive) -> int:
    """Bytes at the start of the partial file that match the master's checksums."""
    have = part.stat().st_size
    spans = [(o, min(VERIFY_SPAN, have - o)) for o in range(0, have, VERIFY_SPAN)]
    for off, length in spans:
        send(ShardRequest(expected_hash, off, length, True))
    good, mismatch = 0, False
    fd = os.open(part, os.O_RDONLY)
    try:
        replies = {}
        for _ in spans:
            chunk = _expect_chunk(recv())
            replies[chunk.offset] = chunk.crc32
        for off, length in spans:  # the first mismatching span and everything after it goes
            if mismatch or replies.get(off) != _crc_of_file_range(fd, off, length):
                mismatch = True
                continue
            good = off + length
    finally:
        os.close(fd)
    return good


def _download(part: Path, start: int, size: int, expected_hash: str, chunk_bytes: int,
              send: Send, recv: Receive, on_bytes: Callable[[int], None]) -> int:
    """Fetch [start, size) into part with IN_FLIGHT requests outstanding; returns bytes moved."""
    chunk_bytes = max(1, min(chunk_bytes, MAX_CHUNK))
    offsets = list(range(start, size, chunk_bytes))
    moved, next_i, outstanding, retries = 0, 0, 0, 0
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, start)
        while next_i < len(offsets) or outstanding:
            while outstanding < IN_FLIGHT and next_i < len(offsets):
                off = offsets[next_i]
                send(ShardRequest(expected_hash, off, min(chunk_bytes, size - off), False))
                next_i, outstanding = next_i + 1, outstanding + 1
            chunk = _expect_chunk(recv())
            outstanding -= 1
            data = chunk.data
            if zlib.crc32(data) != chunk.crc32 or chunk.length != data.size:
                retries += 1
                if retries > 8:
                    raise GroupError("shard chunks keep arriving corrupted; check the link and retry")
                send(ShardRequest(expected_hash, chunk.offset, chunk.length, False))
                outstanding += 1
                continue
            os.pwrite(fd, data, chunk.offset)
            moved += data.size
            on_bytes(data.size)
    finally:
        os.close(fd)
    return moved


def fetch_shard(dest: Path, expected_hash: str, size: int, send: Send, recv: Receive, identity: Identity,
                chunk_bytes: int = 1 << 20, progress: bool = False) -> TransferStats:
    """Make dest hold the shard whose identity is expected_hash, fetching only what is missing."""
    t0 = time.perf_counter()
    dest = Path(dest)
    if dest.exists() and dest.stat().st_size == size and identity(dest) == expected_hash:
        return TransferStats(0, 0, time.perf_counter() - t0, cached=True, refetched=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists() and part.stat().st_size > size:
        part.unlink()
    try:
        return _fetch_into(dest, part, expected_hash, size, send, recv, identity, chunk_bytes, progress, t0)
    finally:
        if part.exists() and part.stat().st_size == 0:
            part.unlink()  # nothing arrived: leave no trace


def _fetch_into(dest: Path, part: Path, expected_hash: str, size: int, send: Send, recv: Receive,
                identity: Identity, chunk_bytes: int, progress: bool, t0: float) -> TransferStats:
    resumed = _verified_prefix(part, expected_hash, send, recv) if part.exists() else 0
    moved, refetched = 0, False
    with _progress_bar(progress, dest.name, size, resumed) as on_bytes:
        for attempt in range(2):
            moved += _download(part, resumed, size, expected_hash, chunk_bytes, send, recv, on_bytes)
            if identity(part) == expected_hash:
                break
            if attempt == 1:
                part.unlink()
                raise GroupError(
                    f"shard {dest.name} fails its identity check after a full refetch; "
                    "the master's shard file differs from its assignment: restart tpi serve"
                )
            resumed, refetched = 0, True  # corrupt somewhere we did not detect: refetch all
    os.replace(part, dest)
    return TransferStats(moved, resumed, time.perf_counter() - t0, cached=False, refetched=refetched)


class _progress_bar:
    """Rich progress for a download when enabled, else a no-op byte counter."""

    def __init__(self, enabled: bool, name: str, total: int, done: int):
        self._enabled, self._name, self._total, self._done = enabled, name, total, done
        self._progress = None

    def __enter__(self) -> Callable[[int], None]:
        if not self._enabled:
            return lambda n: None
        # rich draws the bar on a terminal only; a headless worker never imports it
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TransferSpeedColumn)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn())
        self._progress.start()
        task = self._progress.add_task(f"shard {self._name}", total=self._total, completed=self._done)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
