"""The ggml bindings: loading and version checks, refusals before any call ggml would abort on,
and every weight type's linear against x @ dequantize(W).T (gguf's independent numpy dequantizer)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from ggml_source import quantize_rows
from tpi.errors import TpiError, pip_install
from tpi.quant.formats import dequantize
from tpi.quant import ggml_lib
from tpi.quant.ggml_backend import GgmlBackend, GgmlLinear, can_repack, weight_type
from tpi.quant.ggml_graph import Context, GgmlShapeError, Graph
from tpi.quant.ggml_lib import F16, F32, I32, I64, Q4_0, Q4_K, Q8_0, GgmlUnavailableError, load_ggml
from tpi.quant.kernels import available_backends, get_backend

pytestmark = pytest.mark.skipif(not ggml_lib.ggml_available()[0], reason="ggml libraries not loadable here")

ALL_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
             "IQ4_NL"]
# relative to max|reference|: ggml quantizes activations to 8 bits for quantized weights (and rounds
# them to bf16 for BF16 weights), as llama.cpp does; f32/f16 keep float activations
TOLERANCE = {"F32": 1e-5, "F16": 2e-3}


def test_the_ggml_in_llama_cpp_python_loads_and_passes_its_checks():
    lib = load_ggml()
    assert ggml_lib.version_supported(lib.version), lib.version
    assert "ggml" in available_backends()
    assert lib.describe().startswith(f"ggml {lib.version}")


@pytest.mark.parametrize("text,ok", [("0.25.3", True), ("0.25.0", True), ("0.24.9", False), ("0.26.0", False),
                                     ("1.0.0", False), ("0.25", False), ("garbage", False)])
def test_version_range_is_the_0_25_series(text, ok):
    assert ggml_lib.version_supported(text) is ok


def test_missing_llama_cpp_python_is_one_error_naming_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    load_ggml.cache_clear()
    try:
        ok, reason = ggml_lib.ggml_available()
        assert not ok and pip_install("worker-fast") in reason and "'tpi[" not in reason
        with pytest.raises(TpiError, match="worker-fast"):
            get_backend("ggml")
    finally:
        monkeypatch.undo()
        load_ggml.cache_clear()
    assert ggml_lib.ggml_available()[0]


def test_a_directory_without_the_libraries_is_refused(tmp_path):
    with pytest.raises(GgmlUnavailableError, match="worker-fast"):
        ggml_lib._open(tmp_path, "ggml-base")


def test_an_unsupported_version_is_refused_before_any_use():
    code = ("import sys\nfrom tpi.quant import ggml_lib\n"
            "ggml_lib.SUPPORTED_VERSIONS = ((0, 26, 0), (0, 27, 0))\n"
            "ok, reason = ggml_lib.ggml_available()\nprint(ok, reason)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False") and "is not supported: tpi needs ggml >= 0.26.0" in done.stdout


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_every_weight_type_matches_the_numpy_dequantized_reference(name, tokens):
    rng = np.random.default_rng([ALL_TYPES.index(name), tokens])
    w = quantize_rows(rng.standard_normal((48, 512)).astype(np.float32), name)
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
    y = get_backend("ggml").prepare(w)(x)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.abs(y - ref).max() <= TOLERANCE.get(name, 2e-2) * np.abs(ref).max()


def test_repacked_layouts_compute_what_the_plain_layouts_compute():
    be = GgmlBackend(threads=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for name in ("Q4_0", "Q4_K", "IQ4_NL"):
        w = quantize_rows(rng.standard_normal((64, 256)).astype(np.float32), name)
        packed, plain = be.weight(w, repack=True), be.weight(w, repack=False)
        assert packed.repacked and not plain.repacked
        a, b = GgmlLinear(packed, be)(x), GgmlLinear(plain, be)(x)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_repacking_is_allow_listed():
    assert can_repack(Q4_0, 64) and can_repack(Q4_K, 64)
    assert not can_repack(Q4_0, 60)  # the 8x8 interleave needs N % 8 == 0
    assert not can_repack(Q8_0, 64)  # no AVX2 kernel: ggml would run a repacked tensor as plain rows
    w = quantize_rows(np.ones((12, 256), np.float32), "Q4_0")
    assert not GgmlBackend(threads=1).weight(w).repacked


def test_weight_formats_map_to_ggml_types():
    assert weight_type("ggml:Q6_K") == 14 and weight_type("f32") == F32 and weight_type("bf16") == 30
    assert weight_type("ggml:I32") is None and weight_type("q4g32") is None and weight_type("ggml:NOPE") is None


# ---- refusals: each of these would abort the process inside ggml ------------------------------

@dataclass(frozen=True)
class Corrupt:
    """A weight as a damaged shard could carry it (QTensor itself would refuse to hold it)."""

    fmt: str
    shape: tuple[int, int]
    arrays: dict


def test_a_weight_with_the_wrong_byte_count_is_refused():
    w = quantize_rows(np.ones((16, 256), np.float32), "Q4_K")
    short = Corrupt(w.fmt, w.shape, {"data": w.arrays["data"][:, :-2].copy()})
    with pytest.raises(GgmlShapeError, match="corrupt"):
        GgmlBackend(threads=1).weight(short)


def test_a_row_that_is_not_whole_blocks_is_refused():
    bad = Corrupt("ggml:Q4_K", (16, 128), {"data": np.zeros((16, 72), np.uint8)})  # Q4_K blocks are 256 wide
    with pytest.raises(GgmlShapeError, match="blocks of 256"):
        GgmlBackend(threads=1).weight(bad)


def test_mismatched_matmul_shapes_and_types_are_refused():
    ctx = Context(8, graph_size=16)
    w = ctx.new(Q4_0, 64, 8)
    with pytest.raises(GgmlShapeError):
        ctx.mul_mat(w, ctx.new(F32, 32, 1))  # K 64 vs 32
    with pytest.raises(GgmlShapeError):
        ctx.mul_mat(w, ctx.new(F16, 64, 1))  # activations must be F32
    with pytest.raises(GgmlShapeError):
        ctx.mul_mat(ctx.new(I32, 64, 8), ctx.new(F32, 64, 1))


def test_views_past_the_end_bindings_of_the_wrong_size_and_full_contexts_are_refused():
    ctx = Context(4, graph_size=8)
    t = ctx.input(np.zeros((4, 16), np.float32))  # ne [16, 4]
    with pytest.raises(GgmlShapeError):
        ctx.view(t, (16, 4), (64,), 4)  # one element past the end
    with pytest.raises(GgmlShapeError):
        ctx.bind(ctx.new(F32, 16), np.zeros(15, np.float32))
    with pytest.raises(GgmlShapeError):
        ctx.bind(ctx.new(F32, 8), np.zeros((8, 2), np.float32)[:, 0])  # not contiguous
    ctx.new(F32, 1)  # the fourth and last tensor this context has room for
    with pytest.raises(GgmlShapeError, match="beyond the context"):
        ctx.new(F32, 1)


def test_cache_writes_attention_and_rope_with_inconsistent_inputs_are_refused():
    ctx = Context(16, graph_size=32)
    cache = ctx.new(F16, 64, 32)
    rows = ctx.new(F32, 64, 2)
    with pytest.raises(GgmlShapeError):
        ctx.set_rows(cache, rows, ctx.new(I64, 3))  # 2 rows, 3 indices
    q, kv, mask = ctx.new(F32, 64, 1, 4), ctx.new(F16, 64, 32, 3), ctx.new(F16, 32, 1)
    with pytest.raises(GgmlShapeError):
        ctx.flash_attn(q, kv, kv, mask, 0.125)  # 4 query heads over 3 KV heads
    with pytest.raises(GgmlShapeError):
        ctx.rope(ctx.new(F32, 64, 4, 2), ctx.new(I32, 3), None, 64, 0, 4096, 1e4, 1.0)  # 2 tokens, 3 positions


def test_a_graph_too_big_for_its_context_is_refused():
    ctx = Context(8, graph_size=2)
    x = ctx.input(np.ones((1, 32), np.float32))
    y = ctx.add(ctx.add(x, x), x)
    with pytest.raises(GgmlShapeError, match="graph"):
        Graph(ctx, [y], [(1, 32)])


def test_the_linear_refuses_activations_of_the_wrong_width():
    lin = get_backend("ggml").prepare(quantize_rows(np.ones((8, 64), np.float32), "Q8_0"))
    with pytest.raises(GgmlShapeError, match="64 inputs"):
        lin(np.ones((1, 32), np.float32))


def test_a_graph_output_outlives_its_graph():
    """A streamed block is released before the model adds its output: the memory must still be there."""
    import gc

    from tpi.quant.ggml_runtime import CpuRuntime

    ctx = Context(4, graph_size=8)
    x = ctx.input(np.arange(8, dtype=np.float32).reshape(1, 8))
    graph = Graph(ctx, [ctx.add(x, x)], [(1, 8)])
    CpuRuntime(1).compute(graph)
    out = graph.outputs[0]
    del graph, ctx, x
    gc.collect()
    np.zeros(1 << 20, np.float32) + 1  # reuse freed memory if it were freed
    assert np.array_equal(out, 2 * np.arange(8, dtype=np.float32).reshape(1, 8))


def test_a_graph_keeps_the_weights_it_reads_alive():
    """Nothing but the graph refers to the weight: its memory must stay until the graph goes."""
    import gc

    rng = np.random.default_rng(9)
    w = quantize_rows(rng.standard_normal((64, 256)).astype(np.float32), "Q4_0")
    be = GgmlBackend(threads=1)
    ctx = Context(4, graph_size=8)
    x = np.ones((1, 256), np.float32)
    graph = Graph(ctx, [ctx.mul_mat(be.weight(w).tensor, ctx.input(x))], [(1, 64)])
    gc.collect()
    junk = [rng.standard_normal(1 << 16) for _ in range(32)]  # would land in a freed weight's memory
    be.runtime.compute(graph)
    ref = x @ dequantize(w).T
    assert np.abs(graph.outputs[0] - ref).max() <= 2e-2 * np.abs(ref).max() and len(junk) == 32
