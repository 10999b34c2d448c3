"""Native formats: bf16 rounding, byte layout, quantize/dequantize bounds, byte slicing."""
from __future__ import annotations

import numpy as np
import pytest

from tpi.errors import ShapeError
from tpi.quant import formats as F


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- bf16 -------------------------------------------------------------------------------------

def _bf16_nearest_even(x: float) -> int:
    """Independent scalar reference: pick the nearer of the two bf16 neighbours, ties to even."""
    u = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    lo, hi = u >> 16, (u >> 16) + 1
    as_f = lambda b: float(np.array([b << 16], dtype=np.uint32).view(np.float32)[0])  # noqa: E731
    d_lo, d_hi = abs(x - as_f(lo)), abs(as_f(hi) - x)
    if d_lo != d_hi:
        return lo if d_lo < d_hi else hi
    return lo if lo % 2 == 0 else hi


def test_bf16_rounding_matches_scalar_nearest_even_reference():
    x = np.concatenate([_rng().standard_normal(2000) * 10.0 ** _rng(1).integers(-20, 20, 2000)]).astype(np.float32)
    got = F.f32_to_bf16_bits(x)
    want = np.array([_bf16_nearest_even(float(v)) for v in x], dtype=np.uint16)
    assert np.array_equal(got, want)


