"""Wire number formats for partial sums: f32, bf16 bits and q8_0 blocks, with their conversions.

q8_0 is llama.cpp's Q8_0 block (and distributed-llama's Q80 sync): 32 consecutive values of
the last dimension share one f16 scale d = max|x| / 127 and travel as int8 q = rint(x * (1 / d)),
34 bytes per 32 values (1.0625 bytes a value, against 4 for f32). Values are recovered as q * d
in f32. The bytes are ggml's reference quantizer's, except that a value exactly halfway between
two integers rounds to even here and away from zero there. A numpy array of Q8_0 has shape
[..., n / 32]: one element per block.
"""
from __future__ import annotations

import numpy as np

QK8_0 = 32
_F16_MAX = np.float32(65504)
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])  # itemsize 34, no padding
assert Q8_0.itemsize == 2 + QK8_0

# name -> bytes per value on the wire (the cost model and the planner read this too)
WIRE_BYTES_PER_VALUE = {"f32": 4.0, "bf16": 2.0, "q8_0": Q8_0.itemsize / QK8_0}
REDUCE_DTYPES = tuple(WIRE_BYTES_PER_VALUE)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = np.right_shift(u, 16)  # in-place steps after this: one temporary on the hot path
    np.bitwise_and(r, 1, out=r)
    r += 0x7FFF
    r += u
    out = np.right_shift(r, 16, out=r).astype(np.uint16)
    if np.isnan(x).any():  # rounding could carry a NaN payload into inf; keep it a quiet NaN
        nan = np.isnan(x)
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] (n a multiple of 32) -> Q8_0 blocks [..., n / 32], as ggml's reference.

    A block holding inf or NaN, or values past the f16 scale's range (|x| > 8.3e6), decodes
    to NaN: bad values stay visible instead of turning into numbers.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1] if x.ndim else 1
    if n % QK8_0:
        raise ValueError(f"q8_0 needs a last dimension that is a multiple of {QK8_0}, got {n}")
    v = x.reshape(-1, QK8_0)  # (blocks, 32)
    d = -v.min(axis=1)
    np.maximum(d, v.max(axis=1), out=d)  # max|x|: two reductions beat abs + one; this order gives +0 for 0
    d /= np.float32(127)  # the scale that maps max|x| to 127 (divided, as ggml: bit-identical d)
    out = np.empty(x.shape[:-1] + (n // QK8_0,), Q8_0)
    flat = out.reshape(-1)
    if d.max() <= _F16_MAX:  # also False for NaN
        inv = np.maximum(d, np.float32(1e-30))  # an all-zero block has d = 0: its q are 0 anyway
        np.divide(np.float32(1), inv, out=inv)
        q = v * inv[:, None]  # |q| <= 127 (+ rounding): rint fits int8
    else:  # inf, NaN or a scale past f16: that block's scale becomes NaN, its q 0
        bad = ~(d <= _F16_MAX)
        d[bad] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            q = v * np.where(bad | (d == 0), 0, 1 / d)[:, None]
        q[bad] = 0
    flat["d"] = d
    flat["qs"] = np.rint(q, out=q)
    return out


def from_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 blocks [..., m] -> float32 [..., 32 m]: q * d, exact in f32."""
    q = blocks["qs"].astype(np.float32)  # (..., m, 32)
    with np.errstate(invalid="ignore"):  # 0 * inf: a non-finite block decodes to NaN
        q *= blocks["d"].astype(np.float32)[..., None]
    return q.reshape(blocks.shape[:-1] + (blocks.shape[-1] * QK8_0,))


def wire_shape(shape: tuple, wire_dtype: str) -> tuple:
    """The shape of the array that carries a float32 array of `shape` in wire_dtype."""
    if wire_dtype != "q8_0":
        return tuple(shape)
    return tuple(shape[:-1]) + (shape[-1] // QK8_0,)


def to_wire(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """float32 -> its wire array (f32 as it is when already contiguous f32)."""
    if wire_dtype == "bf16":
        return to_bf16(x)
    if wire_dtype == "q8_0":
        return to_q8_0(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def from_wire(a: np.ndarray) -> np.ndarray:
    """A received wire array -> float32 (f32 arrays are returned as they are)."""
    if a.dtype == np.uint16:
        return from_bf16(a)
    if a.dtype == Q8_0:
        return from_q8_0(a)
    return a
