"""Weight formats: GGUF's own types ("ggml:<TYPE>") and tpi's kernel formats (q4g32, q8, bf16, f32);
quantize, numpy reference dequantize, byte slicing.

numpy only at import: a torch-free worker imports this module (gguf is imported lazily, to
dequantize or quantize GGUF block types).

Layouts (N = out features, K = in features):
  q4g32  qweight    uint8  [N, K/2]    byte j of row n = q[n, 2j] | q[n, 2j+1] << 4, q in 0..15
         scale_zero uint16 [K/32, N, 2] bf16 bits of (scale, zero); w = (q - 8) * scale + zero
  q8     qweight    int8   [N, K]       w = q * scale[n]
         scale      uint16 [N]          bf16 bits
  bf16   weight     uint16 [N, K]       bf16 bits
  f32    weight     float32 [N, K]
  ggml:T data       uint8  [N, K/block*block_bytes]   rows of GGUF type T exactly as in the file

A GGUF F32 matrix is "f32" and a BF16 one "bf16": those bytes already are ggml's layout.

scale_zero is exactly what torch._weight_int4pack_mm_for_cpu consumes. qweight is row-major
on purpose: torch's own int4 packing is blocked over N in a CPU-dependent way (blocks of 32 on
AVX2 and plain builds, 64 on AVX-512, with different nibble pairings), so a row-major layout is
the only one that shards by pure byte slicing and reads the same on every device. The torch
backend repacks it once in prepare (tpi.quant.kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpi.errors import ShapeError

Q4G32 = "q4g32"
Q8 = "q8"
BF16 = "bf16"
F32 = "f32"
GROUP = 32
FORMATS = (Q4G32, Q8, BF16, F32)
# q4g32 with qweight already in torch's int4pack byte order for one CPU capability
# (tpi.quant.kernels.int4pack_layout). Device-local only: a streamed torch engine writes them
# once beside its shard (tpi.model.weights.kernel_layout_store); never sharded, sent or dequantized.
Q4G32_PREPACKED = {"AVX2": "q4g32-avx2", "DEFAULT": "q4g32-default"}
GGML_PREFIX = "ggml:"


@dataclass(frozen=True)
class GgmlType:
    """One GGML tensor type: its id in ggml.h, elements per block and bytes per block."""

    name: str
    type_id: int
    block: int
    block_bytes: int


# The GGUF types tpi keeps as they are (ids and sizes from ggml.h; tests check them against gguf).
GGML_TYPES = {t.name: t for t in (
    GgmlType("F32", 0, 1, 4), GgmlType("F16", 1, 1, 2), GgmlType("Q4_0", 2, 32, 18), GgmlType("Q4_1", 3, 32, 20),
    GgmlType("Q5_0", 6, 32, 22), GgmlType("Q5_1", 7, 32, 24), GgmlType("Q8_0", 8, 32, 34),
    GgmlType("Q2_K", 10, 256, 84), GgmlType("Q3_K", 11, 256, 110), GgmlType("Q4_K", 12, 256, 144),
    GgmlType("Q5_K", 13, 256, 176), GgmlType("Q6_K", 14, 256, 210), GgmlType("IQ4_NL", 20, 32, 18),
    GgmlType("BF16", 30, 1, 2),
)}
# F32 and BF16 matrices keep tpi's own names: their bytes are the same.
_PLAIN_GGML = {"F32": F32, "BF16": BF16}


def ggml_fmt(name: str) -> str:
    """The QTensor fmt of a GGML type name: "ggml:Q4_K", or "f32" / "bf16" for F32 / BF16."""
    if name not in GGML_TYPES:
        raise ShapeError(f"GGML type {name} is not supported; tpi keeps {', '.join(GGML_TYPES)}")
    return _PLAIN_GGML.get(name, GGML_PREFIX + name)


def is_ggml(fmt: str) -> bool:
    """Whether fmt is a GGUF block type kept as file bytes ("ggml:*"; not f32 / bf16)."""
    return fmt.startswith(GGML_PREFIX)


def ggml_type_info(fmt: str) -> GgmlType:
    """The GGML type behind a fmt ("ggml:Q4_K", "f32" -> F32, "bf16" -> BF16)."""
    name = {F32: "F32", BF16: "BF16"}.get(fmt) or (fmt[len(GGML_PREFIX):] if is_ggml(fmt) else "")
    if name not in GGML_TYPES or fmt in (GGML_PREFIX + "F32", GGML_PREFIX + "BF16"):
        raise ShapeError(f"weight format '{fmt}' is not a GGML type; use ggml:<TYPE>, f32 or bf16")
    return GGML_TYPES[name]


def k_block(fmt: str) -> int:
    """Elements per block along K: the granularity of a column (K) shard of this format."""
    if is_ggml(fmt):
        return ggml_type_info(fmt).block
    return GROUP if fmt == Q4G32 or fmt in Q4G32_PREPACKED.values() else 1


def bytes_per_weight(fmt: str) -> float:
    """Bytes one weight takes in this format (block headers and scales included)."""
    if is_ggml(fmt) or fmt in (F32, BF16):
        t = ggml_type_info(fmt)
        return t.block_bytes / t.block
    return {Q8: 1.0}.get(fmt, 0.5 + 4 / GROUP)  # q8's per-row scale is negligible; q4g32 + prepacked

# Per format: array name -> (dtype, shape as a function of (N, K)).
_LAYOUT = {
    Q4G32: {
        "qweight": (np.uint8, lambda n, k: (n, k // 2)),
        "scale_zero": (np.uint16, lambda n, k: (k // GROUP, n, 2)),
    },
    Q8: {
        "qweight": (np.int8, lambda n, k: (n, k)),
        "scale": (np.uint16, lambda n, k: (n,)),
    },
    BF16: {"weight": (np.uint16, lambda n, k: (n, k))},
    F32: {"weight": (np.float32, lambda n, k: (n, k))},
}
_LAYOUT.update({fmt: _LAYOUT[Q4G32] for fmt in Q4G32_PREPACKED.values()})
_LAYOUT.update({
    GGML_PREFIX + t.name: {"data": (np.uint8, lambda n, k, t=t: (n, k // t.block * t.block_bytes))}
    for t in GGML_TYPES.values() if t.name not in _PLAIN_GGML
})


def fmt_nbytes(fmt: str, shape: tuple[int, int]) -> int:
    """Bytes a QTensor of this fmt and [N, K] shape holds."""
    n, k = shape
    return sum(int(np.prod(shape_of(n, k))) * np.dtype(dtype).itemsize for dtype, shape_of in _LAYOUT[fmt].values())


@dataclass(frozen=True)
class QTensor:
    """A [N, K] = [out, in] weight matrix in one native format; arrays in kernel-ready layout."""

    fmt: str
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if self.fmt not in _LAYOUT:
            raise ShapeError(f"unknown weight format '{self.fmt}'; use one of {', '.join(FORMATS)}")
        n, k = self.shape
        if self.fmt == Q4G32 and k % GROUP:
            raise ShapeError(f"q4g32 needs K divisible by {GROUP}, got shape {self.shape}; use q8 or bf16")
        if is_ggml(self.fmt) and k % k_block(self.fmt):
            raise ShapeError(f"{self.fmt} needs K divisible by its block of {k_block(self.fmt)}, got shape "
                             f"{self.shape}; the file is corrupt or the shard was cut off a block boundary")
        layout = _LAYOUT[self.fmt]
        if set(self.arrays) != set(layout):
            raise ShapeError(f"{self.fmt} tensor needs arrays {sorted(layout)}, got {sorted(self.arrays)}")
        for name, (dtype, shape_of) in layout.items():
            a = self.arrays[name]
            if a.dtype != dtype or a.shape != shape_of(n, k):
                raise ShapeError(
                    f"{self.fmt} array '{name}' must be {np.dtype(dtype).name}{list(shape_of(n, k))} "
                    f"for shape {self.shape}, got {a.dtype.name}{list(a.shape)}; the shard is corrupt or mislabelled"
                )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@dataclass(frozen=True)
class QuantError:
    """How far a quantized tensor is from its fp32 reference."""

    rmse: float
    rel_rmse: float  # rmse / rms(reference)
    max_abs: float


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest, ties to even); returns the uint16 bit patterns.

    The one bf16 codec (weights and the allreduce wire): a NaN stays a quiet NaN of its sign, where
    rounding its payload could otherwise carry it into inf.
    """
    x = np.ascontiguousarray(a, dtype=np.float32)
    u = x.view(np.uint32)
    r = np.right_shift(u, 16)  # in-place steps after this: one temporary on the wire's hot path
    np.bitwise_and(r, 1, out=r)
    r += 0x7FFF
    r += u
    out = np.right_shift(r, 16, out=r).astype(np.uint16)
    if np.isnan(x).any():
        nan = np.isnan(x)
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32, exactly."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q uint8 [N, K] in 0..15 -> uint8 [N, K/2], even k in the low nibble."""
    q = q.astype(np.uint8, copy=False)
    return q[:, 0::2] | (q[:, 1::2] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15."""
    n, half = packed.shape
    q = np.empty((n, half * 2), dtype=np.uint8)
    q[:, 0::2] = packed & np.uint8(15)
    q[:, 1::2] = packed >> np.uint8(4)
    return q


def q4g32_from_parts(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> QTensor:
    """Build q4g32 from q uint8 [N, K] (0..15) and float32 scale/zero [N, K/32]."""
    n, k = q.shape
    sz = np.stack([f32_to_bf16_bits(scale.T), f32_to_bf16_bits(zero.T)], axis=-1)  # [K/32, N, 2]
    return QTensor(Q4G32, (n, k), {"qweight": pack_nibbles(q), "scale_zero": np.ascontiguousarray(sz)})


def _quantize_q4g32(w: np.ndarray) -> QTensor:
    n, k = w.shape
    if k % GROUP:
        raise ShapeError(f"q4g32 needs K divisible by {GROUP}, got K={k}; use q8 or bf16 for this tensor")
    g = w.reshape(n, k // GROUP, GROUP)
    lo, hi = g.min(axis=2), g.max(axis=2)
    # Round scale/zero to bf16 first, then choose q against the rounded values.
    scale = bf16_bits_to_f32(f32_to_bf16_bits((hi - lo) / 15.0))
    zero = bf16_bits_to_f32(f32_to_bf16_bits(lo + 8.0 * scale))
    safe = np.where(scale > 0, scale, 1.0)
    q = np.rint((g - zero[..., None]) / safe[..., None] + 8.0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, k)
    return q4g32_from_parts(q, scale, zero)


def _quantize_q8(w: np.ndarray) -> QTensor:
    scale = bf16_bits_to_f32(f32_to_bf16_bits(np.abs(w).max(axis=1) / 127.0))
    t = w / np.where(scale > 0, scale, 1.0)[:, None]
    np.rint(t, out=t)
    np.clip(t, -128, 127, out=t)
    return QTensor(Q8, w.shape, {"qweight": t.astype(np.int8), "scale": f32_to_bf16_bits(scale)})


def quantize(w: np.ndarray, fmt: str) -> QTensor:
    """Quantize a float [N, K] matrix into a native format."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ShapeError(f"quantize takes a 2-D [N, K] matrix, got shape {w.shape}; keep vectors as float32")
    shape = (int(w.shape[0]), int(w.shape[1]))
    if fmt == Q4G32:
        return _quantize_q4g32(w)
    if fmt == Q8:
        return _quantize_q8(w)
    if fmt == BF16:
        return QTensor(BF16, shape, {"weight": f32_to_bf16_bits(w)})
    if fmt == F32:
        return QTensor(F32, shape, {"weight": np.ascontiguousarray(w)})
    if is_ggml(fmt):
        return _quantize_ggml(w, fmt)
    raise ShapeError(f"unknown weight format '{fmt}'; use one of {', '.join(FORMATS)} or ggml:<TYPE>")


# GGUF types gguf's numpy code can write (K-quants and IQ4_NL come from llama.cpp's quantizer).
GGML_QUANTIZABLE = ("F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _quantize_ggml(w: np.ndarray, fmt: str) -> QTensor:
    import gguf  # ~0.3 s to import: only for the GGUF types numpy has no code for

    t = ggml_type_info(fmt)
    if t.name not in GGML_QUANTIZABLE:
        raise ShapeError(f"tpi cannot quantize to {t.name}; use one of {', '.join(GGML_QUANTIZABLE)} "
                         "(or llama.cpp's llama-quantize for K-quants)")
    n, k = w.shape
    if k % t.block:
        raise ShapeError(f"{t.name} needs K divisible by {t.block}, got K={k}; keep this tensor in bf16")
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[t.name])
    return QTensor(fmt, (n, k), {"data": np.ascontiguousarray(data).view(np.uint8).reshape(n, -1)})


def _dequantize_ggml(qt: QTensor) -> np.ndarray:
    """float32 [N, K] exactly as gguf.quants.dequantize gives it (F16 and Q8_0 decoded here, faster)."""
    n, k = qt.shape
    data = qt.arrays["data"]
    name = ggml_type_info(qt.fmt).name
    if name == "F16":
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32)
    if name == "Q8_0":
        blocks = np.ascontiguousarray(data).reshape(n, k // GROUP, 34)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [N, K/32, 1]
        return (blocks[..., 2:].view(np.int8) * d).reshape(n, k)
    import gguf  # ~0.3 s to import: only for the GGUF types numpy has no code for

    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]), dtype=np.float32).reshape(n, k)


