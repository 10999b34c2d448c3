"""Exact rows: a verify pass of k+1 rows gives, bit for bit, the logits of k+1 one-token decode steps.

Speculative decoding keeps greedy output token for token plain decoding's only if this holds. ggml
picks kernels by row count (tpi.model.ggml_exact), so the reference is the engine's own decode path
run one token at a time; an F16 model (tinyBLAS at >= 2 rows) and a Q4_K_M one (the tiled K-quant
kernel at >= 8 rows, repacked Q4_K gemm; and gemma3's sliding-window layers) at 2 threads, with rows on both sides of a KV bucket edge
and past 512 cache rows (flash attention's split-KV path for one query row).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_factory import quantize_with_llama_cpp
from tpi.master import GroupOptions, start_group
from tpi.model.ggml_exact import rows_per_call

ROWS = 9  # a verify pass of 8 drafts: past the tiled kernel's 8-row threshold


@pytest.fixture(scope="module")
def exact_models(tiny_gguf, family_gguf, tiny_dir: Path) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    base = dict(arch="llama", hidden=256, intermediate=512, n_heads=4, n_kv_heads=2, context=1024)
    f16 = tiny_gguf(weight_type="F16", **base)
    return {"F16": f16, "Q4_K_M": quantize_with_llama_cpp(f16, tiny_dir / "exact-q4km.gguf", "Q4_K_M"),
            "gemma3 Q4_K_M": family_gguf("gemma3", q4_k_m=True)}  # sliding-window masks, post-norms


def decode_rows(engine, history: list[int], tokens: list[int]) -> np.ndarray:
    """Logits of tokens fed one at a time after history (already cached): the plain decode path."""
    return np.stack([engine.forward([t], len(history) + i)[-1] for i, t in enumerate(tokens)])


@pytest.mark.parametrize("ftype", ["F16", "Q4_K_M", "gemma3 Q4_K_M"])
def test_exact_rows_are_decode_steps(ftype, exact_models, tmp_path):
    group = start_group(GroupOptions(model=str(exact_models[ftype]), context=1024, threads=2, backend="ggml",
                                     config_dir=tmp_path / "config", cache_dir=tmp_path / "cache"))
    try:
        engine = group.engine
        rng = np.random.default_rng(0)
        ids = [int(t) for t in rng.integers(3, engine.cfg.vocab, 560)]
        for n in (250, 540):  # rows across the 256 bucket edge; rows past 512 cache rows
            engine.reset()
            engine.prefill(ids[:n])
            want = decode_rows(engine, ids[:n - 1], ids[n - 1:n - 1 + ROWS])
            engine.truncate(n)
            got = engine.forward(ids[n - 1:n - 1 + ROWS], n - 1, all_positions=True, exact=True)
            np.testing.assert_array_equal(got, want, f"{ftype} rows from {n - 1}")
            plain = engine.forward(ids[n - 1:n - 1 + ROWS], n - 1, all_positions=True)
            print(f"{ftype} at {n - 1}: plain many-row pass max |diff| {np.abs(plain - want).max():.3g}")
    finally:
        group.close()


def test_rows_per_call_follows_the_kernel_thresholds():
    assert rows_per_call("F16", False) == 1 and rows_per_call("IQ4_NL", False) == 1
    assert rows_per_call("Q6_K", False) == 7 and rows_per_call("Q4_K", True) == 3
    assert rows_per_call("Q4_0", False) is None and rows_per_call("Q4_0", True) is None


def test_numpy_ranks_compute_exact_rows_row_by_row(tiny_gguf, tmp_path):
    """Layers without exact rows (numpy) run an exact step block by block, row by row: a decode step's bits."""
    group = start_group(GroupOptions(model=str(tiny_gguf("tiny_llama_q4_0")), context=128, backend="numpy",
                                     config_dir=tmp_path / "config", cache_dir=tmp_path / "cache"))
    try:
        engine = group.engine
        ids = [int(t) for t in np.random.default_rng(2).integers(3, engine.cfg.vocab, 40)]
        engine.prefill(ids[:30])
        want = decode_rows(engine, ids[:29], ids[29:29 + 6])
        engine.truncate(30)
        got = engine.forward(ids[29:29 + 6], 29, all_positions=True, exact=True)
        np.testing.assert_array_equal(got, want)
    finally:
        group.close()
