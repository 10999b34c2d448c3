"""Streamed ggml weights in the repacked (CPU_REPACK) layout, without a copy or a repack per load.

A weight ggml repacks (Q4_0, Q4_K, IQ4_NL, N % 8 == 0, AVX2) computes ~1.3x faster in the 8x8
interleaved layout, but repacking costs ~140 ms per Llama-2-7B layer (10x its compute) and even
copying ready-repacked bytes costs more than computing them (20-24 ms against 15 ms per layer).
So a streamed block's repacked tensors are the file's own pages: the shard's kernel-layout copy
(tpi.model.weights.kernel_layout_store) holds the repacked bytes, and the loader maps them with
MAP_FIXED | MAP_POPULATE over page-aligned room inside a CPU_REPACK buffer, at the tensor's address
in that buffer. ggml sees an ordinary repacked tensor (its buffer type and traits are its own);
the pages stay the page cache's. When the block is released the room is mapped anonymous again
before the buffer goes back to ggml.

Linux only (elsewhere a streamed block binds plain rows); the repacked bytes are read back from
ggml's own repack, and `repack_round_trip_ok` checks once per process that mapped bytes compute
what ggml's repack computes.
"""
from __future__ import annotations

import ctypes as C
import functools
import mmap
import os
import sys
import weakref
from dataclasses import replace

import numpy as np

from tpi.quant.ggml_backend import (GGML_PREFIX, GgmlBackend, GgmlWeight, _name, _repack_buffer_type, can_repack,
                                    weight_type)
from tpi.quant.ggml_graph import Context, GgmlShapeError
from tpi.quant.ggml_lib import STATUS_SUCCESS

PAGE = mmap.PAGESIZE
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_POPULATE = 0x02, 0x10, 0x20, 0x8000


MADV_DONTNEED, MADV_POPULATE_READ = 4, 22


@functools.cache
def _libc():
    libc = C.CDLL(None, use_errno=True)
    libc.mmap.restype = C.c_void_p
    libc.mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
    libc.madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
    return libc


def page_range(addr: int, nbytes: int) -> tuple[int, int]:
    """(start, length) of the whole pages holding [addr, addr + nbytes)."""
    start = addr - addr % PAGE
    return start, -(-(addr + nbytes - start) // PAGE) * PAGE


def populate(ranges) -> None:
    """Map file pages back in (reading what the page cache lacks): ctypes drops the GIL meanwhile."""
    libc = _libc()
    for start, length in ranges:
        if libc.madvise(start, length, MADV_POPULATE_READ) != 0:  # before Linux 5.14: touch each page
            view = np.frombuffer((C.c_uint8 * length).from_address(start), np.uint8)
            int(view[::PAGE].sum())


def drop(ranges) -> None:
    """Unmap file pages from this process (the page cache keeps them): out of the resident set."""
    libc = _libc()
    for start, length in ranges:
        libc.madvise(start, length, MADV_DONTNEED)


def remap_supported() -> bool:
    return sys.platform.startswith("linux")


def repacked_rows(backend: GgmlBackend, qt):
    """qt with its data replaced by ggml's CPU_REPACK bytes (same fmt, shape and size); qt itself
    when ggml does not repack it here."""
    if not qt.fmt.startswith(GGML_PREFIX):
        return qt
    w = backend.weight(qt, repack=True)
    if not w.repacked:
        return qt
    addr = backend.lib.ggml_get_data(w.tensor.ptr)
    packed = np.frombuffer((C.c_uint8 * w.tensor.nbytes).from_address(addr), np.uint8).copy()
    return replace(qt, arrays={"data": packed.reshape(qt.arrays["data"].shape)})


def _check(backend: GgmlBackend, qt) -> tuple[int, Context, object]:
    """(type, context, tensor) for a weight whose data are already ggml's repacked bytes."""
    n, k = qt.shape
    gtype = weight_type(qt.fmt)
    if gtype is None or not can_repack(gtype, n, backend.lib):
        raise GgmlShapeError(f"{qt.fmt} [{n}, {k}] has no repacked layout here")
    ctx = Context(1, lib=backend.lib)
    t = ctx.new(gtype, k, n)
    if t.nbytes != qt.arrays["data"].nbytes:
        raise GgmlShapeError(f"a repacked {qt.fmt} weight needs {t.nbytes} bytes, the store has "
                             f"{qt.arrays['data'].nbytes}; the kernel-layout file is corrupt: delete it")
    return gtype, ctx, t


def copied_repacked(backend: GgmlBackend, qt) -> GgmlWeight:
    """A resident weight from repacked bytes: copied into a CPU_REPACK buffer, not repacked again."""
    lib = backend.lib
    gtype, ctx, t = _check(backend, qt)
    buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, _repack_buffer_type(lib))
    if not buffer:
        raise MemoryError(f"ggml could not allocate {t.nbytes} bytes for a weight")
    ctx.own_buffer(buffer)
    data = np.ascontiguousarray(qt.arrays["data"])
    C.memmove(lib.ggml_get_data(t.ptr), data.__array_interface__["data"][0], t.nbytes)
    return GgmlWeight(qt.fmt, f"ggml-{_name(gtype)}-repacked", qt.shape[1], qt.shape[0], t, ctx)


def _restore(lib, buffer: int, room: int, length: int) -> None:
    """Give the room back to the allocator as ordinary memory, then free the ggml buffer."""
    got = _libc().mmap(room, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS, -1, 0)
    if got != room:  # cannot happen for a range we mapped; never hand file pages to malloc
        os.abort()
    lib.ggml_backend_buffer_free(buffer)


def mapped_repacked(backend: GgmlBackend, qt, fd: int, offset: int) -> GgmlWeight:
    """A weight whose repacked bytes sit at `offset` in file `fd`, mapped into a CPU_REPACK buffer."""
    lib = backend.lib
    gtype, ctx, t = _check(backend, qt)
    if not remap_supported() or offset < 0:
        raise GgmlShapeError(f"cannot map a {qt.fmt} weight from a file on {sys.platform}")
    n, k = qt.shape
    slack = offset % PAGE
    length = -(-(slack + t.nbytes) // PAGE) * PAGE
    buffer = lib.ggml_backend_buft_alloc_buffer(_repack_buffer_type(lib), length + PAGE)
    if not buffer:
        raise MemoryError(f"ggml could not reserve {length + PAGE} bytes of address space for a weight")
    room = -(-lib.ggml_backend_buffer_get_base(buffer) // PAGE) * PAGE  # whole pages inside the buffer
    got = _libc().mmap(room, length, PROT_READ, MAP_PRIVATE | MAP_FIXED | MAP_POPULATE, fd, offset - slack)
    if got != room:
        lib.ggml_backend_buffer_free(buffer)
        raise OSError(C.get_errno(), f"mapping a weight from the shard's kernel layout failed: "
                                     f"{os.strerror(C.get_errno())}")
    weakref.finalize(ctx, _restore, lib, buffer, room, length)  # when the block holding the weight goes
    if lib.ggml_backend_tensor_alloc(buffer, t.ptr, room + slack) != STATUS_SUCCESS:
        raise GgmlShapeError(f"ggml refused a mapped {qt.fmt} weight")
    return GgmlWeight(qt.fmt, f"ggml-{_name(gtype)}-repacked-mapped", k, n, t, ctx, pages=(room, length))
