"""`tpi convert`: the native file runs with the same logits as its source, and reports errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from tpi.master import EngineOptions, build_local_engine

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


def test_converted_int4_model_is_planned_as_int4_with_its_sources_bytes(tmp_path, tiny_gguf):
    """A .tpis is planned with its own types (the planner once probed sources with getattr and counted
    a converted int4 file as bf16): the new format keeps the GGUF types, an old tpi-native-1 file holds
    q4g32, and both are int4 to the cost model with the bytes the source has."""
    from tpi.devices.group_plan import weight_format_of, weight_profile_of
    from tpi.formats import open_model
    from tpi.master.convert import convert
    from tpi.model.blocks import EMBED
    from tpi.model.config import config_to_dict
    from tpi.quant.formats import QTensor
    from tpi.quant.kernel_forms import to_kernel_format
    from tpi.scheduler.store import ShardStore, write_store

    src = open_model(tiny_gguf("tiny_llama_q4_0"))
    assert src.weight_fmt("layers.0.w_gate") == "ggml:Q4_0"
    out = tmp_path / "m.tpis"
    convert(src, out)
    native = open_model(out)
    assert weight_format_of(src) == weight_format_of(native) == "int4"
    assert weight_profile_of(native) == weight_profile_of(src)

    old = tmp_path / "old.tpis"  # the first native format: q4g32 blocks (what torch ran), always fused
    store = ShardStore.open(out)
    blocks = ((k, {n: to_kernel_format(t) if isinstance(t, QTensor) and n != EMBED else t
                   for n, t in store.load(k, copy=False).items()}) for k in store.keys())
    write_store(old, {"format": "tpi-native-1", "config": config_to_dict(src.config), "tokenizer": "gguf"}, blocks)
    legacy = open_model(old)
    assert legacy.weight_fmt("layers.0.w_gate") == "q4g32"
    assert weight_format_of(legacy) == "int4"
    assert weight_profile_of(legacy)["w_gate"] == 0.5 + 2 * 2 / 32  # 4 bits, a bf16 scale and zero per 32
