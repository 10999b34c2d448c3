"""Real llama.cpp type mixes (Q4_K_M, Q6_K, IQ4_NL, ...) load with every tensor in its own type.

Fixtures are tiny F16 models re-quantized by llama.cpp's own quantizer (llama_model_quantize),
with K = 256 / 512 / 1024 so that K-quants really occur. References: gguf's dequantizers
(import must be exact) and llama.cpp's logits on the same file (the numpy backend converts to
q4g32 / q8 / bf16, so it must track them closely, not exactly).
"""
from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest

from tpi.devices.slicing import plan_shards
from tpi.formats import open_model
from tpi.quant import formats as F
from tpi.master.shard import iter_rank_blocks

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PROMPTS = [[3, 17, 99, 5, 64, 200, 31, 7], [1, 250, 42, 42, 8, 120, 77, 300, 5, 6, 9, 11]]
# ftype -> GGML types that must occur among its matrices, for the llama256 base.
MIXES = {
    "Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}, "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K"},
    "Q2_K": {"Q2_K", "Q3_K"}, "IQ4_NL": {"IQ4_NL", "Q6_K"}, "Q5_0": {"Q5_0"}, "Q5_1": {"Q5_1"},
}


def matrix_types(path) -> Counter:
    return Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2)


def llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's last-position logits (F32 KV cache, one thread)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(tokens)
        return np.array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)[: llm.n_vocab()], dtype=np.float32)
    finally:
        llm.close()


def numpy_logits(path, tokens: list[int]) -> np.ndarray:
    from test_layers_numpy import build_engine

    return build_engine(path, "numpy").forward(tokens, 0)[-1]


@pytest.mark.parametrize("ftype", sorted(MIXES))
def test_every_tensor_of_a_llama_cpp_mix_imports_bit_exactly(ftype, kquant_gguf):
    path = kquant_gguf(ftype)
    assert MIXES[ftype] <= set(matrix_types(path))
    from tpi.quant.gguf_import import import_tensor

    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        out, note = import_tensor(t.tensor_type, t.data, shape)
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        got = out if isinstance(out, np.ndarray) else F.dequantize(out)
        assert note.exact and np.array_equal(got, want), t.name
        if not isinstance(out, np.ndarray):
            assert F.ggml_type_info(out.fmt).name == t.tensor_type.name


@pytest.mark.parametrize("ftype", sorted(MIXES))
def test_numpy_backend_tracks_llama_cpp_on_each_mix(ftype, kquant_gguf):
    path = kquant_gguf(ftype)
    for tokens in PROMPTS:
        ours, theirs = numpy_logits(path, tokens), llama_cpp_logits(path, tokens)
        corr = float(np.corrcoef(ours, theirs)[0, 1])
        print(f"{ftype}: corr {corr:.5f}, max|diff| {np.abs(ours - theirs).max() / np.abs(theirs).max():.4f}")
        # measured 0.9975-0.9994 (q8 / q4g32 conversions; llama.cpp's own 8-bit activations)
        assert corr >= 0.997, ftype
        assert len(set(np.argsort(-ours)[:5]) & set(np.argsort(-theirs)[:5])) >= 3


