"""The "ggml" kernel backend: weights as ggml tensors over their own bytes, linears as ggml graphs.

Weight formats (tpi.quant.formats, contract §1):
  ggml:<TYPE>  arrays {"data": uint8 [N, K / block * block_bytes]}, GGUF rows as they are (zero copy)
  f32 / bf16   arrays {"weight": float32 / uint16 [N, K]}, already ggml's F32 / BF16 layout (zero copy)
  q4g32 / q8   tpi's older native formats (HF folders, old .tpis files): converted once, at prepare,
               into Q4_1 / Q8_0 (lossless but for fp16 rounding of the scales), and logged.
Q4_0, Q4_K and IQ4_NL weights with N % 8 == 0 are repacked into ggml's interleaved CPU_REPACK layout
on AVX2 (a copy, as llama.cpp does), when asked: ggml has no repacked kernel for other types, and
writes past a tensor it cannot repack, so the allow-list is strict.
"""
from __future__ import annotations

import ctypes as C
import functools
import logging
from dataclasses import dataclass

import numpy as np

from tpi.quant.formats import BF16 as BF16_FMT
from tpi.quant.formats import F32 as F32_FMT
from tpi.quant.formats import GROUP, Q4G32, Q8, bf16_bits_to_f32, take_rows
from tpi.quant.ggml_graph import Context, GgmlShapeError, Graph, Tensor, array_address
from tpi.quant.ggml_runtime import CpuRuntime
from tpi.quant.ggml_lib import BF16, F32, IQ4_NL, MATMUL_TYPES, Q4_0, Q4_1, Q4_K, Q8_0, TYPES, ggml_available, load_ggml

log = logging.getLogger(__name__)

GGML_PREFIX = "ggml:"
REPACK_TYPES = frozenset({Q4_0, Q4_K, IQ4_NL})  # CPU_REPACK on AVX2 (ggml-cpu/repack.cpp)
REPACK_ROWS = 8  # the 8x8 interleave needs N % 8 == 0
LINEAR_GRAPHS_KEPT = 4  # token counts whose single-linear graphs a GgmlLinear keeps built


def weight_type(fmt: str) -> int | None:
    """The ggml type id a weight format runs as directly, or None (converted, or unknown)."""
    if fmt == F32_FMT:
        return F32
    if fmt == BF16_FMT:
        return BF16
    if fmt.startswith(GGML_PREFIX):
        entry = TYPES.get(fmt[len(GGML_PREFIX):])
        if entry is not None and entry[0] in MATMUL_TYPES:
            return entry[0]
    return None


def _weight_bytes(qt) -> np.ndarray:
    """The matrix's raw bytes as the ggml type expects them."""
    return qt.arrays["data"] if qt.fmt.startswith(GGML_PREFIX) else qt.arrays["weight"]


def gather_rows(w, idx: np.ndarray):
    """Rows idx of a weight (QTensor of any format, or a float32 vector): a byte gather, a copy."""
    if isinstance(w, np.ndarray):
        return w[idx]
    return take_rows(w, idx)


