"""GGUF tensors -> QTensors in their own GGML types, and GGML types -> the numpy/torch kernel formats.

Import keeps every type as it is (rows of blocks, as in the file). The numpy and torch backends
run q4g32 / q8 / bf16 kernels, so they convert at prepare time (convert_ggml): Q4_0 / Q4_1 / Q4_K
map block for block onto q4g32 (the only loss is fp16 -> bf16 rounding of each 32 weights' scale
and zero); the other types are dequantized by gguf and requantized to q8 (bf16 for F16).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpi.errors import ModelFormatError
from tpi.quant.formats import (
    BF16, F32, GGML_TYPES, GROUP, Q4G32, Q8, QTensor, QuantError, bf16_bits_to_f32, concat_rows, dequantize,
    f32_to_bf16_bits, ggml_fmt, ggml_type_info, is_ggml, q4g32_from_parts, quant_error, quantize,
)

SUPPORTED = tuple(GGML_TYPES)
# What the numpy / torch kernels run for each GGML type. Only 4-bit affine blocks of 32 map onto
# q4g32 exactly; requantizing anything else to 4 bits measured 0.88-0.97 logit correlation with
# llama.cpp on tiny Q5_K_M / Q3_K_M / Q2_K / IQ4_NL / Q5_0 models, against >= 0.997 through q8.
KERNEL_FORMAT = {
    "F16": BF16, "Q4_0": Q4G32, "Q4_1": Q4G32, "Q4_K": Q4G32, "Q5_0": Q8, "Q5_1": Q8, "Q8_0": Q8,
    "Q2_K": Q8, "Q3_K": Q8, "Q5_K": Q8, "Q6_K": Q8, "IQ4_NL": Q8,
}
_BLOCK_MAPPED = ("Q4_0", "Q4_1")
CONVERT_ROWS = 2048  # rows dequantized at once when requantizing: bounds the float32 transient


@dataclass(frozen=True)
class ImportNote:
    """What one tensor's import or conversion did: exact means the values did not change (or only widened)."""

    source_type: str
    target_fmt: str
    exact: bool
    error: QuantError | None  # vs gguf's own dequantization; None for vectors, exact imports, or unmeasured


def unsupported_type(type_name: str, shape: tuple[int, ...]) -> ModelFormatError:
    return ModelFormatError(
        f"GGUF tensor type {type_name} (shape {list(shape)}) is not supported; tpi loads "
        f"{', '.join(SUPPORTED)}. Re-quantize the model to one of those (e.g. Q4_K_M or Q8_0) with llama.cpp"
    )


def import_tensor(ggml_type, data: np.ndarray, shape: tuple[int, ...]) -> tuple[QTensor | np.ndarray, ImportNote]:
    """One GGUF tensor (type id or enum, `tensor.data`, numpy-order shape) -> float32 vector or QTensor.

    Matrices keep their bytes: a view of `data` (F32 "f32", BF16 "bf16", others "ggml:<TYPE>").
    """
    type_id = int(ggml_type)
    t = next((t for t in GGML_TYPES.values() if t.type_id == type_id), None)
    shape = tuple(int(s) for s in shape)
    if t is None:
        name = getattr(ggml_type, "name", f"id {type_id}")
        raise unsupported_type(name, shape)
    raw = np.ascontiguousarray(data)
    if len(shape) == 1:
        vec = dequantize(QTensor(ggml_fmt(t.name), (1, shape[0]), _arrays(t.name, raw.view(np.uint8).reshape(1, -1))))
        return vec.reshape(shape), ImportNote(t.name, F32, True, None)
    if len(shape) != 2:
        raise ModelFormatError(
            f"GGUF tensor of shape {list(shape)} has {len(shape)} dimensions; tpi imports vectors and matrices only"
        )
    qt = QTensor(ggml_fmt(t.name), shape, _arrays(t.name, raw.view(np.uint8).reshape(shape[0], -1)))
    return qt, ImportNote(t.name, qt.fmt, True, None)