def test_q4_k_m_qwen2_with_q6_k_attn_v_runs_unfused_and_tracks_llama_cpp(kquant_gguf):
    """The file shape that used to stop at load with "cannot fuse q8[...] with q4g32[...]"."""
    path = kquant_gguf("Q4_K_M", "qwen2_512")
    reader = gguf.GGUFReader(path)
    v_types = {t.name: t.tensor_type.name for t in reader.tensors if t.name.endswith(("attn_v.weight",
                                                                                      "ffn_down.weight"))}
    assert {"Q4_K", "Q6_K"} <= set(v_types.values())
    source = open_model(path)
    (shard,) = plan_shards(source.config, [1.0])
    keys = {key: set(blk) for key, (blk,) in iter_rank_blocks(source, source.config, [shard])}
    mixed = [i for i in range(source.config.n_layers) if v_types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    same = [i for i in range(source.config.n_layers) if v_types[f"blk.{i}.attn_v.weight"] == "Q4_K"]
    assert mixed and same
    for i in mixed:
        assert {"wq", "wk", "wv", "bqkv"} <= keys[f"L{i}.attn"] and "wqkv" not in keys[f"L{i}.attn"]
    for i in same:
        assert {"wqkv", "bqkv"} <= keys[f"L{i}.attn"]
    for tokens in PROMPTS:
        ours, theirs = numpy_logits(path, tokens), llama_cpp_logits(path, tokens)
        corr = float(np.corrcoef(ours, theirs)[0, 1])
        print(f"qwen2 Q4_K_M: corr {corr:.5f}")
        assert corr >= 0.998  # measured 0.9988-0.9992
        assert int(ours.argmax()) == int(theirs.argmax())


def test_tpi_run_answers_on_a_q4_k_m_file(kquant_gguf, tmp_path):
    """End to end through the CLI, as a user would try a hub's Q4_K_M (torch backend, the default)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tpi", "run", str(kquant_gguf("Q4_K_M", "qwen2_512")), "--prompt", "hello", "-n", "4",
         "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--config-dir", str(tmp_path / "config")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower()


def test_converted_mix_gives_back_every_tensor_byte_for_byte(kquant_gguf, tmp_path):
    from tpi.model.config import layer_name
    from tpi.master.convert import convert

    path = kquant_gguf("Q4_K_M", "qwen2_512")
    source = open_model(path)
    convert(source, tmp_path / "m.tpis")
    native = open_model(tmp_path / "m.tpis")
    cfg = source.config
    names = [layer_name(i, n) for i in range(cfg.n_layers)
             for n in ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "w_gate", "w_up", "w_down")] + ["embed", "norm"]
    for name in names:
        a, b = source.load(name), native.load(name)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b), name
        else:
            assert a.fmt == b.fmt == native.weight_fmt(name) and a.shape == b.shape, name
            for k in a.arrays:
                assert np.array_equal(a.arrays[k], b.arrays[k]), name


def test_column_cut_off_the_block_requantizes_to_q8_0_and_on_it_slices_bytes(kquant_gguf):
    from tpi.master.shard import cut_cols

    source = open_model(kquant_gguf("Q4_K_M", "qwen2_512"))
    wo = source.load("layers.0.wo")  # [512, 512] Q4_K
    assert wo.fmt == "ggml:Q4_K"
    full = F.dequantize(wo)
    native, redone = cut_cols(wo, range(256, 512))
    assert not redone and native.fmt == "ggml:Q4_K"
    assert np.array_equal(native.arrays["data"], wo.arrays["data"][:, 144:])
    part, redone = cut_cols(wo, range(64, 320))  # splits both blocks
    assert redone and part.fmt == "ggml:Q8_0" and part.shape == (512, 256)
    ref = full[:, 64:320]
    # Q8_0: a step d = max|w| / 127 per 32 weights; rounding to it moves a weight by d/2, and storing
    # d in fp16 (half an ulp: 2^-11 relative) moves q*d by up to 127 * d * 2^-11
    step = np.abs(ref).reshape(512, 8, 32).max(-1, keepdims=True) / 127
    bound = step * (0.5 + 127 * 2**-11) + 1e-9
    assert np.all(np.abs(F.dequantize(part) - ref).reshape(512, 8, 32) <= bound)


# ---- planning with the file's own types ----------------------------------------------------------

def matrix_bytes(blk: dict) -> int:
    return sum(t.nbytes for name, t in blk.items() if isinstance(t, F.QTensor) and name != "embed")


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.5, 0.25, 0.25), (0.25,) * 4])
def test_cost_model_counts_each_ranks_real_shard_bytes(ratios, kquant_gguf):
    from tpi.devices.costmodel import CostParams, rank_load
    from tpi.devices.group_plan import weight_profile_of
    from tpi.devices.slicing import plan_cuts

    source = open_model(kquant_gguf("Q4_K_M", "qwen2_512"))
    cfg = source.config
    profile = weight_profile_of(source)
    assert (profile.wo_block, profile.down_block) == (256, 256) and "Q4_K" in profile.types
    cuts = plan_cuts(cfg, ratios, profile.wo_block, profile.down_block)
    assert ("wo" in cuts.requantized) == (len(ratios) > 2)
    params = CostParams(weights=profile)
    actual = [Counter() for _ in ratios]
    for key, blocks in iter_rank_blocks(source, cfg, cuts.shards):
        kind = key.split(".")[-1]
        for r, blk in enumerate(blocks):
            actual[r][kind] += matrix_bytes(blk)
    for shard, got in zip(cuts.shards, actual):
        load = rank_load(cfg, shard, params)
        assert load.attn_block_bytes * cfg.n_layers == pytest.approx(got["attn"], rel=1e-3)
        assert load.mlp_block_bytes * cfg.n_layers == pytest.approx(got["mlp"], rel=1e-3)
        assert load.head_bytes == pytest.approx(got["globals"], rel=1e-3)


DEVICES_TOML = """
[[device]]
name = "slow"
memory_gb = 8
int4_gflops = 0.002
bf16_gflops = 0.001
disk_mb_s = 500
link_rtt_ms = 0.01
link_mbit = 10000
count = {count}
"""


@pytest.mark.parametrize("count, requantized", [(2, False), (4, True)])
def test_tpi_plan_shows_the_types_and_where_a_cut_requantizes(count, requantized, kquant_gguf, tmp_path):
    from typer.testing import CliRunner

    from tpi.cli import app

    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES_TOML.format(count=count))
    result = CliRunner().invoke(app, ["plan", str(kquant_gguf("Q4_K_M", "qwen2_512")), "--devices", str(devices),
                                      "--context", "256"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"{count} devices" in out and "Q4_K" in out and "Q6_K" in out
    if requantized:
        assert "column shards cut on 32 (wo) and 256 (w_down) elements; wo re-quantized to Q8_0 at the cut" in out
    else:
        assert "column shards cut on 256 (wo) and 256 (w_down) elements" in out and "re-quantized" not in out