def q4g32_to_q4_1(qweight: np.ndarray, scale_zero: np.ndarray) -> np.ndarray:
    """q4g32 (w = (q - 8) * scale + zero, bf16 scale/zero) -> Q4_1 rows (w = q * d + m, fp16 d/m)."""
    n, half = qweight.shape
    groups = half * 2 // GROUP
    sz = bf16_bits_to_f32(scale_zero)  # [K/32, N, 2]
    d = sz[..., 0].T  # [N, K/32]
    m = sz[..., 1].T - 8.0 * d
    b = qweight.reshape(n, groups, 16)  # byte j: elements 2j (low), 2j + 1 (high) of a group
    lo, hi = b & np.uint8(15), b >> np.uint8(4)
    q = np.empty((n, groups, 32), np.uint8)
    q[..., 0::2], q[..., 1::2] = lo, hi
    blocks = np.empty((n, groups, 20), np.uint8)
    blocks[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    blocks[..., 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    blocks[..., 4:] = q[..., :16] | (q[..., 16:] << np.uint8(4))  # Q4_1 byte i: elements i, i + 16
    return blocks.reshape(n, groups * 20)


def q8_to_q8_0(qweight: np.ndarray, scale_bits: np.ndarray) -> np.ndarray:
    """q8 (int8 rows, one bf16 scale per row) -> Q8_0 rows (one fp16 scale per 32 elements)."""
    n, k = qweight.shape
    d = np.repeat(bf16_bits_to_f32(scale_bits).astype(np.float16)[:, None], k // GROUP, axis=1)  # [N, K/32]
    blocks = np.empty((n, k // GROUP, 34), np.uint8)
    blocks[..., 0:2] = d[..., None].view(np.uint8)
    blocks[..., 2:] = qweight.reshape(n, k // GROUP, GROUP).view(np.uint8)
    return blocks.reshape(n, k // GROUP * 34)


def _convert(qt) -> tuple[int, np.ndarray]:
    """(ggml type, rows) for a format ggml does not read directly."""
    n, k = qt.shape
    if qt.fmt == Q4G32:
        return Q4_1, q4g32_to_q4_1(qt.arrays["qweight"], qt.arrays["scale_zero"])
    if qt.fmt == Q8 and k % GROUP == 0:
        return Q8_0, q8_to_q8_0(qt.arrays["qweight"], qt.arrays["scale"])
    if qt.fmt == Q8:  # a K that is not a whole number of Q8_0 blocks: widen to F32
        w = qt.arrays["qweight"].astype(np.float32) * bf16_bits_to_f32(qt.arrays["scale"])[:, None]
        return F32, w
    raise GgmlShapeError(f"weight format '{qt.fmt}' cannot run on ggml; re-import the model from its GGUF file")


@functools.cache
def _repack_buffer_type(lib) -> int | None:
    """ggml's CPU_REPACK buffer type, or None when this build has none."""
    reg = lib.ggml_backend_cpu_reg()
    dev = lib.ggml_backend_reg_dev_get(reg, 0)
    fp = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not reg or not dev or not fp:
        return None
    bufts = C.CFUNCTYPE(C.POINTER(C.c_void_p), C.c_void_p)(fp)(dev)
    i = 0
    while bufts and bufts[i]:
        if lib.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def can_repack(gtype: int, n: int, lib=None) -> bool:
    """Whether ggml repacks this weight type and row count here (AVX2, allow-listed, N % 8 == 0)."""
    lib = lib or load_ggml()
    return gtype in REPACK_TYPES and n % REPACK_ROWS == 0 and lib.has_avx2 and _repack_buffer_type(lib) is not None


@dataclass(frozen=True, eq=False)
class GgmlWeight:
    """A [N, K] weight as a ggml tensor (ne [K, N]); ctx owns the tensor and keeps its bytes alive."""

    fmt: str
    kernel: str  # e.g. "ggml-Q4_K", "ggml-Q4_0-repacked"
    in_features: int
    out_features: int
    tensor: Tensor
    ctx: Context
    pages: tuple[int, int] | None = None  # (start, length) of file pages mapped for it alone

    @property
    def repacked(self) -> bool:
        return "-repacked" in self.kernel


class GgmlBackend:
    """Kernel backend on ggml; `prepare` gives a callable single linear, `weight` the bare tensor."""

    name = "ggml"

    def __init__(self, threads: int | None = None, runtime: CpuRuntime | None = None, repack: bool = True):
        self.lib = load_ggml()
        self._runtime = runtime
        self._threads = threads
        self.repack = repack
        self._converted: set[str] = set()

    @staticmethod
    def available() -> bool:
        return ggml_available()[0]

    @property
    def runtime(self) -> CpuRuntime:
        if self._runtime is None:  # a backend used only for weights never starts threads
            self._runtime = CpuRuntime(self._threads, self.lib)
        return self._runtime

    def weight(self, qt, repack: bool | None = None, experts: int = 1) -> GgmlWeight:
        """qt (QTensor or float32 [N, K]) as a ggml tensor: zero copy, converted, or repacked.

        experts > 1: N stacked rows of that many experts, as one 3-D tensor ne [K, N / experts, experts]
        (what mul_mat_id takes); ggml repacks it per expert where it repacks a matrix of N / experts rows.
        """
        if isinstance(qt, np.ndarray):
            from tpi.quant.kernels import _as_qtensor  # kernels imports this module: no circle at load

            qt = _as_qtensor(qt)
        n, k = qt.shape
        if experts < 1 or n % experts:
            raise GgmlShapeError(f"a weight of {n} rows cannot hold {experts} experts of equal size")
        gtype = weight_type(qt.fmt)
        if gtype is None:
            gtype, data = _convert(qt)
            if qt.fmt not in self._converted:
                self._converted.add(qt.fmt)
                log.info("converting %s weights to ggml %s at load (re-import from GGUF to skip this)",
                         qt.fmt, _name(gtype))
        else:
            data = _weight_bytes(qt)
        if data.ndim != 2 or data.shape[0] != n:
            raise GgmlShapeError(f"a {qt.fmt} weight of shape {list(qt.shape)} has data {list(data.shape)}")
        ctx = Context(1, lib=self.lib)
        rows = n // experts
        t = ctx.new(gtype, k, rows, experts) if experts > 1 else ctx.new(gtype, k, n)  # new() checks K's blocks
        if data.nbytes != t.nbytes or not data.flags.c_contiguous:
            raise GgmlShapeError(f"a {_name(gtype)} [{n}, {k}] weight needs {t.nbytes} contiguous bytes, "
                                 f"got {data.nbytes}; the shard is corrupt or mislabelled")
        if (self.repack if repack is None else repack) and can_repack(gtype, rows, self.lib):
            buf = self.lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, _repack_buffer_type(self.lib))
            if not buf:
                raise MemoryError(f"ggml could not allocate {t.nbytes} bytes to repack a weight")
            ctx.own_buffer(buf)
            self.lib.ggml_backend_tensor_set(t.ptr, array_address(data), 0, t.nbytes)  # repacks (a copy)
            return GgmlWeight(qt.fmt, f"ggml-{_name(gtype)}-repacked", k, rows, t, ctx)
        ctx.bind(t, data)
        return GgmlWeight(qt.fmt, f"ggml-{_name(gtype)}", k, rows, t, ctx)

    @staticmethod
    def resident_nbytes(qt) -> int:
        """What a prepared weight holds: its own bytes, or those of its Q4_1 / Q8_0 / F32 conversion."""
        n, k = qt.shape
        if weight_type(qt.fmt) is not None:
            return int(qt.nbytes)
        if qt.fmt == Q4G32:
            return n * k // GROUP * TYPES["Q4_1"][2]
        return n * k // GROUP * TYPES["Q8_0"][2] if k % GROUP == 0 else n * k * 4

    def prepare(self, w) -> "GgmlLinear":
        return GgmlLinear(self.weight(w), self)

    @staticmethod
    def linear(x: np.ndarray, w: "GgmlLinear") -> np.ndarray:
        return w(x)

    @staticmethod
    def activations(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def to_f32(y: np.ndarray) -> np.ndarray:
        return y


def _name(gtype: int) -> str:
    return next(name for name, entry in TYPES.items() if entry[0] == gtype)


class GgmlLinear:
    """y [T, N] = x [T, K] @ W.T through one small ggml graph per token count (kept for reuse)."""

    def __init__(self, weight: GgmlWeight, backend: GgmlBackend):
        self.weight, self.backend = weight, backend
        self.fmt, self.kernel = weight.fmt, weight.kernel
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self._graphs: dict[int, tuple[Graph, np.ndarray]] = {}

    def _graph(self, t: int) -> tuple[Graph, np.ndarray]:
        entry = self._graphs.get(t)
        if entry is None:
            if len(self._graphs) >= LINEAR_GRAPHS_KEPT:
                self._graphs.pop(next(iter(self._graphs)))
            x = np.zeros((t, self.in_features), np.float32)
            ctx = Context(4, graph_size=8, lib=self.backend.lib)
            y = ctx.mul_mat(self.weight.tensor, ctx.input(x))
            entry = self._graphs[t] = (Graph(ctx, [y], [(t, self.out_features)]), x)
        return entry

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_features or x.shape[0] < 1:
            raise GgmlShapeError(f"a linear of {self.in_features} inputs got activations {list(x.shape)}")
        graph, buf = self._graph(x.shape[0])
        np.copyto(buf, x)
        self.backend.runtime.compute(graph)
        return graph.outputs[0].copy()
