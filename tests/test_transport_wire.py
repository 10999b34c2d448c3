"""Wire number formats: int8 blocks against a plain per-value reference; edge values; the codec."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tpi.transport import protocol as p
from tpi.transport.wire import INT8_BLOCK, from_int8_blocks, from_wire, to_int8_blocks, to_wire, wire_shape


def wide_values(shape, seed: int = 0) -> np.ndarray:
    """Heavy-tailed values whose block magnitudes span 1e-3 .. 1e3 (residual-stream-like)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-3, 4, shape[:-1] + (shape[-1] // 32, 1))
    return (rng.standard_t(3, shape[:-1] + (shape[-1] // 32, 32)) * scale).reshape(shape).astype(np.float32)


def reference_block(values) -> tuple[float, list[int]]:
    """One block the slow way, with Python floats: (scale, codes)."""
    amax = max(abs(float(v)) for v in values)
    bits = int(np.float32(amax).view(np.uint32))
    scale = float(np.uint32(((bits + 0xFFFF) >> 16) << 16).view(np.float32))  # bf16, rounded up
    codes = [int(math.copysign(round(127 * math.sqrt(abs(float(v)) / scale)), float(v))) if scale else 0
             for v in values]
    return scale, codes


@pytest.mark.parametrize("shape", [(1, 576), (3, 64)])
def test_int8_blocks_match_a_per_value_reference(shape):
    x = wide_values(shape)
    blocks = to_int8_blocks(x)
    assert blocks.dtype == INT8_BLOCK and blocks.shape == shape[:-1] + (shape[-1] // 32,)
    flat_x, flat_b = x.reshape(-1, 32), blocks.reshape(-1)
    back = from_int8_blocks(blocks).reshape(-1, 32)
    mismatched = 0
    for values, block, got in zip(flat_x, flat_b, back):
        scale, codes = reference_block(values)
        assert float(np.uint32(int(block["s"]) << 16).view(np.float32)) == scale
        diff = np.abs(block["q"].astype(int) - np.array(codes))
        assert diff.max() <= 1  # float32 vs float64 arithmetic may land on the other side of a .5
        mismatched += int(diff.sum())
        expect = [math.copysign((q / 127) ** 2 * scale, q) for q in block["q"].tolist()]
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=0)
    assert mismatched <= x.size // 500


def test_int8_error_is_half_a_code_step():
    x = wide_values((4, 1024), seed=3).astype(np.float64)
    y = from_int8_blocks(to_int8_blocks(x.astype(np.float32))).astype(np.float64)
    s = np.abs(x).reshape(4, 32, 32).max(axis=-1, keepdims=True) * (1 + 2 ** -8)  # the scale, rounded up
    q = 127 * np.sqrt(np.abs(x).reshape(4, 32, 32) / s)  # the exact code position of each value
    half_step = s * (2 * q + 1) / (2 * 127 ** 2)  # half the distance to the next code
    assert np.all(np.abs(y - x).reshape(4, 32, 32) <= half_step * (1 + 1e-5))


def test_int8_keeps_zero_blocks_exact_and_bad_blocks_nan():
    x = np.zeros((1, 128), np.float32)
    x[0, 40], x[0, 70], x[0, 100] = np.nan, np.inf, 3.4e38  # blocks 1, 2, 3; block 0 stays zeros
    x[0, 101] = 0.25
    with np.errstate(all="raise"):  # no warnings either: a worker's log stays clean
        y = from_int8_blocks(to_int8_blocks(x))
    assert np.array_equal(y[0, :32], np.zeros(32, np.float32))
    assert np.isnan(y[0, 32:128]).all()  # NaN, inf and the scale rounded past f32: visible, not numbers
    tiny = np.full((1, 32), 1e-30, np.float32)
    assert np.allclose(from_int8_blocks(to_int8_blocks(tiny)), tiny, rtol=1e-2)  # f32's small range too


def test_int8_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        to_int8_blocks(np.zeros((1, 100), np.float32))


def test_wire_helpers_round_trip_every_reduce_dtype():
    x = wide_values((2, 64), seed=5)
    for wire in p.REDUCE_DTYPES:
        a = to_wire(x, wire)
        assert a.shape == wire_shape(x.shape, wire) and p.wire_dtype_of(a) == wire
        back = from_wire(a)
        assert back.dtype == np.float32 and back.shape == x.shape
        block_max = np.abs(x).reshape(2, 2, 32).max(-1, keepdims=True)
        assert np.all(np.abs(back - x).reshape(2, 2, 32) <= 0.02 * block_max)
    assert to_wire(x, "f32") is x  # no copy on the f32 wire


def test_int8_partial_round_trips_the_codec_and_its_size_is_checked():
    blocks = to_int8_blocks(wide_values((1, 576)))
    frames = [bytes(f) for f in p.encode(p.Partial(2, blocks, seq=7))]
    assert len(frames[1]) == 18 * 34
    got = p.decode(frames)
    assert got.x.dtype == INT8_BLOCK and np.array_equal(got.x.view(np.uint8), blocks.view(np.uint8))
    with pytest.raises(p.ProtocolError, match="needs 612 bytes"):
        p.decode([frames[0], frames[1][:-1]])


def test_other_dtypes_cannot_travel_as_partial_sums():
    with pytest.raises(p.ProtocolError, match="f32, bf16 or int8"):
        p.decode([bytes(f) for f in p.encode(p.Partial(1, np.zeros(4, np.int8)))])
