"""A synthetic Qwen3-MoE GGUF for the MoE benchmarks (issue 19): ~4B weights, ~0.6B multiplied per token.

    python bench/moe_model.py                 # ~/.cache/tpi/bench/qwen3moe-4b-a0.6b-q4_k_m.gguf
    python bench/moe_model.py --out /tmp/x

Qwen3-30B-A3B's layer widths (hidden 2048, 32 query / 4 KV heads of 128, experts of 768 columns) with
12 layers of 64 experts, top 6, and a 32000-token vocabulary: 3.98B weights, 0.63B per token. Written
tensor by tensor as F16 (router and norms F32, as converters keep them) to `<name>.f16.partial`, then
quantized by llama.cpp itself to its Q4_K_M mix (llama_model_quantize) and the F16 file deleted. The
writer holds one random tensor of each kind and writes it for every layer (each router is its own).
Random weights: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import DEFAULT_CACHE, TESTS, llama_quantize  # noqa: E402

NAME = "qwen3moe-4b-a0.6b"
SPEC = dict(arch="qwen3moe", hidden=2048, intermediate=6144, n_layers=12, n_heads=32, n_kv_heads=4, head_dim=128,
            vocab=32000, n_experts=64, n_experts_used=6, expert_ff=768, rope_theta=1_000_000.0, context=4096)


def tensors(spec) -> list[tuple[str, tuple[int, ...], type]]:
    """(llama.cpp name, numpy shape, dtype) of every tensor in file order."""
    h, q, kv, e, ff, hd = spec.hidden, spec.n_heads * spec.hd, spec.n_kv_heads * spec.hd, spec.n_experts, \
        spec.expert_ff, spec.hd
    out = [("token_embd.weight", (spec.vocab, h), np.float16), ("output_norm.weight", (h,), np.float32),
           ("output.weight", (spec.vocab, h), np.float16)]
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,), np.float32), (b + "attn_q.weight", (q, h), np.float16),
                (b + "attn_k.weight", (kv, h), np.float16), (b + "attn_v.weight", (kv, h), np.float16),
                (b + "attn_q_norm.weight", (hd,), np.float32), (b + "attn_k_norm.weight", (hd,), np.float32),
                (b + "attn_output.weight", (h, q), np.float16), (b + "ffn_norm.weight", (h,), np.float32),
                (b + "ffn_gate_inp.weight", (e, h), np.float32), (b + "ffn_gate_exps.weight", (e, ff, h), np.float16),
                (b + "ffn_up_exps.weight", (e, ff, h), np.float16), (b + "ffn_down_exps.weight", (e, h, ff), np.float16)]
    return out


def write_f16(path: Path, seed: int = 0) -> Path:
    """The F16 source GGUF, streamed: tensor infos first, then each tensor's data in the same order."""
    import gguf

    sys.path.insert(0, str(TESTS))
    from family_models import FamilySpec, family_tokenizer, write_family_metadata
    from model_factory import write_gguf_tokenizer

    spec = FamilySpec(**SPEC)
    writer = gguf.GGUFWriter(path, spec.arch)
    writer.add_name(f"synthetic-{NAME}")
    write_family_metadata(writer, spec)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    write_gguf_tokenizer(writer, family_tokenizer(spec.arch, spec.vocab))
    layout = tensors(spec)
    for name, shape, dtype in layout:
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    made: dict[tuple, np.ndarray] = {}  # one random tensor per kind, written for every layer: drawing 4B
    for name, shape, dtype in layout:   # normals takes longer than the rest of the bench on 2 cores
        kind = (name.split(".", 2)[-1], shape)
        if kind not in made or name.endswith("ffn_gate_inp.weight"):  # each layer routes on its own router
            x = rng.standard_normal(shape, dtype=np.float32)
            made[kind] = (1.0 + 0.05 * x if name.endswith("norm.weight") else x * np.float32(0.02)).astype(dtype)
        writer.write_tensor_data(made[kind])
    writer.close()
    return path


def cached_moe_model(out: Path | None = None, log=print) -> Path:
    """The Q4_K_M file, written once into `out` (default ~/.cache/tpi/bench)."""
    out = Path(out or DEFAULT_CACHE)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}-q4_k_m.gguf"
    if path.exists():
        return path
    f16 = out / f"{NAME}.f16.partial"
    t = time.perf_counter()
    log(f"writing {f16} (F16, ~8 GB) ...")
    write_f16(f16)
    log(f"  {time.perf_counter() - t:.0f}s; quantizing to Q4_K_M with llama.cpp ...")
    try:
        llama_quantize(f16, path, "Q4_K_M")
    finally:
        f16.unlink(missing_ok=True)
    log(f"  done in {time.perf_counter() - t:.0f}s: {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help=f"directory (default {DEFAULT_CACHE})")
    args = ap.parse_args()
    print(cached_moe_model(args.out, log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    main()
