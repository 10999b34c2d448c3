"""Checked ggml graph building over numpy memory: contexts, bound arrays, ops, graphs, the CPU runtime.

Each op method checks in Python what ggml would GGML_ASSERT (and abort the process on): types,
shapes, broadcast rules, view bounds, context capacity. A failed check raises GgmlShapeError.
Tensors are referred to by `Tensor` handles that mirror ggml's type / ne / nb.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from tpi.errors import ShapeError
from tpi.quant.ggml_lib import (F16, F32, I32, I64, MATMUL_TYPES, MAX_DIMS, PREC_F32, STATUS_SUCCESS, TYPE_NAMES,
                                TYPES, InitParams, load_ggml)

_NUMPY_TYPES = {F32: np.float32, F16: np.float16, I32: np.int32, I64: np.int64}
_BLOCKS = {tid: (block, nbytes) for tid, block, nbytes in TYPES.values()}
BUFFER_ALIGN = 64  # ggml_backend_cpu_buffer_from_ptr aborts unless the buffer base is 32-byte aligned


class GgmlShapeError(ShapeError):
    """A ggml call was refused before it was made: it would have failed a ggml assert."""


def type_name(t: int) -> str:
    return TYPE_NAMES.get(t, f"type {t}")


class Tensor:
    """A ggml tensor handle: pointer plus its type, ne and nb (ggml order: ne[0] is the fastest dim)."""

    __slots__ = ("ptr", "type", "ne", "nb", "owner", "__weakref__")

    def __init__(self, lib, ptr: int, owner: "Context"):
        h = lib.head(ptr)
        self.ptr, self.type, self.ne, self.nb = ptr, h.type, tuple(h.ne), tuple(h.nb)
        self.owner = owner  # the context the tensor lives in; a graph using it keeps it alive

    @property
    def nbytes(self) -> int:
        """ggml_nbytes: the byte extent of the tensor's data, strides included."""
        if min(self.ne) <= 0:
            return 0
        block, size = _BLOCKS[self.type]
        if block == 1:
            return size + sum((n - 1) * s for n, s in zip(self.ne, self.nb))
        return self.ne[0] * self.nb[0] // block + sum((n - 1) * s for n, s in zip(self.ne[1:], self.nb[1:]))

    def contiguous(self, from_dim: int = 0) -> bool:
        """ggml_is_contiguous_m_n(t, from_dim, 4): dims above from_dim packed, rows packed."""
        block, size = _BLOCKS[self.type]
        if self.ne[0] != block and self.nb[0] != size:
            return False
        expect = size * (self.ne[0] // block)
        for i in range(1, MAX_DIMS):
            if i > from_dim:
                if self.ne[i] != 1 and self.nb[i] != expect:
                    return False
                expect *= self.ne[i]
            else:
                expect = self.ne[i] * self.nb[i]
        return True

    def __repr__(self) -> str:
        return f"<{type_name(self.type)} {list(self.ne)}>"


def _fail(what: str) -> GgmlShapeError:
    return GgmlShapeError(f"ggml refused {what}; this is a tpi bug or a corrupt weight, please report it")


def array_address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]  # also works for read-only maps


def _free_context(lib, ctx: int, buffers: list[int]) -> None:
    for buf in buffers:
        lib.ggml_backend_buffer_free(buf)  # a from_ptr buffer frees its struct, never the numpy memory
    lib.ggml_free(ctx)


