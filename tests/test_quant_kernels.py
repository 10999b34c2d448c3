"""Every kernel backend x format against x @ dequantize(qt).T (the numpy reference dequantizer)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from tpi.errors import TpiError
from tpi.quant import formats as F
from tpi.quant.kernels import available_backends, get_backend, int4pack_layout, torch_available

# Tolerances, relative to max|reference|:
#   torch: output is bf16 (half an ulp = 2^-8 relative) and f32 weights are rounded to bf16 -> 1e-2
#   numpy: float32 throughout, only summation order differs -> 1e-5
#   ggml: activations quantized to 8 bits (bf16 for bf16 weights), q4g32 run as Q4_1 (fp16 min) -> 2e-2
TOLERANCE = {"torch": 1e-2, "numpy": 1e-5, "ggml": 2e-2}
SHAPES = [(16, 32), (48, 96), (64, 576)]
ODD_SHAPES = [(7, 32), (8, 64), (100, 64), (24, 96)]  # N not a multiple of 16: packed kernels refuse

needs_torch = pytest.mark.skipif(not torch_available(), reason="torch not installed")


def _run(backend_name: str, qt: F.QTensor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(backend output as float32, reference output) for activations x [T, K]."""
    backend = get_backend(backend_name)
    xin = backend.activations(x)
    x_ref = F.bf16_bits_to_f32(F.f32_to_bf16_bits(x)) if backend_name == "torch" else x
    ref = x_ref.astype(np.float64) @ F.dequantize(qt).astype(np.float64).T
    return backend.to_f32(backend.prepare(qt)(xin)), ref


def _assert_close(y: np.ndarray, ref: np.ndarray, backend_name: str) -> None:
    assert y.shape == ref.shape and y.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(y - ref).max() <= TOLERANCE[backend_name] * scale


@pytest.mark.parametrize("backend_name", available_backends())
@pytest.mark.parametrize("fmt", F.FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 20])  # 20 > 16 takes the numpy q4 dequant+BLAS path
def test_backend_matches_reference_dequantization(backend_name, fmt, shape, tokens):
    rng = np.random.default_rng([F.FORMATS.index(fmt), *shape, tokens])
    qt = F.quantize(rng.standard_normal(shape).astype(np.float32), fmt)
    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
    _assert_close(*_run(backend_name, qt, x), backend_name)


@needs_torch
@pytest.mark.parametrize("fmt,kernel", [(F.Q4G32, "int4pack"), (F.Q8, "int8pack"), (F.BF16, "dense"), (F.F32, "dense")])
def test_torch_uses_packed_kernels_at_kernel_shapes(fmt, kernel):
    qt = F.quantize(np.ones((48, 96), np.float32), fmt)
    assert get_backend("torch").prepare(qt).kernel == kernel


@needs_torch
def test_int4pack_layout_matches_torch_converter_on_this_cpu():
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    rng = np.random.default_rng(1)
    for n, k in [(16, 32), (32, 64), (48, 96), (80, 576)]:
        q = rng.integers(0, 16, (n, k)).astype(np.uint8)
        want = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1).numpy()
        got = int4pack_layout(F.pack_nibbles(q), capability)
        assert got is None or np.array_equal(got, want), (capability, n, k)


_DEFAULT_CAPABILITY_CHECK = textwrap.dedent("""
    import numpy as np, torch
    from tpi.quant.formats import pack_nibbles
    from tpi.quant.kernels import int4pack_layout
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    rng = np.random.default_rng(2)
    for n, k in [(16, 32), (48, 96), (64, 64)]:
        q = rng.integers(0, 16, (n, k)).astype(np.uint8)
        want = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1).numpy()
        assert np.array_equal(int4pack_layout(pack_nibbles(q), "DEFAULT"), want), (n, k)
    print("ok")
""")


@needs_torch
@pytest.mark.slow
def test_int4pack_layout_matches_torch_converter_without_simd():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", _DEFAULT_CAPABILITY_CHECK], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


_ODD_SHAPES_SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from tpi.quant import formats as F
    from tpi.quant.kernels import get_backend
    backend = get_backend("torch")
    rng = np.random.default_rng(3)
    for n, k in {shapes}:
        for fmt in F.FORMATS:
            if fmt == F.Q4G32 and k % 32:
                continue
            qt = F.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
            w = backend.prepare(qt)
            assert w.kernel in ("dense", "dense-fallback"), (n, k, fmt, w.kernel)
            x = rng.standard_normal((2, k)).astype(np.float32)
            y = w(backend.activations(x)).float().numpy()
            xb = F.bf16_bits_to_f32(F.f32_to_bf16_bits(x))
            ref = xb @ F.dequantize(qt).T
            assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max(), (n, k, fmt)
    print("ok")
