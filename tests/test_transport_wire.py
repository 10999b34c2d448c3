"""Wire number formats: q8_0 blocks against gguf's independent Q8_0 quantizer; edge values."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from tpi.transport import protocol as p
from tpi.transport.wire import Q8_0, from_q8_0, from_wire, to_q8_0, to_wire, wire_shape


def wide_values(shape, seed: int = 0) -> np.ndarray:
    """Normal values whose magnitudes span 1e-3 .. 1e3 block by block (residual-stream-like)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-3, 4, shape[:-1] + (shape[-1] // 32, 1))
    return (rng.standard_normal(shape[:-1] + (shape[-1] // 32, 32)) * scale).reshape(shape).astype(np.float32)


def gguf_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, dequantized values) from gguf's Q8_0, an implementation independent of ours."""
    raw = quants.quantize(x, GGMLQuantizationType.Q8_0)
    return raw.reshape(-1), quants.dequantize(raw, GGMLQuantizationType.Q8_0).reshape(x.shape)


@pytest.mark.parametrize("shape", [(1, 576), (3, 2048), (1, 4096)])
def test_q8_0_blocks_are_ggml_q8_0_bytes(shape):
    x = wide_values(shape)
    blocks = to_q8_0(x)
    assert blocks.dtype == Q8_0 and blocks.shape == shape[:-1] + (shape[-1] // 32,)
    ref_bytes, ref_values = gguf_q8_0(x)
    assert np.array_equal(blocks.view(np.uint8).reshape(-1), ref_bytes)
    assert np.array_equal(from_q8_0(blocks), ref_values)


def test_q8_0_error_is_half_a_step_plus_the_f16_rounding_of_the_scale():
    x = wide_values((4, 1024), seed=3)
    y = from_q8_0(to_q8_0(x))
    step = np.abs(x).reshape(4, 32, 32).max(axis=-1, keepdims=True).astype(np.float64) / 127
    scale_error = np.abs(step.astype(np.float16).astype(np.float64) - step)  # large for tiny (subnormal) scales
    err = np.abs(y.astype(np.float64) - x).reshape(4, 32, 32)
    assert np.all(err <= step / 2 + 127 * scale_error + 1e-6 * step)


def test_q8_0_keeps_zero_blocks_exact_and_bad_blocks_nan():
    x = np.zeros((1, 128), np.float32)
    x[0, 40], x[0, 70], x[0, 100] = np.nan, np.inf, 1e7  # blocks 1, 2, 3; block 0 stays zeros
    x[0, 101] = 0.25
    with np.errstate(all="raise"):  # no warnings either: a worker's log stays clean
        y = from_q8_0(to_q8_0(x))
    assert np.array_equal(y[0, :32], np.zeros(32, np.float32)) and not np.signbit(y[0, :32]).any()
    assert np.isnan(y[0, 32:128]).all()  # NaN, inf and past the f16 scale's range: visible, not numbers


def test_q8_0_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        to_q8_0(np.zeros((1, 100), np.float32))


def test_wire_helpers_round_trip_every_reduce_dtype():
    x = wide_values((2, 64), seed=5)
    for wire in p.REDUCE_DTYPES:
        a = to_wire(x, wire)
        assert a.shape == wire_shape(x.shape, wire) and p.wire_dtype_of(a) == wire
        back = from_wire(a)
        assert back.dtype == np.float32 and back.shape == x.shape
        assert np.allclose(back, x, rtol=0.02, atol=np.abs(x).max() / 200)
    assert to_wire(x, "f32") is x  # no copy on the f32 wire


def test_q8_0_partial_round_trips_the_codec_and_its_size_is_checked():
    blocks = to_q8_0(wide_values((1, 576)))
    frames = [bytes(f) for f in p.encode(p.Partial(2, blocks, seq=7))]
    assert len(frames[1]) == 18 * 34
    got = p.decode(frames)
    assert got.x.dtype == Q8_0 and np.array_equal(got.x.view(np.uint8), blocks.view(np.uint8))
    with pytest.raises(p.ProtocolError, match="needs 612 bytes"):
        p.decode([frames[0], frames[1][:-1]])


def test_other_dtypes_cannot_travel_as_partial_sums():
    with pytest.raises(p.ProtocolError, match="f32, bf16 or q8_0"):
        p.decode([bytes(f) for f in p.encode(p.Partial(1, np.zeros(4, np.int8)))])