def _arrays(type_name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Byte rows [N, row_bytes] -> the QTensor arrays of that type's fmt (views, no copy)."""
    if type_name == "F32":
        return {"weight": rows.view(np.float32)}
    if type_name == "BF16":
        return {"weight": rows.view(np.uint16)}
    return {"data": rows}


def convert_ggml(qt: QTensor, *, measure_error: bool = False) -> tuple[QTensor, ImportNote | None]:
    """A ggml:<TYPE> matrix in the kernel format the numpy / torch backends run (KERNEL_FORMAT).

    Other fmts come back as they are, with note None. measure_error=False skips the error report.
    """
    if not is_ggml(qt.fmt):
        return qt, None
    name = ggml_type_info(qt.fmt).name
    target = KERNEL_FORMAT[name]
    if name in _BLOCK_MAPPED:
        out, err = _q4_blocks_to_q4g32(name, qt.arrays["data"], qt.shape, measure_error)
        return out, ImportNote(name, Q4G32, True, err)
    if name == "Q4_K":
        out = _q4k_blocks_to_q4g32(qt.arrays["data"], qt.shape)
        return out, ImportNote(name, Q4G32, True, quant_error(dequantize(qt), out) if measure_error else None)
    n = qt.shape[0]
    parts = []
    for s in range(0, n, CONVERT_ROWS):  # per-row and per-group quantizers: row chunks convert alike
        rows = qt.arrays["data"][s : s + CONVERT_ROWS]
        parts.append(quantize(dequantize(QTensor(qt.fmt, (rows.shape[0], qt.shape[1]), {"data": rows})), target))
    out = concat_rows(parts) if len(parts) > 1 else parts[0]
    return out, ImportNote(name, target, False, quant_error(dequantize(qt), out) if measure_error else None)


def _q4_blocks_to_q4g32(name: str, data: np.ndarray, shape: tuple[int, int],
                        measure_error: bool = True) -> tuple[QTensor, QuantError | None]:
    """Map Q4_0/Q4_1 blocks onto q4g32 without touching the nibbles."""
    n, k = shape
    block_bytes = ggml_type_info("ggml:" + name).block_bytes
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(n, k // GROUP, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8.0 * d  # d*q + m == (q - 8)*d + (m + 8d)
    else:
        zero = np.zeros_like(d)  # d*(q - 8)
    qs = blocks[..., block_bytes - 16:]  # [N, K/32, 16]: low nibbles hold elements 0..15, high 16..31
    even, odd = qs[..., 0::2], qs[..., 1::2]
    packed = np.empty((n, k // GROUP, 16), dtype=np.uint8)
    packed[..., :8] = (even & np.uint8(0x0F)) | (odd << np.uint8(4))  # elements 2i, 2i+1 for i < 8
    packed[..., 8:] = (even >> np.uint8(4)) | (odd & np.uint8(0xF0))  # elements 16+2i, 17+2i
    scale_bits, zero_bits = f32_to_bf16_bits(d), f32_to_bf16_bits(zero)
    sz = np.stack([scale_bits.T, zero_bits.T], axis=-1)  # [K/32, N, 2]
    qt = QTensor(Q4G32, (n, k), {"qweight": packed.reshape(n, k // 2), "scale_zero": np.ascontiguousarray(sz)})
    if not measure_error:
        return qt, None
    return qt, _rounding_error(qs, d, zero, bf16_bits_to_f32(scale_bits), bf16_bits_to_f32(zero_bits))


def _q4k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes per super-block -> 6-bit (scale, min) of its 8 sub-blocks, [..., 8] each.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales / mins 4-7 take their low 4 bits
    from bytes 8-11 (low / high nibble) and their top 2 bits from the top of bytes 0-3 / 4-7.
    """
    s = scales.astype(np.uint8)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def _q4k_blocks_to_q4g32(data: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """Q4_K onto q4g32, sub-block for sub-block: each 32 weights are d*sc*q - dmin*m, q in 0..15,
    which is (q - 8)*scale + zero with scale = d*sc, zero = 8*d*sc - dmin*m (rounded to bf16)."""
    n, k = shape
    blocks = np.ascontiguousarray(data).reshape(n, k // 256, 144)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [N, K/256, 1]
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _q4k_scales_mins(blocks[..., 4:16])  # [N, K/256, 8]
    scale = d * sc.astype(np.float32)
    zero = 8.0 * scale - dmin * mn.astype(np.float32)
    qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)  # 4 chunks of 64: low nibbles first, then high
    q = np.stack([qs & np.uint8(15), qs >> np.uint8(4)], axis=3)  # [N, K/256, 4, 2, 32]
    return q4g32_from_parts(q.reshape(n, k), scale.reshape(n, k // GROUP), zero.reshape(n, k // GROUP))


def _nibble_moment_table() -> np.ndarray:
    """Per byte value: (x_lo^2 + x_hi^2) << 9 | (x_lo + x_hi + 16) with x = nibble - 8, as float32.

    A block's 16 entries sum to < 2^24, so one float32 gather + matvec gives both moments exactly.
    """
    b = np.arange(256)
    lo, hi = (b & 15) - 8, (b >> 4) - 8
    return (((lo * lo + hi * hi) << 9) | (lo + hi + 16)).astype(np.float32)


def _rounding_error(qs: np.ndarray, d: np.ndarray, zero: np.ndarray, d_bf: np.ndarray, zero_bf: np.ndarray) -> QuantError:
    """Exact error of bf16-rounded (scale, zero) vs the fp16 originals, from per-block nibble moments.

    Per element w = x*d + z with x = q - 8; the error x*a + c (a, c per block) is summed as
    a^2*S2 + 2ac*S1 + 32c^2, so there is no float maths per element. qs: uint8 [N, K/32, 16].
    """
    packed = (_nibble_moment_table()[qs] @ np.ones(16, dtype=np.float32)).astype(np.int64)  # [N, K/32]
    s1 = ((packed & 511) - 16 * 16).astype(np.float64)
    s2 = (packed >> 9).astype(np.float64)
    a, c = (d_bf - d).astype(np.float64), (zero_bf - zero).astype(np.float64)
    d64, z64 = d.astype(np.float64), zero.astype(np.float64)
    count = qs.size * 2
    mse = float((a * a * s2 + 2 * a * c * s1 + GROUP * c * c).sum()) / count
    ms_ref = float((d64 * d64 * s2 + 2 * d64 * z64 * s1 + GROUP * z64 * z64).sum()) / count
    lo, hi = qs & np.uint8(15), qs >> np.uint8(4)
    x_min = np.minimum(lo, hi).min(axis=-1).astype(np.float64) - 8.0
    x_max = np.maximum(lo, hi).max(axis=-1).astype(np.float64) - 8.0
    max_abs = float(np.maximum(np.abs(a * x_min + c), np.abs(a * x_max + c)).max())  # linear in x: ends win
    rmse, rms = float(np.sqrt(max(mse, 0.0))), float(np.sqrt(max(ms_ref, 0.0)))
    return QuantError(rmse=rmse, rel_rmse=rmse / rms if rms > 0 else 0.0, max_abs=max_abs)


