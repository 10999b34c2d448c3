"""`tpi convert`: the native file runs with the same logits as its source, and reports errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from tpi.master.engine import EngineOptions, build_local_engine

TOKENS = [5, 9, 33, 120, 7, 64, 2, 18]


def logits(path) -> np.ndarray:
    return build_local_engine(EngineOptions(model=str(path), context=32, threads=1)).forward(TOKENS, 0, all_positions=True)


def run_convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpi", "convert", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_converted_gguf_gives_identical_logits_and_keeps_its_types(tmp_path, tiny_gguf):
    src = tiny_gguf("tiny_qwen2_q8_0")
    out = tmp_path / "m.tpis"
    proc = run_convert(src, out)
    assert proc.returncode == 0, proc.stderr
    assert "layers.0.wq" in proc.stderr and "ggml:Q8_0" in proc.stderr
    from tpi.formats import open_model

    assert open_model(out).load("layers.0.wq").fmt == "ggml:Q8_0"
    np.testing.assert_array_equal(logits(out), logits(src))  # same tensors, same kernels


def test_keep_bf16_above_keeps_lossy_quantized_tensors_in_bf16(tmp_path, tiny_hf, tiny_gguf):
    out = tmp_path / "m.tpis"
    proc = run_convert(tiny_hf("tiny_llama_f32"), out, "--quant", "Q4_0", "--keep-bf16-above", "0.0")
    assert proc.returncode == 0, proc.stderr
    from tpi.formats import open_model

    assert open_model(out).load("layers.0.wq").fmt == "bf16"
    proc = run_convert(tiny_gguf("tiny_llama_q8_0"), tmp_path / "g.tpis", "--keep-bf16-above", "0.0")
    assert proc.returncode == 1 and "error: --keep-bf16-above applies to --quant" in proc.stderr


def test_converted_hf_folder_with_quantization_runs(tmp_path, tiny_hf, reference_of):
    folder = tiny_hf("tiny_llama_f32")
    ref = reference_of(folder).logits(TOKENS)
    corr = {}
    from tpi.formats import open_model

    for quant, fmt in (("q8", "ggml:Q8_0"), ("q4g32", "ggml:Q4_1"), ("Q5_0", "ggml:Q5_0")):  # old names alias
        out = tmp_path / f"hf-{quant}.tpis"
        proc = run_convert(folder, out, "--quant", quant)
        assert proc.returncode == 0, proc.stderr
        assert open_model(out).load("layers.1.w_down").fmt == fmt
        corr[quant] = np.corrcoef(logits(out).ravel(), ref.ravel())[0, 1]
    # Random Gaussian weights are the worst case for 4 bits; int8 must be much closer.
    assert corr["q8"] > 0.998 and corr["q4g32"] > 0.95 and corr["q8"] > corr["q4g32"]
    assert corr["Q5_0"] > corr["q4g32"]


def test_unknown_quant_type_is_one_error_naming_the_choices(tmp_path, tiny_hf):
    proc = run_convert(tiny_hf("tiny_llama_f32"), tmp_path / "x.tpis", "--quant", "q3")
    assert proc.returncode == 1
    assert "error: --quant 'q3' is not a type tpi can write; use one of F16, Q4_0" in proc.stderr