""")


@needs_torch
def test_odd_shapes_fall_back_to_dense_without_crashing():
    # In a subprocess: a segfaulting kernel must fail this test, not kill pytest.
    script = _ODD_SHAPES_SCRIPT.format(shapes=ODD_SHAPES + [(7, 33)])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("fmt", [F.Q8, F.BF16, F.F32])
def test_numpy_backend_handles_odd_shapes(fmt):
    rng = np.random.default_rng(4)
    qt = F.quantize(rng.standard_normal((7, 33)).astype(np.float32), fmt)
    _assert_close(*_run("numpy", qt, rng.standard_normal((2, 33)).astype(np.float32)), "numpy")


def test_numpy_backend_never_imports_torch():
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises
        import numpy as np
        from tpi.quant import formats as F
        from tpi.quant.kernels import get_backend, torch_available
        backend = get_backend("numpy")
        for fmt in F.FORMATS:
            qt = F.quantize(np.ones((32, 64), np.float32), fmt)
            y = backend.prepare(qt)(backend.activations(np.ones((1, 64), np.float32)))
            assert y.shape == (1, 32)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_prepare_accepts_a_plain_float_matrix():
    w = np.random.default_rng(6).standard_normal((16, 32)).astype(np.float32)
    x = np.ones((1, 32), np.float32)
    assert np.allclose(get_backend("numpy").prepare(w)(x), x @ w.T, rtol=1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(TpiError, match="numpy"):
        get_backend("cuda")
    assert isinstance(torch_available(), bool)


@needs_torch
@pytest.mark.parametrize("fmt", F.FORMATS)
def test_torch_prepare_accepts_read_only_arrays_as_from_an_mmap(fmt):
    rng = np.random.default_rng(7)
    qt = F.quantize(rng.standard_normal((32, 64)).astype(np.float32), fmt)
    for a in qt.arrays.values():
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, ref = _run("torch", qt, rng.standard_normal((2, 64)).astype(np.float32))
    _assert_close(y, ref, "torch")


@needs_torch
def test_torch_scale_zero_and_bf16_weights_are_zero_copy():
    import torch

    backend = get_backend("torch")
    q4 = F.quantize(np.ones((32, 64), np.float32), F.Q4G32)
    assert backend.prepare(q4).scale_zero.data_ptr() == q4.arrays["scale_zero"].ctypes.data
    bf = F.quantize(np.ones((32, 64), np.float32), F.BF16)
    w = backend.prepare(bf).weight
    assert w.dtype == torch.bfloat16 and w.data_ptr() == bf.arrays["weight"].ctypes.data


# ---- GGUF-typed weights: converted at prepare, q|k|v / gate|up kept apart when formats differ ----

from test_quant_formats import ggml_tensor  # noqa: E402

from tpi.quant.kernel_forms import RowConcat, kernel_block, prepare_rows, to_kernel_format  # noqa: E402


# Backends that convert GGUF types into their own kernel formats (ggml runs them as they are:
# tests/test_ggml_lib.py checks every type there).
CONVERTING = [b for b in available_backends() if b != "ggml"]


@pytest.mark.parametrize("backend_name", CONVERTING)
@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_NL"])
def test_ggml_weights_run_as_their_kernel_format(backend_name, name):
    backend = get_backend(backend_name)
    qt = ggml_tensor(name)
    converted = to_kernel_format(qt)
    assert converted.fmt in (F.Q4G32, F.Q8, F.BF16)
    x = np.random.default_rng(14).standard_normal((3, qt.shape[1])).astype(np.float32)
    y = backend.to_f32(backend.prepare(qt)(backend.activations(x)))
    assert np.array_equal(y, backend.to_f32(backend.prepare(converted)(backend.activations(x))))
    _assert_close(y, _run(backend_name, converted, x)[1], backend_name)
    assert backend.resident_nbytes(qt) == converted.nbytes


@pytest.mark.parametrize("backend_name", CONVERTING)
def test_parts_in_different_formats_compute_their_stacked_rows(backend_name):
    backend = get_backend(backend_name)
    parts = [ggml_tensor("Q4_K", 1), ggml_tensor("Q4_K", 2), ggml_tensor("Q6_K", 3)]  # q, k, v of a Q4_K_M layer
    x = np.random.default_rng(15).standard_normal((2, parts[0].shape[1])).astype(np.float32)
    w = prepare_rows(backend, parts)
    assert isinstance(w, RowConcat) and w.fmt == "q4g32+q4g32+q8" and w.out_features == 3 * parts[0].shape[0]
    y = backend.to_f32(w(backend.activations(x)))
    want = np.concatenate([backend.to_f32(backend.prepare(p)(backend.activations(x))) for p in parts], axis=-1)
    assert np.array_equal(y, want)
    fused = prepare_rows(backend, parts[:2])  # one format after conversion: one kernel
    assert not isinstance(fused, RowConcat) and fused.out_features == 2 * parts[0].shape[0]
    np.testing.assert_allclose(backend.to_f32(fused(backend.activations(x))), want[:, : fused.out_features],
                               rtol=0, atol=TOLERANCE[backend_name] * np.abs(want).max())


def test_kernel_block_fuses_parts_that_convert_to_one_format():
    backend = get_backend("numpy")
    block = {"wq": ggml_tensor("Q4_K", 1), "wk": ggml_tensor("Q4_0", 2), "wv": ggml_tensor("Q4_1", 3),
             "wo": ggml_tensor("Q6_K", 4), "attn_norm": np.ones(512, np.float32), "embed": ggml_tensor("Q8_0", 5)}
    out = kernel_block(backend, block, keep=("embed",))
    assert set(out) == {"wqkv", "wo", "attn_norm", "embed"}
    assert out["wqkv"].fmt == F.Q4G32 and out["wo"].fmt == F.Q8 and out["embed"] is block["embed"]
    parts = [to_kernel_format(block[n]) for n in ("wq", "wk", "wv")]
    assert np.array_equal(F.dequantize(out["wqkv"]), np.concatenate([F.dequantize(p) for p in parts]))