def test_bf16_ties_go_to_even_and_specials_survive():
    vals = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -0.0, np.inf, -np.inf], dtype=np.float32)
    assert F.f32_to_bf16_bits(vals).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x8000, 0x7F80, 0xFF80]
    assert np.isnan(F.bf16_bits_to_f32(F.f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_bf16_values_round_trip_exactly():
    bits = _rng().integers(0, 0x7F80, 5000).astype(np.uint16)  # finite positives
    assert np.array_equal(F.f32_to_bf16_bits(F.bf16_bits_to_f32(bits)), bits)


# ---- layout and dequantize ----------------------------------------------------------------------

def test_q4g32_bytes_and_dequantize_follow_the_documented_layout():
    rng = _rng(2)
    n, k = 3, 64
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float32)
    zero = rng.uniform(-0.5, 0.5, (n, k // 32)).astype(np.float32)
    qt = F.q4g32_from_parts(q, scale, zero)
    qw, sz = qt.arrays["qweight"], qt.arrays["scale_zero"]
    for r in range(n):
        for j in range(k // 2):
            assert qw[r, j] == q[r, 2 * j] | (q[r, 2 * j + 1] << 4)
    assert sz.shape == (k // 32, n, 2)
    d = F.dequantize(qt)
    for r in range(n):
        for c in range(k):
            s = float(F.bf16_bits_to_f32(sz[c // 32, r, 0]))
            z = float(F.bf16_bits_to_f32(sz[c // 32, r, 1]))
            assert d[r, c] == pytest.approx((int(q[r, c]) - 8) * s + z, rel=1e-6, abs=1e-7)


def test_q4g32_recovers_exactly_representable_weights():
    rng = _rng(3)
    n, k = 16, 96
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    q[:, ::32] = 0  # every group spans the full 0..15 range, so min/max finds the grid
    q[:, 1::32] = 15
    scale = 2.0 ** rng.integers(-8, -2, (n, k // 32)).astype(np.float32)
    zero = rng.integers(-64, 64, (n, k // 32)).astype(np.float32) / 128.0
    w = (q.reshape(n, -1, 32).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    qt = F.quantize(w.reshape(n, k), F.Q4G32)
    assert np.array_equal(F.dequantize(qt), w.reshape(n, k))
    assert np.array_equal(F.unpack_nibbles(qt.arrays["qweight"]), q)


def test_q4g32_error_is_within_half_a_step_per_group():
    w = _rng(4).standard_normal((40, 128)).astype(np.float32)
    qt = F.quantize(w, F.Q4G32)
    g = w.reshape(40, 4, 32)
    step = (g.max(-1) - g.min(-1)) / 15
    err = np.abs(F.dequantize(qt) - w).reshape(40, 4, 32).max(-1)
    # half a step, plus the grid ends moved by bf16 rounding (2^-8 relative) of scale (8 steps) and zero
    bound = 0.5 * step + 8 * step * 2**-8 + np.abs(g).max(-1) * 2**-8
    assert np.all(err <= bound)


def test_q8_error_is_within_half_a_step_per_row():
    w = _rng(5).standard_normal((24, 70)).astype(np.float32)
    qt = F.quantize(w, F.Q8)
    step = np.abs(w).max(1) / 127
    assert np.all(np.abs(F.dequantize(qt) - w).max(1) <= 0.5 * step * (1 + 2**-6))
    assert qt.arrays["qweight"].dtype == np.int8 and qt.arrays["scale"].dtype == np.uint16


def test_bf16_and_f32_formats_round_trip():
    w = _rng(6).standard_normal((5, 7)).astype(np.float32)
    assert np.array_equal(F.dequantize(F.quantize(w, F.F32)), w)
    assert np.array_equal(F.dequantize(F.quantize(w, F.BF16)), F.bf16_bits_to_f32(F.f32_to_bf16_bits(w)))


def test_quant_error_reports_rmse_relative_and_max():
    w = _rng(7).standard_normal((16, 64)).astype(np.float32)
    qt = F.quantize(w, F.Q4G32)
    diff = F.dequantize(qt).astype(np.float64) - w
    e = F.quant_error(w, qt)
    assert e.rmse == pytest.approx(np.sqrt(np.mean(diff**2)), rel=1e-4)
    assert e.rel_rmse == pytest.approx(e.rmse / np.sqrt(np.mean(w.astype(np.float64) ** 2)), rel=1e-4)
    assert e.max_abs == pytest.approx(np.abs(diff).max(), rel=1e-6)
    assert F.quant_error(w, F.quantize(w, F.F32)).rmse == 0.0


def test_nbytes_counts_every_array():
    qt = F.quantize(np.ones((32, 64), np.float32), F.Q4G32)
    assert qt.nbytes == 32 * 32 + 2 * 32 * 2 * 2


def test_bad_arrays_and_shapes_are_refused():
    with pytest.raises(ShapeError):
        F.quantize(np.ones((4, 40), np.float32), F.Q4G32)  # K not a multiple of 32
    with pytest.raises(ShapeError):
        F.QTensor(F.Q8, (2, 4), {"qweight": np.zeros((2, 4), np.uint8), "scale": np.zeros(2, np.uint16)})
    with pytest.raises(ShapeError):
        F.quantize(np.ones((2, 4), np.float32), "q3")


# ---- slicing ----------------------------------------------------------------------------------

@pytest.fixture(params=F.FORMATS)
def qt(request) -> F.QTensor:
    return F.quantize(_rng(8).standard_normal((48, 128)).astype(np.float32), request.param)


def test_slice_rows_equals_slicing_the_dequantized_matrix(qt):
    assert np.array_equal(F.dequantize(F.slice_rows(qt, 5, 37)), F.dequantize(qt)[5:37])
    assert F.slice_rows(qt, 5, 37).shape == (32, 128)


def test_slice_cols_equals_slicing_the_dequantized_matrix(qt):
    assert np.array_equal(F.dequantize(F.slice_cols(qt, 32, 96)), F.dequantize(qt)[:, 32:96])


def test_take_rows_gathers_rows_in_order(qt):
    idx = _rng(9).permutation(48)[:20]
    assert np.array_equal(F.dequantize(F.take_rows(qt, idx)), F.dequantize(qt)[idx])


def test_concat_rows_fuses_to_the_stacked_matrix(qt):
    parts = [F.slice_rows(qt, 0, 16), F.slice_rows(qt, 16, 20), F.slice_rows(qt, 20, 48)]
    fused = F.concat_rows(parts)
    assert fused.shape == qt.shape
    for name in qt.arrays:
        assert np.array_equal(fused.arrays[name], qt.arrays[name])


def test_slices_are_pure_byte_slices_of_the_q4g32_arrays():
    qt = F.quantize(_rng(10).standard_normal((32, 128)).astype(np.float32), F.Q4G32)
    part = F.slice_cols(F.slice_rows(qt, 16, 32), 64, 128)
    assert np.array_equal(part.arrays["qweight"], qt.arrays["qweight"][16:32, 32:64])
    assert np.array_equal(part.arrays["scale_zero"], qt.arrays["scale_zero"][2:4, 16:32])


def test_q4g32_column_slices_must_sit_on_group_boundaries():
    qt = F.quantize(np.ones((16, 128), np.float32), F.Q4G32)
    with pytest.raises(ShapeError, match="multiples of 32"):
        F.slice_cols(qt, 16, 64)
    with pytest.raises(ShapeError):
        F.slice_rows(qt, 0, 17)
    with pytest.raises(ShapeError):
        F.take_rows(qt, np.array([16]))


def test_concat_rows_refuses_mixed_formats_or_widths():
    a = F.quantize(np.ones((4, 64), np.float32), F.Q8)
    with pytest.raises(ShapeError):
        F.concat_rows([a, F.quantize(np.ones((4, 64), np.float32), F.BF16)])
    with pytest.raises(ShapeError):
        F.concat_rows([a, F.quantize(np.ones((4, 32), np.float32), F.Q8)])