def dequantize(qt: QTensor) -> np.ndarray:
    """The numpy reference dequantizer: float32 [N, K]."""
    n, k = qt.shape
    a = qt.arrays
    if qt.fmt == Q4G32:
        q = unpack_nibbles(a["qweight"]).astype(np.float32).reshape(n, k // GROUP, GROUP)
        sz = bf16_bits_to_f32(a["scale_zero"])  # [K/32, N, 2]
        scale, zero = sz[..., 0].T[..., None], sz[..., 1].T[..., None]  # [N, K/32, 1]
        return ((q - 8.0) * scale + zero).reshape(n, k)
    if qt.fmt == Q8:
        return a["qweight"].astype(np.float32) * bf16_bits_to_f32(a["scale"])[:, None]
    if qt.fmt == BF16:
        return bf16_bits_to_f32(a["weight"])
    if is_ggml(qt.fmt):
        return _dequantize_ggml(qt)
    return a["weight"].astype(np.float32, copy=True)


def quant_error(reference: np.ndarray, qt: QTensor) -> QuantError:
    """Error of qt against its float reference (float32 maths; a report, not a bit-exact check)."""
    diff = dequantize(qt).reshape(-1)
    ref = np.asarray(reference, dtype=np.float32).reshape(-1)
    if diff.size != ref.size:
        raise ShapeError(f"reference has {ref.size} elements but the tensor is {list(qt.shape)}")
    if not diff.size:
        return QuantError(0.0, 0.0, 0.0)
    diff -= ref
    rmse = float(np.sqrt(np.dot(diff, diff) / diff.size))
    rms = float(np.sqrt(np.dot(ref, ref) / ref.size))
    max_abs = float(np.abs(diff).max())
    return QuantError(rmse=rmse, rel_rmse=rmse / rms if rms > 0 else (0.0 if rmse == 0 else float("inf")), max_abs=max_abs)


# Which axis of each array runs over rows (N) and over columns (K), and K units per index.
_ROW_AXIS = {"qweight": 0, "scale": 0, "weight": 0, "scale_zero": 1, "data": 0}


def _col_axis(fmt: str, name: str) -> tuple[int, int] | None:
    """(axis, K elements per index step) for slicing columns; None when the array has no K axis."""
    if fmt == Q4G32:
        return (1, 2) if name == "qweight" else (0, GROUP)
    if name == "scale":
        return None
    return (1, 1)


def take_rows(qt: QTensor, idx: np.ndarray) -> QTensor:
    """Gather output rows (e.g. to un-permute llama q/k or pick heads); pure byte gather."""
    idx = np.asarray(idx, dtype=np.int64)
    n, k = qt.shape
    if idx.ndim != 1 or (idx.size and (idx.min() < -n or idx.max() >= n)):
        raise ShapeError(f"row indices must be a 1-D array within 0..{n - 1}, got shape {idx.shape}")
    arrays = {name: np.take(a, idx, axis=_ROW_AXIS[name]) for name, a in qt.arrays.items()}
    return QTensor(qt.fmt, (int(idx.size), k), arrays)


def slice_rows(qt: QTensor, start: int, stop: int) -> QTensor:
    """Output rows start:stop (a column-parallel shard); zero-copy for row-major arrays (all but q4g32's scales)."""
    n, k = qt.shape
    if not 0 <= start <= stop <= n:
        raise ShapeError(f"row slice {start}:{stop} is outside 0:{n}; check the shard plan")
    arrays = {}
    for name, a in qt.arrays.items():
        sl = [slice(None)] * a.ndim
        sl[_ROW_AXIS[name]] = slice(start, stop)
        arrays[name] = np.ascontiguousarray(a[tuple(sl)])
    return QTensor(qt.fmt, (stop - start, k), arrays)


def slice_cols(qt: QTensor, start: int, stop: int) -> QTensor:
    """Input columns start:stop (a row-parallel shard), copied; bounds on the format's block (k_block)."""
    n, k = qt.shape
    if not 0 <= start <= stop <= k:
        raise ShapeError(f"column slice {start}:{stop} is outside 0:{k}; check the shard plan")
    block = k_block(qt.fmt)
    if start % block or stop % block:
        raise ShapeError(
            f"{qt.fmt} column slice {start}:{stop} must start and stop on multiples of {block}, its block "
            "size; put shard boundaries on the block size, or re-quantize the tensor to a 32-block type"
        )
    if is_ggml(qt.fmt):  # whole blocks of block_bytes
        per = ggml_type_info(qt.fmt).block_bytes
        data = np.ascontiguousarray(qt.arrays["data"][:, start // block * per : stop // block * per])
        return QTensor(qt.fmt, (n, stop - start), {"data": data})
    arrays = {}
    for name, a in qt.arrays.items():
        col = _col_axis(qt.fmt, name)
        if col is None:
            arrays[name] = a
            continue
        axis, unit = col
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(start // unit, stop // unit)
        arrays[name] = np.ascontiguousarray(a[tuple(sl)])
    return QTensor(qt.fmt, (n, stop - start), arrays)


def concat_rows(parts: list[QTensor]) -> QTensor:
    """Stack matrices along N (fuse q|k|v or gate|up); same format and K required."""
    if not parts:
        raise ShapeError("concat_rows needs at least one tensor")
    fmt, k = parts[0].fmt, parts[0].shape[1]
    for p in parts:
        if p.fmt != fmt or p.shape[1] != k:
            raise ShapeError(
                f"cannot fuse {p.fmt}{list(p.shape)} with {fmt}[*, {k}]: fused weights need one format "
                "and one K; convert them to the same format first"
            )
    arrays = {
        name: np.concatenate([p.arrays[name] for p in parts], axis=_ROW_AXIS[name]) for name in parts[0].arrays
    }
    return QTensor(fmt, (sum(p.shape[0] for p in parts), k), arrays)
