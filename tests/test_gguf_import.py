"""GGUF import keeps every type as it is; the numpy / torch conversion (convert_ggml) is bounded.

References: gguf's own quantizers write the blocks and gguf's own dequantizers read them.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from tpi.errors import ModelFormatError
from tpi.quant import formats as F
from tpi.quant.gguf_import import KERNEL_FORMAT, convert_ggml, import_tensor

T = gguf.GGMLQuantizationType
N, K = 48, 256


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05


def _block_headers(data: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """fp16 (d, zero) per block as float32 [N, K/32], read straight from the block bytes."""
    size = 20 if qtype == T.Q4_1 else 18
    blocks = data.reshape(N, K // 32, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == T.Q4_0:
        return d, np.zeros_like(d)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return d, m + 8 * d


WRITABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda t: t.name)
def test_import_keeps_the_file_bytes_and_dequantizes_exactly_as_gguf(qtype):
    data = gguf.quants.quantize(_weights(1), qtype)
    qt, note = import_tensor(qtype, data, (N, K))
    assert qt.fmt == {T.F32: "f32", T.BF16: "bf16"}.get(qtype, f"ggml:{qtype.name}")
    assert note.exact and note.source_type == qtype.name and note.target_fmt == qt.fmt
    assert np.shares_memory(next(iter(qt.arrays.values())), data)  # a view of the file, not a copy
    assert np.array_equal(F.dequantize(qt), gguf.quants.dequantize(data, qtype).reshape(N, K))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_q4_blocks_convert_exactly_up_to_bf16_scale_rounding(qtype):
    data = gguf.quants.quantize(_weights(1), qtype)
    ref = gguf.quants.dequantize(data, qtype).reshape(N, K)
    qt, note = convert_ggml(import_tensor(qtype, data, (N, K))[0], measure_error=True)
    assert qt.fmt == F.Q4G32 and note.exact and note.target_fmt == F.Q4G32 and note.source_type == qtype.name
    diff = np.abs(F.dequantize(qt) - ref)
    d, zero = _block_headers(data, qtype)
    # stated bound: |q - 8| <= 8 times the scale's bf16 rounding (half an ulp: 2^-8 relative), plus the zero's
    bound = 8 * np.abs(d) * 2**-8 + np.abs(zero) * 2**-8 + 1e-7
    assert np.all(diff.reshape(N, K // 32, 32) <= bound[..., None])
    assert note.error.max_abs == pytest.approx(diff.max(), rel=1e-5, abs=1e-9)
    assert note.error.rmse == pytest.approx(np.sqrt(np.mean(diff.astype(np.float64) ** 2)), rel=1e-3)


def test_q4_1_with_bf16_exact_headers_converts_bit_exactly():
    data = gguf.quants.quantize(_weights(2), T.Q4_1).copy()
    blocks = data.reshape(N, K // 32, 20)
    rng = np.random.default_rng(3)
    d = (2.0 ** rng.integers(-10, -4, (N, K // 32))).astype(np.float16)  # exact in bf16
    m = (rng.integers(-64, 64, (N, K // 32)) / 256).astype(np.float16)
    blocks[..., 0:2] = d[..., None].view(np.uint8).reshape(N, K // 32, 2)
    blocks[..., 2:4] = m[..., None].view(np.uint8).reshape(N, K // 32, 2)
    qt, note = convert_ggml(import_tensor(T.Q4_1, data, (N, K))[0], measure_error=True)
    assert np.array_equal(F.dequantize(qt), gguf.quants.dequantize(data, T.Q4_1).reshape(N, K))
    assert note.error.max_abs == 0.0


@pytest.mark.parametrize("qtype,fmt,max_rel", [(T.Q8_0, F.Q8, 0.02), (T.Q5_0, F.Q8, 0.01), (T.F16, F.BF16, 0.004)])
def test_requantized_types_land_in_their_kernel_format(qtype, fmt, max_rel):
    data = gguf.quants.quantize(_weights(4), qtype)
    ref = gguf.quants.dequantize(data, qtype).reshape(N, K)
    qt, note = convert_ggml(import_tensor(qtype, data, (N, K))[0], measure_error=True)
    assert qt.fmt == fmt == KERNEL_FORMAT[qtype.name] and note.target_fmt == fmt and not note.exact
    got = F.quant_error(ref, qt)
    assert got.rel_rmse <= max_rel
    assert note.error.rel_rmse == pytest.approx(got.rel_rmse, rel=1e-3, abs=1e-9)


def test_conversion_in_row_chunks_equals_one_pass(monkeypatch):
    import tpi.quant.gguf_import as gi

    qt = import_tensor(T.Q8_0, gguf.quants.quantize(_weights(5), T.Q8_0), (N, K))[0]
    whole, _ = convert_ggml(qt)
    monkeypatch.setattr(gi, "CONVERT_ROWS", 7)  # 48 rows in 7 uneven chunks
    chunked, _ = convert_ggml(qt)
    for name in whole.arrays:
        assert np.array_equal(whole.arrays[name], chunked.arrays[name])


def test_plain_fmts_pass_through_conversion_untouched():
    qt = F.quantize(_weights(6), F.Q4G32)
    assert convert_ggml(qt) == (qt, None)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_1])
def test_vectors_of_any_type_become_float32(qtype):
    v = np.random.default_rng(6).standard_normal(64).astype(np.float32)
    data = gguf.quants.quantize(v, qtype)
    out, note = import_tensor(qtype, data, (64,))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (64,)
    assert np.array_equal(out, gguf.quants.dequantize(data, qtype).reshape(64))
    assert note.target_fmt == F.F32


# ---- K-quants: hand-built blocks (gguf cannot quantize them; real files: test_kquant_models.py) ----

def _kquant_blocks(qtype: T, seed: int) -> np.ndarray:
    """Random but valid K-quant blocks: random nibbles/scales with sane fp16 super-scales."""
    rng = np.random.default_rng(seed)
    n_blocks = N * K // 256
    f16 = lambda lo, hi: rng.uniform(lo, hi, (n_blocks, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    raw = lambda size: rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)  # noqa: E731
    if qtype == T.Q4_K:  # d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        parts = [f16(1e-3, 4e-3), f16(1e-3, 4e-3), raw(12), raw(128)]
    elif qtype == T.Q5_K:  # + 32 bytes of high bits before the nibbles
        parts = [f16(1e-3, 4e-3), f16(1e-3, 4e-3), raw(12), raw(32), raw(128)]
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], d
        parts = [raw(128), raw(64), raw(16), f16(1e-4, 4e-4)]
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return blocks.reshape(N, -1)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_kquants_import_exactly(qtype):
    data = _kquant_blocks(qtype, seed=7)
    qt, note = import_tensor(qtype, data, (N, K))
    assert qt.fmt == f"ggml:{qtype.name}" and note.exact
    assert np.array_equal(F.dequantize(qt), gguf.quants.dequantize(data, qtype).reshape(N, K))


def test_q4_k_maps_onto_q4g32_sub_block_for_sub_block():
    data = _kquant_blocks(T.Q4_K, seed=8)
    ref = gguf.quants.dequantize(data, T.Q4_K).reshape(N, K).astype(np.float64)
    qt, note = convert_ggml(import_tensor(T.Q4_K, data, (N, K))[0], measure_error=True)
    assert qt.fmt == F.Q4G32 and note.exact
    # Sub-block scale s = d*sc and zero z = 8s - dmin*m, from gguf's own unpacking of the 6-bit fields.
    blocks = data.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    s = (d * sc).reshape(N, K // 32)
    z = 8 * s - (dmin * m).reshape(N, K // 32)
    # only bf16 rounding (half an ulp, 2^-8 relative) of s (times |q - 8| <= 8) and of z
    bound = (8 * s + np.abs(z)) * 2**-8 + 1e-7
    diff = np.abs(F.dequantize(qt) - ref).reshape(N, K // 32, 32).max(-1)
    assert np.all(diff <= bound) and 0 < note.error.rel_rmse < 0.004


@pytest.mark.parametrize("qtype,max_rel", [(T.Q5_K, 0.01), (T.Q6_K, 0.01)])
def test_other_kquants_requantize_to_q8_with_small_reported_error(qtype, max_rel):
    data = _kquant_blocks(qtype, seed=7)
    ref = gguf.quants.dequantize(data, qtype).reshape(N, K)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    qt, note = convert_ggml(import_tensor(qtype, data, (N, K))[0], measure_error=True)
    assert qt.fmt == F.Q8 and not note.exact
    got = F.quant_error(ref, qt)
    assert 0 < got.rel_rmse <= max_rel
    assert note.error.rel_rmse == pytest.approx(got.rel_rmse, rel=1e-3)


def test_unsupported_type_names_itself_and_the_supported_ones():
    with pytest.raises(ModelFormatError, match="IQ2_XXS.*Q4_1.*Q4_K.*IQ4_NL"):
        import_tensor(T.IQ2_XXS, np.zeros((N, 66), np.uint8), (N, K))


# ---- the real SmolLM2 file -------------------------------------------------------------------

def test_smollm2_tensors_import_exactly_and_convert_within_the_bound(smollm2_reader):
    picked = [t for t in smollm2_reader.tensors if t.name.startswith("blk.0.")]
    assert {t.tensor_type for t in picked} >= {T.Q4_1, T.F32}
    for t in picked:
        shape = tuple(int(s) for s in reversed(t.shape))
        out, note = import_tensor(t.tensor_type, t.data, shape)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert note.exact
        if t.tensor_type == T.F32:
            assert np.array_equal(out, ref)
            continue
        assert out.fmt == "ggml:Q4_1" and np.array_equal(F.dequantize(out), ref)
        conv, cnote = convert_ggml(out, measure_error=True)
        diff = np.abs(F.dequantize(conv) - ref)
        assert conv.fmt == F.Q4G32 and diff.max() == pytest.approx(cnote.error.max_abs, rel=1e-5)
        assert cnote.error.rel_rmse < 0.005  # fp16 -> bf16 scale rounding only
