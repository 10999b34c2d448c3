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


# ---- GGUF types kept as they are ("ggml:<TYPE>") ------------------------------------------------

import gguf  # noqa: E402

# Byte offsets of each block type's fp16 scale fields (from ggml-common.h's block structs); the
# rest of a block may be any bytes.
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,)}
GN, GK = 48, 512


def ggml_tensor(name: str, seed: int = 11) -> F.QTensor:
    """A valid random [48, 512] matrix of a GGML type: random block bytes, sane fp16 scales."""
    rng = _rng(seed)
    t = F.GGML_TYPES[name]
    if name in ("F16", "BF16", "F32"):
        w = rng.standard_normal((GN, GK)).astype(np.float32)
        return F.quantize(w, F.ggml_fmt(name))
    blocks = rng.integers(0, 256, (GN, GK // t.block, t.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scales = rng.uniform(1e-3, 4e-3, (GN, GK // t.block)).astype(np.float16)
        blocks[..., off : off + 2] = scales[..., None].view(np.uint8).reshape(GN, GK // t.block, 2)
    return F.QTensor(F.ggml_fmt(name), (GN, GK), {"data": blocks.reshape(GN, -1)})


def test_ggml_type_table_matches_gguf():
    for name, t in F.GGML_TYPES.items():
        assert t.type_id == int(gguf.GGMLQuantizationType[name])
        assert (t.block, t.block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def test_ggml_fmt_helpers_name_types_and_blocks():
    assert F.ggml_fmt("Q4_K") == "ggml:Q4_K" and F.ggml_fmt("F32") == "f32" and F.ggml_fmt("BF16") == "bf16"
    assert F.ggml_type_info("ggml:Q6_K").block_bytes == 210 and F.ggml_type_info("bf16").type_id == 30
    assert F.is_ggml("ggml:F16") and not F.is_ggml("f32") and not F.is_ggml("q4g32")
    assert [F.k_block(f) for f in ("ggml:Q4_K", "ggml:Q8_0", "ggml:F16", "f32", "bf16", "q4g32", "q8")] == \
        [256, 32, 1, 1, 1, 32, 1]
    assert F.bytes_per_weight("ggml:Q4_K") == 144 / 256 and F.bytes_per_weight("q4g32") == 0.625
    with pytest.raises(ShapeError, match="IQ2_XXS is not supported.*Q4_K"):
        F.ggml_fmt("IQ2_XXS")
    with pytest.raises(ShapeError):
        F.ggml_type_info("q8")


@pytest.fixture(params=[n for n in F.GGML_TYPES if n not in ("F32", "BF16")])
def gt(request) -> F.QTensor:
    return ggml_tensor(request.param)


def test_ggml_dequantize_is_gguf_bit_for_bit(gt):
    name = F.ggml_type_info(gt.fmt).name
    want = gguf.quants.dequantize(gt.arrays["data"], gguf.GGMLQuantizationType[name]).reshape(GN, GK)
    got = F.dequantize(gt)
    assert np.isfinite(got).all() and np.array_equal(got, want)


def test_ggml_row_slices_are_views_of_the_rows(gt):
    part = F.slice_rows(gt, 5, 37)
    assert np.shares_memory(part.arrays["data"], gt.arrays["data"]) and part.shape == (32, GK)
    assert np.array_equal(F.dequantize(part), F.dequantize(gt)[5:37])
    idx = _rng(12).permutation(GN)[:20]
    assert np.array_equal(F.dequantize(F.take_rows(gt, idx)), F.dequantize(gt)[idx])
    fused = F.concat_rows([F.slice_rows(gt, 0, 16), F.slice_rows(gt, 16, GN)])
    assert np.array_equal(fused.arrays["data"], gt.arrays["data"])


def test_ggml_column_slices_copy_whole_blocks_and_refuse_to_split_one(gt):
    block = F.k_block(gt.fmt)
    lo, hi = (256, 512) if block == 256 else (64, 320)
    part = F.slice_cols(gt, lo, hi)
    assert part.arrays["data"].flags.c_contiguous and not np.shares_memory(part.arrays["data"], gt.arrays["data"])
    assert np.array_equal(F.dequantize(part), F.dequantize(gt)[:, lo:hi])
    if block > 1:
        with pytest.raises(ShapeError, match=f"multiples of {block}, its block size"):
            F.slice_cols(gt, block // 2, hi)


def test_ggml_tensors_refuse_a_k_off_their_block():
    with pytest.raises(ShapeError, match="block of 256"):
        F.QTensor("ggml:Q4_K", (2, 320), {"data": np.zeros((2, 180), np.uint8)})
    with pytest.raises(ShapeError, match="tpi cannot quantize to Q4_K"):
        F.quantize(np.ones((2, 256), np.float32), "ggml:Q4_K")


@pytest.mark.parametrize("name", F.GGML_QUANTIZABLE)
def test_quantize_to_ggml_types_writes_what_gguf_writes(name):
    w = _rng(13).standard_normal((8, 256)).astype(np.float32)
    qt = F.quantize(w, F.ggml_fmt(name))
    want = gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])
    assert np.array_equal(qt.arrays["data"], np.ascontiguousarray(want).view(np.uint8).reshape(8, -1))
    assert qt.nbytes == F.fmt_nbytes(qt.fmt, qt.shape)