class Context:
    """A metadata-only ggml context (tensors point at numpy memory or an allocator's buffer).

    `n_tensors` bounds the tensors created in it (ggml aborts past its memory pool); `graph_size`
    reserves room for one graph of that many nodes.
    """

    def __init__(self, n_tensors: int, graph_size: int = 0, lib=None):
        self.lib = lib or load_ggml()
        self.capacity, self.used, self.graph_size = n_tensors, 0, graph_size
        mem = n_tensors * self.lib.tensor_overhead
        if graph_size:
            mem += self.lib.ggml_graph_overhead_custom(graph_size, False)
        self.ptr = self.lib.ggml_init(InitParams(mem, None, True))
        if not self.ptr:
            raise MemoryError(f"ggml could not allocate a context of {mem} bytes")
        self._buffers: list[int] = []
        self._own: set[int] = set()
        self._external: set[int] = set()
        self._keep: list[object] = []  # numpy arrays (and anything else) the tensors point into
        self._finalizer = weakref.finalize(self, _free_context, self.lib, self.ptr, self._buffers)

    def close(self) -> None:
        self._finalizer()
        self._keep.clear()

    def keep(self, obj) -> None:
        self._keep.append(obj)

    def own_buffer(self, buf: int) -> None:
        """Free this ggml buffer together with the context."""
        self._buffers.append(buf)

    def _take(self, *operands: Tensor | None, tensors: int = 1) -> None:
        """Count `tensors` more tensors in this context, and the operands from elsewhere (graph leaves)."""
        if self.used + tensors > self.capacity:
            raise _fail(f"a tensor beyond the context's {self.capacity}")
        self.used += tensors
        for t in operands:
            if t is not None and t.ptr not in self._own:
                if t.ptr not in self._external:
                    self._keep.append(t.owner)  # a weight's or an input's memory outlives this graph
                self._external.add(t.ptr)

    def _wrap(self, ptr: int | None) -> Tensor:
        if not ptr:
            raise _fail("an op (it returned NULL)")
        self._own.add(ptr)
        return Tensor(self.lib, ptr, self)

    @property
    def graph_tensors(self) -> int:
        """An upper bound of a graph's nodes + leaves over this context's tensors."""
        return len(self._own) + len(self._external)

    def new(self, gtype: int, *ne: int) -> Tensor:
        """A fresh tensor [ne0, ne1, ...] (ggml order) with no data yet."""
        if gtype not in _BLOCKS or not 1 <= len(ne) <= 3 or min(ne) <= 0:
            raise _fail(f"a new {type_name(gtype)} tensor of shape {list(ne)}")
        block, _ = _BLOCKS[gtype]
        if ne[0] % block:
            raise _fail(f"a {type_name(gtype)} row of {ne[0]} elements (blocks of {block})")
        self._take()
        fn = (self.lib.ggml_new_tensor_1d, self.lib.ggml_new_tensor_2d, self.lib.ggml_new_tensor_3d)[len(ne) - 1]
        return self._wrap(fn(self.ptr, gtype, *ne))

    def bind(self, t: Tensor, a: np.ndarray, offset: int = 0) -> None:
        """Point tensor t at a's memory (zero copy); t must be fresh and a C-contiguous, same size."""
        if not a.flags.c_contiguous:
            raise _fail(f"binding a non-contiguous array to {t}")
        want = _NUMPY_TYPES.get(t.type)
        if want is not None and a.dtype != want and a.dtype != np.uint8 and not (t.type == F16 and a.dtype == np.uint16):
            raise _fail(f"binding {a.dtype} data to {t}")
        if a.nbytes - offset != t.nbytes or offset < 0:
            raise _fail(f"binding {a.nbytes - offset} bytes to {t} of {t.nbytes} bytes")
        addr = array_address(a) + offset
        base = addr & ~(BUFFER_ALIGN - 1)
        buf = self.lib.ggml_backend_cpu_buffer_from_ptr(base, addr - base + t.nbytes)
        if not buf:
            raise _fail(f"a CPU buffer over {t}")
        self._buffers.append(buf)
        self._keep.append(a)
        if self.lib.ggml_backend_tensor_alloc(buf, t.ptr, addr) != STATUS_SUCCESS:
            raise _fail(f"placing {t} in its buffer")

    def input(self, a: np.ndarray, gtype: int | None = None) -> Tensor:
        """A tensor over numpy array a; shape reversed into ggml order ((T, N) -> ne [N, T])."""
        gtype = {np.dtype(v): k for k, v in _NUMPY_TYPES.items()}.get(a.dtype) if gtype is None else gtype
        if gtype is None:
            raise _fail(f"an input of numpy dtype {a.dtype}")
        t = self.new(gtype, *reversed(a.shape))
        self.lib.ggml_set_input(t.ptr)
        self.bind(t, a)
        return t

    # ---- ops ---------------------------------------------------------------------------------
    def mul_mat(self, w: Tensor, x: Tensor) -> Tensor:
        """y [N, T] = W [K, N] x [K, T] (F32 activations, weight of any matmul type)."""
        ok = (w.type in MATMUL_TYPES and x.type == F32 and w.ne[0] == x.ne[0] and x.ne[2] % w.ne[2] == 0
              and x.ne[3] % w.ne[3] == 0 and w.nb[0] <= w.nb[1] and x.nb[0] == 4)
        if not ok:
            raise _fail(f"mul_mat of {w} by {x}")
        self._take(w, x)
        return self._wrap(self.lib.ggml_mul_mat(self.ptr, w.ptr, x.ptr))

    def _binary(self, fn, what: str, a: Tensor, b: Tensor) -> Tensor:
        ok = (a.type == b.type == F32 and a.nb[0] == b.nb[0] == 4
              and all(a.ne[i] % b.ne[i] == 0 for i in range(MAX_DIMS)))
        if not ok:
            raise _fail(f"{what} of {a} and {b}")
        self._take(a, b)
        return self._wrap(fn(self.ptr, a.ptr, b.ptr))

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self.lib.ggml_add, "add", a, b)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self.lib.ggml_mul, "mul", a, b)

    def rms_norm(self, x: Tensor, eps: float) -> Tensor:
        """RMS over each row of ne[0] (rows may be strided, as a head's slice of a fused q|k|v)."""
        if x.type != F32 or x.nb[0] != 4 or not (eps > 0 and math.isfinite(eps)):
            raise _fail(f"rms_norm of {x} with eps {eps}")
        self._take(x)
        return self._wrap(self.lib.ggml_rms_norm(self.ptr, x.ptr, eps))

    def rope(self, x: Tensor, pos: Tensor, factors: Tensor | None, n_dims: int, mode: int, n_ctx_orig: int,
             freq_base: float, freq_scale: float) -> Tensor:
        """Rotate x [hd, heads, T] at positions pos I32 [T] (no YaRN: ext_factor 0)."""
        ok = (x.type == F32 and x.nb[0] == 4 and pos.type == I32 and pos.ne[1:] == (1, 1, 1)
              and x.ne[2] == pos.ne[0] and mode in (0, 2) and 0 < n_dims <= x.ne[0] and n_dims % 2 == 0
              and (factors is None or (factors.type == F32 and factors.ne[0] >= n_dims // 2)))
        if not ok:
            raise _fail(f"rope of {x} at {pos}")
        self._take(x, pos, factors)
        return self._wrap(self.lib.ggml_rope_ext(
            self.ptr, x.ptr, pos.ptr, factors.ptr if factors else None, n_dims, mode, n_ctx_orig,
            freq_base, freq_scale, 0.0, 1.0, 32.0, 1.0))

    def view(self, a: Tensor, ne: tuple[int, ...], nb: tuple[int, ...], offset: int) -> Tensor:
        """view_1d/2d/3d: ne has 1-3 dims, nb the strides of dims 1.. (nb[0] stays the element size)."""
        block, size = _BLOCKS[a.type]
        if not 1 <= len(ne) <= 3 or len(nb) != len(ne) - 1 or min(ne) <= 0 or offset < 0 or block != 1:
            raise _fail(f"a view {list(ne)} of {a}")
        packed = size * math.prod(ne)
        extent = size + sum((n - 1) * s for n, s in zip(ne[1:], nb)) + (ne[0] - 1) * size
        if offset + max(packed, extent) > a.nbytes:
            raise _fail(f"a view {list(ne)} at byte {offset} of {a} ({a.nbytes} bytes)")
        self._take(a)
        lib = self.lib
        if len(ne) == 1:
            return self._wrap(lib.ggml_view_1d(self.ptr, a.ptr, ne[0], offset))
        if len(ne) == 2:
            return self._wrap(lib.ggml_view_2d(self.ptr, a.ptr, ne[0], ne[1], nb[0], offset))
        return self._wrap(lib.ggml_view_3d(self.ptr, a.ptr, *ne, nb[0], nb[1], offset))

    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        if not a.contiguous() or len(ne) not in (2, 3) or math.prod(ne) != math.prod(a.ne):
            raise _fail(f"reshaping {a} to {list(ne)}")
        self._take(a)
        fn = self.lib.ggml_reshape_2d if len(ne) == 2 else self.lib.ggml_reshape_3d
        return self._wrap(fn(self.ptr, a.ptr, *ne))

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        if sorted(axes) != [0, 1, 2, 3]:
            raise _fail(f"permuting {a} by {axes}")
        self._take(a)
        return self._wrap(self.lib.ggml_permute(self.ptr, a.ptr, *axes))

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        if a.type != b.type or not 0 <= dim < MAX_DIMS or any(
                a.ne[d] != b.ne[d] for d in range(MAX_DIMS) if d != dim):
            raise _fail(f"concatenating {a} and {b} along {dim}")
        self._take(a, b)
        return self._wrap(self.lib.ggml_concat(self.ptr, a.ptr, b.ptr, dim))

    def set_rows(self, dst: Tensor, src: Tensor, idx: Tensor) -> Tensor:
        """dst rows idx <- src rows (F32 -> dst's type); returns a view of dst ordered after the write."""
        ok = (dst.ne[0] == src.ne[0] and dst.ne[2:] == src.ne[2:] and src.ne[1] == idx.ne[0]
              and idx.ne[1:] == (1, 1, 1) and src.type in (F32, F16) and idx.type in (I32, I64)
              and dst.nb[0] == _BLOCKS[dst.type][1] and src.nb[0] == _BLOCKS[src.type][1])
        if not ok:
            raise _fail(f"set_rows of {src} into {dst} at {idx}")
        self._take(dst, src, idx)
        return self._wrap(self.lib.ggml_set_rows(self.ptr, dst.ptr, src.ptr, idx.ptr))

    def get_rows(self, a: Tensor, idx: Tensor) -> Tensor:
        """F32 rows idx of a [n, T] -> [n, len(idx)] (a copy; idx I32 [len])."""
        ok = (a.type == F32 and a.nb[0] == 4 and a.ne[2:] == (1, 1) and idx.type == I32
              and idx.ne[1:] == (1, 1, 1) and idx.ne[0] >= 1)
        if not ok:
            raise _fail(f"get_rows of {a} at {idx}")
        self._take(a, idx)
        return self._wrap(self.lib.ggml_get_rows(self.ptr, a.ptr, idx.ptr))

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        """q [hd, T, H], k/v F16 [hd, n_kv, Hkv], mask F16 [n_kv, T] -> [hd, H, T] (F32 accumulation)."""
        ok = (q.type == F32 and k.type == v.type == F16 and mask.type == F16 and mask.contiguous()
              and q.ne[0] == k.ne[0] == v.ne[0] and k.ne[1] == v.ne[1] == mask.ne[0] and mask.ne[1] >= q.ne[1]
              and k.ne[2] == v.ne[2] and q.ne[2] % k.ne[2] == 0 and q.ne[3] == k.ne[3] == v.ne[3] == 1
              and q.nb[0] == 4 and k.nb[0] == v.nb[0] == 2)
        if not ok:
            raise _fail(f"flash attention of {q} over {k}, {v} with mask {mask}")
        self._take(q, k, v, mask)
        out = self._wrap(self.lib.ggml_flash_attn_ext(self.ptr, q.ptr, k.ptr, v.ptr, mask.ptr, scale, 0.0, 0.0))
        if not self.lib.ggml_prec_set_acc(out.ptr, PREC_F32):
            raise _fail("F32 accumulation for flash attention")
        return out

    def swiglu(self, gate_up: Tensor) -> Tensor:
        """silu(first half of each row) * second half: the fused gate|up output."""
        return self._glu(self.lib.ggml_swiglu, "swiglu", gate_up)

    def swiglu_split(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._glu_split(self.lib.ggml_swiglu_split, "swiglu", gate, up)

    def geglu(self, gate_up: Tensor) -> Tensor:
        """gelu_tanh(first half of each row) * second half (ggml's CPU GELU reads an fp16 table)."""
        return self._glu(self.lib.ggml_geglu, "geglu", gate_up)

    def geglu_split(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._glu_split(self.lib.ggml_geglu_split, "geglu", gate, up)

    def _glu(self, fn, what: str, gate_up: Tensor) -> Tensor:
        if gate_up.type != F32 or gate_up.ne[0] % 2 or not gate_up.contiguous(1):
            raise _fail(f"{what} of {gate_up}")
        self._take(gate_up)
        return self._wrap(fn(self.ptr, gate_up.ptr))

    def _glu_split(self, fn, what: str, gate: Tensor, up: Tensor) -> Tensor:
        if gate.type != F32 or up.type != F32 or gate.ne != up.ne or not (gate.contiguous(1) and up.contiguous(1)):
            raise _fail(f"{what} of {gate} and {up}")
        self._take(gate, up)
        return self._wrap(fn(self.ptr, gate.ptr, up.ptr))

    def scale(self, x: Tensor, s: float) -> Tensor:
        if x.type != F32 or not x.contiguous() or not math.isfinite(s):
            raise _fail(f"scaling {x} by {s}")
        self._take(x)
        return self._wrap(self.lib.ggml_scale(self.ptr, x.ptr, s))

    def tanh(self, x: Tensor) -> Tensor:
        if x.type != F32 or not x.contiguous():
            raise _fail(f"tanh of {x}")
        self._take(x)
        return self._wrap(self.lib.ggml_tanh(self.ptr, x.ptr))


    # ---- mixture of experts (llama.cpp's build_moe_ffn) ------------------------------------------
    def mul_mat_id(self, experts: Tensor, x: Tensor, ids: Tensor) -> Tensor:
        """y [N, n_ids, T] = experts[ids[i, t]] [K, N] x [K, i or 0, t]: one matmul per chosen expert.

        ggml reads ids unchecked at compute time (a plain assert, off in release builds): ids computed
        in the graph (argsort_top_k) are in range by construction; ids from numpy must be checked by
        the caller against experts.ne[2] before every compute.
        """
        ok = (experts.type in MATMUL_TYPES and experts.ne[3] == 1 and experts.nb[0] <= experts.nb[1]
              and x.type == F32 and x.ne[3] == 1 and x.contiguous() and ids.type == I32
              and ids.ne[2] == ids.ne[3] == 1 and ids.ne[1] == x.ne[2] and experts.ne[0] == x.ne[0]
              and ids.ne[0] % x.ne[1] == 0 and ids.nb[0] == 4)
        if not ok:
            raise _fail(f"mul_mat_id of {experts} by {x} at {ids}")
        self._take(experts, x, ids)
        return self._wrap(self.lib.ggml_mul_mat_id(self.ptr, experts.ptr, x.ptr, ids.ptr))

    def soft_max(self, a: Tensor) -> Tensor:
        """Softmax along ne[0] (no mask, scale 1)."""
        if a.type != F32 or not a.contiguous():
            raise _fail(f"soft_max of {a}")
        self._take(a)
        return self._wrap(self.lib.ggml_soft_max(self.ptr, a.ptr))

    def argsort_top_k(self, a: Tensor, k: int) -> Tensor:
        """I32 [k, ...]: indices of the k largest along ne[0], largest first (a view of a full argsort)."""
        if a.type != F32 or a.nb[0] != 4 or not 1 <= k <= a.ne[0]:
            raise _fail(f"top {k} of {a}")
        self._take(a, tensors=2)  # the argsort and the view of its first k
        return self._wrap(self.lib.ggml_argsort_top_k(self.ptr, a.ptr, k))

    def get_rows(self, a: Tensor, idx: Tensor) -> Tensor:
        """F32 [a.ne[0], idx.ne[0], idx.ne[1], idx.ne[2]]: rows idx of each matrix of a."""
        ok = (a.type == F32 and a.nb[0] == 4 and idx.type == I32 and idx.nb[0] == 4 and a.ne[2] == idx.ne[1]
              and a.ne[3] == idx.ne[2] and idx.ne[3] == 1)
        if not ok:
            raise _fail(f"get_rows of {a} at {idx}")
        self._take(a, idx)
        return self._wrap(self.lib.ggml_get_rows(self.ptr, a.ptr, idx.ptr))

    def sum_rows(self, a: Tensor) -> Tensor:
        if a.type != F32 or a.nb[0] != 4:
            raise _fail(f"sum_rows of {a}")
        self._take(a)
        return self._wrap(self.lib.ggml_sum_rows(self.ptr, a.ptr))

    def clamp(self, a: Tensor, lo: float, hi: float) -> Tensor:
        if a.type != F32 or a.nb[0] != 4 or not lo <= hi:
            raise _fail(f"clamp of {a} to [{lo}, {hi}]")
        self._take(a)
        return self._wrap(self.lib.ggml_clamp(self.ptr, a.ptr, lo, hi))

    def div(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self.lib.ggml_div, "div", a, b)

    def cont(self, a: Tensor) -> Tensor:
        """A contiguous copy (F32 or I32)."""
        if a.type not in (F32, I32):
            raise _fail(f"a contiguous copy of {a}")
        self._take(a)
        return self._wrap(self.lib.ggml_cont(self.ptr, a.ptr))


class _ComputeBuffer:
    """A graph's own compute buffer (a gallocr); output views keep it alive past the graph."""

    def __init__(self, lib):
        self.ptr = lib.ggml_gallocr_new(lib.ggml_backend_cpu_buffer_type())
        if not self.ptr:
            raise MemoryError("ggml could not create a graph allocator")
        self._finalizer = weakref.finalize(self, lib.ggml_gallocr_free, self.ptr)


class _View:
    """numpy's view of ggml memory, holding whatever owns that memory."""

    def __init__(self, addr: int, shape: tuple[int, ...], owner: object, typestr: str = "<f4"):
        self.__array_interface__ = {"data": (addr, False), "shape": shape, "typestr": typestr, "version": 3}
        self.owner = owner


class Graph:
    """One built graph: its context (which holds the op tensors) and where its intermediates live.

    With no `galloc` the graph gets a compute buffer of its own, and its outputs (numpy views that
    keep that buffer alive, even past the graph) hold valid values until it is computed again. With
    a shared `galloc` the graph is planned afresh (ggml would otherwise reuse the previous graph's
    plan by node index) and its outputs are valid only until the next graph is allocated there:
    copy them at once.
    """

    def __init__(self, ctx: Context, outputs: list[Tensor], shapes: list[tuple[int, ...]], galloc: int | None = None):
        lib = ctx.lib
        if ctx.graph_tensors > ctx.graph_size:
            raise _fail(f"a graph of up to {ctx.graph_tensors} tensors in a context sized for {ctx.graph_size}")
        for out, shape in zip(outputs, shapes):
            if out.type not in (F32, I32) or not out.contiguous() or math.prod(shape) != math.prod(out.ne):
                raise _fail(f"an output {out} read as {shape}")
            lib.ggml_set_output(out.ptr)
        self.ctx = ctx
        self.ptr = lib.ggml_new_graph_custom(ctx.ptr, ctx.graph_size, False)
        for out in outputs:
            lib.ggml_build_forward_expand(self.ptr, out.ptr)
        owner: object = None
        if galloc is None:
            owner = self.buffer = _ComputeBuffer(lib)
            galloc = owner.ptr
        elif not lib.ggml_gallocr_reserve(galloc, self.ptr):
            raise MemoryError("ggml could not reserve a graph's compute buffer")
        if not lib.ggml_gallocr_alloc_graph(galloc, self.ptr):
            raise MemoryError("ggml could not allocate a graph's compute buffer")
        self.outputs = [_as_numpy(lib, out, shape, owner) for out, shape in zip(outputs, shapes)]
        self.nodes = int(lib.ggml_graph_n_nodes(self.ptr))


class SharedComputeBuffer:
    """One compute buffer that graphs used once (prefill) are planned into, one after another."""

    def __init__(self, lib=None):
        self.lib = lib or load_ggml()
        self.ptr = self.lib.ggml_gallocr_new(self.lib.ggml_backend_cpu_buffer_type())
        self._finalizer = weakref.finalize(self, self.lib.ggml_gallocr_free, self.ptr)

    @property
    def nbytes(self) -> int:
        return int(self.lib.ggml_gallocr_get_buffer_size(self.ptr, 0))


def _as_numpy(lib, t: Tensor, shape: tuple[int, ...], owner: object) -> np.ndarray:
    addr = lib.ggml_get_data(t.ptr)
    if not addr:
        raise _fail(f"reading {t}: it has no data")
    return np.asarray(_View(addr, shape, owner, "<i4" if t.type == I32 else "<f4"))
