"""GGUF tensor types -> native formats (numpy + gguf, no torch).

Q4_0 / Q4_1 map block for block onto q4g32 (the only loss is fp16 -> bf16 rounding of the
scale and zero); everything else is dequantized by gguf and requantized, with the error reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from tpi.errors import ModelFormatError
from tpi.quant.formats import (
    BF16, F32, GROUP, Q4G32, Q8, QTensor, QuantError, bf16_bits_to_f32, f32_to_bf16_bits, quant_error, quantize,
)

T = gguf.GGMLQuantizationType

# Lossy conversions: source type -> native target (after gguf dequantize).
_REQUANTIZE = {
    T.Q8_0: Q8, T.Q5_0: Q8, T.Q5_1: Q8, T.Q6_K: Q8,
    T.Q4_K: Q4G32, T.Q5_K: Q4G32,
}
_BLOCK_MAPPED = (T.Q4_0, T.Q4_1)
_PLAIN = (T.F32, T.F16, T.BF16)
SUPPORTED = tuple(t.name for t in (*_BLOCK_MAPPED, *_REQUANTIZE, *_PLAIN))


@dataclass(frozen=True)
class ImportNote:
    """What one tensor's import did: exact means no requantization (block mapping or a widening)."""

    source_type: str
    target_fmt: str
    exact: bool
    error: QuantError | None  # vs gguf's own dequantization; None for vectors and f32


def _unsupported(ggml_type: T, shape: tuple[int, ...]) -> ModelFormatError:
    return ModelFormatError(
        f"GGUF tensor type {ggml_type.name} (shape {list(shape)}) is not supported; tpi imports "
        f"{', '.join(SUPPORTED)}. Re-quantize the model to one of those (e.g. Q4_1 or Q8_0) with llama.cpp"
    )


def _gguf_dequantize(ggml_type: T, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values exactly as gguf decodes them (Q8_0 and BF16 decoded here, faster)."""
    if ggml_type == T.Q8_0 and len(shape) == 2:
        blocks = np.ascontiguousarray(data).view(np.uint8).reshape(shape[0], shape[1] // GROUP, 34)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [N, K/32, 1]
        return (blocks[..., 2:].view(np.int8) * d).reshape(shape)
    if ggml_type == T.BF16:
        return bf16_bits_to_f32(np.ascontiguousarray(data).view(np.uint16)).reshape(shape)
    return np.asarray(gguf.quants.dequantize(data, ggml_type), dtype=np.float32).reshape(shape)


def _q4_blocks_to_q4g32(ggml_type: T, data: np.ndarray, shape: tuple[int, int],
                        measure_error: bool = True) -> tuple[QTensor, QuantError | None]:
    """Map Q4_0/Q4_1 blocks onto q4g32 without touching the nibbles."""
    n, k = shape
    block_bytes = 20 if ggml_type == T.Q4_1 else 18
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(n, k // GROUP, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if ggml_type == T.Q4_1:
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


def import_tensor(
    ggml_type: T,
    data: np.ndarray,
    shape: tuple[int, ...],
    *,
    keep_bf16_above: float | None = None,
    measure_error: bool = True,
) -> tuple[QTensor | np.ndarray, ImportNote]:
    """Convert one GGUF tensor (`GGUFReader.tensors[i].data`, numpy-order shape) to a native form.

    Vectors become float32 arrays; matrices become a QTensor. With keep_bf16_above set, a lossy
    conversion whose rel_rmse exceeds it is stored as bf16 instead. measure_error=False skips the
    error report (it costs more than the conversion itself); the note's error is then None.
    """
    ggml_type = T(ggml_type)
    shape = tuple(int(s) for s in shape)
    supported = ggml_type in _BLOCK_MAPPED or ggml_type in _REQUANTIZE or ggml_type in _PLAIN
    if not supported:
        raise _unsupported(ggml_type, shape)
    if len(shape) == 1:
        return _gguf_dequantize(ggml_type, data, shape), ImportNote(ggml_type.name, F32, True, None)
    if len(shape) != 2:
        raise ModelFormatError(
            f"GGUF tensor of shape {list(shape)} has {len(shape)} dimensions; tpi imports vectors and matrices only"
        )
    n, k = shape
    if ggml_type == T.F32:
        w = np.ascontiguousarray(np.asarray(data, dtype=np.float32).reshape(shape))
        return QTensor(F32, (n, k), {"weight": w}), ImportNote(ggml_type.name, F32, True, None)
    if ggml_type == T.BF16:
        bits = np.ascontiguousarray(data).view(np.uint16).reshape(shape).copy()
        return QTensor(BF16, (n, k), {"weight": bits}), ImportNote(ggml_type.name, BF16, True, QuantError(0.0, 0.0, 0.0))
    if ggml_type == T.F16:
        ref = _gguf_dequantize(ggml_type, data, shape)
        qt = quantize(ref, BF16)
        return qt, ImportNote(ggml_type.name, BF16, False, quant_error(ref, qt) if measure_error else None)
    if ggml_type in _BLOCK_MAPPED:
        qt, err = _q4_blocks_to_q4g32(ggml_type, data, (n, k), measure_error)
        return qt, ImportNote(ggml_type.name, Q4G32, True, err)
    ref = _gguf_dequantize(ggml_type, data, shape)
    qt = quantize(ref, _REQUANTIZE[ggml_type])
    if not measure_error and keep_bf16_above is None:
        return qt, ImportNote(ggml_type.name, qt.fmt, False, None)
    err = quant_error(ref, qt)
    if keep_bf16_above is not None and err.rel_rmse > keep_bf16_above:
        qt = quantize(ref, BF16)
        err = quant_error(ref, qt)
    return qt, ImportNote(ggml_type.name, qt.fmt, False, err)
