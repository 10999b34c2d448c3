"""Per-device shard store: one self-contained file of layer blocks in the kernels' own layout.

Layout (little endian), see docs/architecture.md "Shard store format":
  [0, 64)          fixed header: magic, version, alignment, index offset/size, content hash
  [ALIGN, ...)     one region per block, each starting on an ALIGN boundary, arrays inside a
                   region start on 64-byte boundaries
  [index_offset..] JSON index: meta, and per block its offset, size, SHA-256 and tensors
The content hash is SHA-256 of the index bytes; the index holds every region's SHA-256, so it
covers the whole payload. SHA-256 rather than blake2b: with hardware SHA extensions (x86 here,
ARMv8 phones) it hashed 770 MiB/s against 410. The same file is the master's own shard and
what a worker receives.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from tpi.errors import ModelFormatError

MAGIC = b"TPISTORE"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")  # magic, version, alignment, index_offset, index_nbytes, hash
# Regions align to 64 KiB: a multiple of every common page size (4K x86, 16K Apple/Android
# arm64, 64K some arm64 kernels), so a store written on one device maps page-aligned on another.
ALIGN = 1 << 16
ARRAY_ALIGN = 64
_DTYPE_KINDS = "biufc"  # plain numeric dtypes; bf16 travels as uint16 bits
_HASH_CHUNK = 8 << 20
_IOV_MAX = 1024  # POSIX minimum is 16, Linux and macOS allow 1024; a block has a few dozen arrays


MADV_POPULATE_READ = 22  # linux/mman.h: prefault page tables, reading what is not cached


def _content_hasher() -> "hashlib._Hash":
    return hashlib.sha256()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class StoreInfo:
    """What `write_store` produced: the file, its content hash and per-block sizes."""

    path: Path
    content_hash: str  # hex SHA-256 of the index (which holds every region's SHA-256)
    nbytes: int  # file size
    block_nbytes: Mapping[str, int]  # in store (execution) order


def _is_qtensor(t: object) -> bool:
    # Duck-typed so the store needs no import of tpi.quant at write time.
    return all(hasattr(t, a) for a in ("fmt", "shape", "arrays")) and not isinstance(t, np.ndarray)


def _as_stored_array(a: np.ndarray, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in _DTYPE_KINDS:
        raise ModelFormatError(
            f"{where} has dtype {a.dtype}, which a shard store cannot hold; store plain numeric "
            "arrays (bf16 as uint16 bits)"
        )
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d shapes


def write_store(
    path: str | os.PathLike,
    meta: dict,
    blocks: Iterable[tuple[str, Mapping[str, object]]],
    progress: Callable[[str, int], None] | None = None,
) -> StoreInfo:
    """Write blocks (key -> {name: QTensor | ndarray}) to one store file; atomic via rename.

    `progress(key, bytes_written_so_far)` is called after each block.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        meta_json = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"shard store meta must be JSON-able: {e}; pass plain dicts, lists, "
                               "strings and numbers") from e
    entries: list[dict] = []
    zeros = bytes(ALIGN)
    try:
        with open(partial, "wb") as f:
            f.write(zeros)  # header placeholder; regions start at ALIGN
            pos = ALIGN
            for key, tensors in blocks:
                if not isinstance(key, str) or not key or any(e["key"] == key for e in entries):
                    raise ModelFormatError(f"block key {key!r} is empty, not a string or repeated; "
                                           "give each block a unique key like 'L0.attn'")
                entry, nbytes = _write_region(f, key, tensors)
                entry["offset"] = pos
                entries.append(entry)
                pad = _round_up(nbytes, ALIGN) - nbytes
                f.write(zeros[:pad])
                pos += nbytes + pad
                if progress is not None:
                    progress(key, pos)
            index = json.dumps(
                {"meta": meta_json, "blocks": entries}, separators=(",", ":")
            ).encode()
            f.write(index)
            digest = _content_hasher()
            digest.update(index)
            f.seek(0)
            f.write(HEADER.pack(MAGIC, VERSION, ALIGN, pos, len(index), digest.digest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return StoreInfo(
        path=path, content_hash=digest.hexdigest(), nbytes=pos + len(index),
        block_nbytes={e["key"]: e["nbytes"] for e in entries},
    )


def _write_region(f, key: str, tensors: Mapping[str, object]) -> tuple[dict, int]:
    """Write one block's arrays back to back (64-byte aligned); return its index entry."""
    region_hash = _content_hasher()
    rel = 0
    specs: list[dict] = []

    def put(a: np.ndarray) -> dict:
        nonlocal rel
        pad = _round_up(rel, ARRAY_ALIGN) - rel
        if pad:
            f.write(bytes(pad))
            region_hash.update(bytes(pad))
            rel += pad
        spec = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": rel}
        raw = memoryview(a.reshape(-1)).cast("B")
        f.write(raw)
        region_hash.update(raw)
        rel += a.nbytes
        return spec

    for name, t in tensors.items():
        where = f"block '{key}' tensor '{name}'"
        if _is_qtensor(t):
            arrays = {an: put(_as_stored_array(a, f"{where} array '{an}'"))
                      for an, a in t.arrays.items()}
            specs.append({"name": name, "fmt": str(t.fmt),
                          "shape": [int(d) for d in t.shape], "arrays": arrays})
        elif isinstance(t, np.ndarray):
            specs.append({"name": name, "array": put(_as_stored_array(t, where))})
        else:
            raise ModelFormatError(f"{where} is a {type(t).__name__}; a block holds QTensor or "
                                   "numpy arrays only")
    return {"key": key, "nbytes": rel, "hash": region_hash.hexdigest(), "tensors": specs}, rel


def _qtensor(fmt: str, shape: tuple[int, ...], arrays: dict[str, np.ndarray]) -> object:
    from tpi.quant.formats import QTensor  # torch-free; late so writing needs no tpi.quant

    return QTensor(fmt=fmt, shape=shape, arrays=arrays)


class ShardStore:
    """An open shard store: read blocks as owned copies or mmap views, drop their pages."""

    def __init__(self, path: Path, fd: int, file_nbytes: int, content_hash: str, index: dict):
        self.path = path
        self.nbytes = file_nbytes
        self.content_hash = content_hash
        self.meta: dict = index["meta"]
        self._fd = fd
        self._blocks: dict[str, dict] = {b["key"]: b for b in index["blocks"]}
        self._mmap: mmap.mmap | None = None
        self._lock = threading.Lock()

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> "ShardStore":
        """Open and check header, size and index hash; `verify=True` also hashes every block."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelFormatError(f"shard store {path} does not exist; write it with write_store "
                                   "or transfer the shard again") from None
        try:
            store = cls._from_fd(path, fd)
        except BaseException:
            os.close(fd)
            raise
        if verify:
            store.verify()
        return store

    @classmethod
    def _from_fd(cls, path: Path, fd: int) -> "ShardStore":
        size = os.fstat(fd).st_size
        fix = f"delete {path} and re-create or transfer the shard again"
        head = os.pread(fd, HEADER.size, 0)
        if len(head) < HEADER.size:
            raise ModelFormatError(f"shard store {path} is truncated ({size} bytes, shorter than "
                                   f"its {HEADER.size}-byte header); {fix}")
        magic, version, align, index_offset, index_nbytes, digest = HEADER.unpack(head)
        if magic != MAGIC:
            raise ModelFormatError(f"{path} is not a tpi shard store (magic {magic!r}, expected "
                                   f"{MAGIC!r}); {fix}")
        if version != VERSION:
            raise ModelFormatError(f"shard store {path} has format version {version}; this tpi "
                                   f"reads version {VERSION}; {fix}")
        expected = index_offset + index_nbytes
        if size < expected:
            raise ModelFormatError(f"shard store {path} is truncated: {size} bytes of the "
                                   f"{expected} its header promises; {fix}")
        if size > expected or not align or align % mmap.ALLOCATIONGRANULARITY or index_offset % align:
            raise ModelFormatError(f"shard store {path} is corrupted: header does not match the "
                                   f"file ({size} bytes, index at {index_offset}); {fix}")
        index_bytes = os.pread(fd, index_nbytes, index_offset)
        found = _content_hasher()
        found.update(index_bytes)
        if found.digest() != digest:
            raise ModelFormatError(f"shard store {path} is corrupted: its index does not match "
                                   f"the content hash {digest.hex()[:16]}...; {fix}")
        index = json.loads(index_bytes)
        for b in index["blocks"]:  # the hash matched, so these guard against writer bugs only
            assert b["offset"] % align == 0 and b["offset"] + b["nbytes"] <= index_offset
        return cls(path, fd, size, digest.hex(), index)

    # -- queries -----------------------------------------------------------------------------
    def keys(self) -> tuple[str, ...]:
        """Block keys in store (execution) order."""
        return tuple(self._blocks)

    def block_nbytes(self, key: str) -> int:
        return self._entry(key)["nbytes"]

    def block_sizes(self) -> list[tuple[str, int]]:
        """(key, nbytes) in store order: the input `plan_window` takes."""
        return [(k, b["nbytes"]) for k, b in self._blocks.items()]

    def _entry(self, key: str) -> dict:
        try:
            return self._blocks[key]
        except KeyError:
            raise ModelFormatError(f"shard store {self.path} has no block '{key}' (it holds "
                                   f"{', '.join(self._blocks)}); re-create the shard for this "
                                   "plan") from None

    # -- loading -----------------------------------------------------------------------------
    def load(self, key: str, copy: bool = True) -> dict[str, object]:
        """Block as {name: QTensor | ndarray}.

        copy=True reads the region with one preadv into fresh buffers the arrays own, one per
        array (the bytes are in memory on return; for pinned and prefetched blocks). copy=False returns read-only views
        of a shared mmap, paged in lazily on first touch.
        """
        entry = self._entry(key)
        owned = self._read_arrays(entry) if copy else None
        mapping = None if copy else self._mapping()

        def view(spec: dict) -> np.ndarray:
            dtype = np.dtype(spec["dtype"])
            shape = tuple(spec["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if count == 0:
                return np.empty(shape, dtype)
            if owned is not None:
                return owned[spec["offset"]].view(dtype).reshape(shape)
            return np.frombuffer(mapping, dtype, count, entry["offset"] + spec["offset"]).reshape(shape)

        out: dict[str, object] = {}
        for t in entry["tensors"]:
            if "array" in t:
                out[t["name"]] = view(t["array"])
            else:
                arrays = {an: view(spec) for an, spec in t["arrays"].items()}
                out[t["name"]] = _qtensor(t["fmt"], tuple(t["shape"]), arrays)
        return out

    def release(self, key: str, drop_cache: bool = True) -> None:
        """Drop this block's pages from the mapping and, unless drop_cache=False, the page cache."""
        entry = self._entry(key)
        start, length = entry["offset"], _round_up(max(entry["nbytes"], 1), mmap.PAGESIZE)
        with self._lock:
            mapping = self._mmap
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED, start, min(length, self.nbytes - start))
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)

    def fileno(self) -> int:
        return self._fd

    def file_offset(self, a: np.ndarray) -> int:
        """Where in the file an array returned by load(copy=False) starts."""
        base = np.frombuffer(self._mapping(), np.uint8, 1).__array_interface__["data"][0]
        offset = a.__array_interface__["data"][0] - base
        if not 0 <= offset <= self.nbytes - a.nbytes:
            raise ValueError(f"the array is not a view of shard store {self.path}")
        return offset

    def populate(self, key: str) -> None:
        """Map this block's pages into the shared mmap now (reading them if they are not cached),
        so that compute on mmap views (load(copy=False)) takes no page faults."""
        entry = self._entry(key)
        self._populate(entry["offset"], entry["nbytes"])

    def populate_array(self, a: np.ndarray) -> None:
        """populate() for one array returned by load(copy=False)."""
        self._populate(self.file_offset(a), a.nbytes)

    def _populate(self, offset: int, nbytes: int) -> None:
        start = offset - offset % mmap.PAGESIZE
        length = min(_round_up(offset + max(nbytes, 1) - start, mmap.PAGESIZE), self.nbytes - start)
        mapping = self._mapping()
        try:
            mapping.madvise(MADV_POPULATE_READ, start, length)  # Linux >= 5.14: one call
            return
        except (AttributeError, OSError, ValueError):
            pass  # older kernel or another OS: touch one byte per page instead
        view = np.frombuffer(mapping, np.uint8, length, start)
        int(view[:: mmap.PAGESIZE].sum())

    def will_need(self, key: str) -> None:
        """Hint the kernel to start reading this block in the background (no-op off Linux)."""
        entry = self._entry(key)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, entry["offset"], entry["nbytes"], os.POSIX_FADV_WILLNEED)

    def verify(self) -> None:
        """Recompute every block's hash; raise ModelFormatError naming the first bad block."""
        buf = bytearray(min(_HASH_CHUNK, max((b["nbytes"] for b in self._blocks.values()),
                                             default=1)) or 1)
        mv = memoryview(buf)
        for key, entry in self._blocks.items():
            h = _content_hasher()
            done = 0
            while done < entry["nbytes"]:
                n = min(len(buf), entry["nbytes"] - done)
                self._read_into(mv[:n], entry["offset"] + done)
                h.update(mv[:n])
                done += n
            if hasattr(os, "posix_fadvise"):  # hashing should not leave the model in cache
                os.posix_fadvise(self._fd, entry["offset"], entry["nbytes"],
                                 os.POSIX_FADV_DONTNEED)
            if h.hexdigest() != entry["hash"]:
                raise ModelFormatError(
                    f"shard store {self.path} is corrupted: block '{key}' does not match its hash "
                    f"(expected {entry['hash'][:16]}..., found {h.hexdigest()[:16]}...); delete "
                    "the file and re-create or transfer the shard again"
                )

    def _read_arrays(self, entry: dict) -> dict[int, np.ndarray]:
        """Read a region with one preadv into a separate 64-byte-aligned buffer per array.

        Separate buffers let a runtime that converts an array (the torch int4 repack) free the
        stored bytes, where one shared region buffer would stay alive through any other view.
        Returns {offset in region: uint8 array}; padding between arrays goes to a scratch buffer.
        """
        specs = []
        for t in entry["tensors"]:
            specs += [t["array"]] if "array" in t else list(t["arrays"].values())
        spans = sorted({(s["offset"], np.dtype(s["dtype"]).itemsize
                         * int(np.prod(s["shape"], dtype=np.int64))) for s in specs})
        owned: dict[int, np.ndarray] = {}
        iov: list[memoryview] = []
        pos = 0
        scratch = np.empty(ARRAY_ALIGN, np.uint8)  # gaps are < ARRAY_ALIGN bytes
        for start, nbytes in spans:
            if nbytes == 0:
                continue
            assert start >= pos and start - pos < ARRAY_ALIGN, "arrays overlap or a gap is too wide"
            if start > pos:
                iov.append(memoryview(scratch[: start - pos]))
            raw = np.empty(nbytes + ARRAY_ALIGN, np.uint8)
            shift = (-raw.ctypes.data) % ARRAY_ALIGN
            owned[start] = raw[shift:shift + nbytes]
            iov.append(memoryview(owned[start]))
            pos = start + nbytes
        self._read_iov(iov, entry["offset"])
        return owned

    def _read_iov(self, iov: list[memoryview], offset: int) -> None:
        done, total = 0, sum(len(b) for b in iov)
        while done < total:  # preadv may return short; resume inside the right buffer
            skip, rest = done, []
            for b in iov:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                rest.append(b[skip:])
                skip = 0
            n = os.preadv(self._fd, rest[:_IOV_MAX], offset + done)
            if n == 0:
                raise ModelFormatError(f"shard store {self.path} ended early at byte "
                                       f"{offset + done}; the file was truncated after opening")
            done += n

    def _read_into(self, dest: memoryview, offset: int) -> None:
        done = 0
        while done < len(dest):  # a single read may return short (Linux caps at ~2 GiB)
            n = os.preadv(self._fd, [dest[done:]], offset + done)
            if n == 0:
                raise ModelFormatError(f"shard store {self.path} ended early at byte "
                                       f"{offset + done}; the file was truncated after opening")
            done += n

    def _mapping(self) -> mmap.mmap:
        with self._lock:
            if self._mmap is None:
                self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            return self._mmap

    def close(self) -> None:
        """Close the file; mmap views still alive keep their mapping until they are dropped."""
        with self._lock:
            mapping, self._mmap = self._mmap, None
            fd, self._fd = self._fd, -1
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # numpy views still export it; it is unmapped when the last one goes
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verified_content_hash(path: str | os.PathLike) -> str | None:
    """The content hash of a complete, intact shard store (every block re-hashed); None for any other file.

    A shard's one identity: written into its header once, sent in Assign, and the worker's cache key.
    """
    try:
        with ShardStore.open(path, verify=True) as store:
            return store.content_hash
    except ModelFormatError:
        return None
