"""Synthetic random-weight models for benchmarks: a GGUF both tpi and llama.cpp read, or an HF folder.

    python bench/synthetic.py qwen2-1.5b            # ~/.cache/tpi/bench/qwen2-1.5b-q4_0.gguf
    python bench/synthetic.py llama2-7b --hf --layers 8 --out DIR

Weights are random (speed does not depend on their values); the tokenizer is the byte-level
BPE of tests/model_factory.py, which llama.cpp accepts. Files are written tensor by tensor
(the writer never holds the model) to `path.partial` and renamed, then reused from the cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
DEFAULT_CACHE = Path.home() / ".cache" / "tpi" / "bench"


@dataclass(frozen=True)
class SyntheticShape:
    """Shape of a random model; head_dim = hidden / n_heads."""

    name: str
    arch: str  # "llama" | "qwen2"
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tied: bool = False
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    context: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def params(self) -> int:
        h, kv = self.hidden, self.n_kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate
        return self.n_layers * per_layer + self.vocab * h * (1 if self.tied else 2)


SHAPES = {
    # Qwen2.5-1.5B: real vocab, tied embeddings, q/k/v biases
    "qwen2-1.5b": SyntheticShape("qwen2-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, tied=True,
                                 rope_theta=1e6, rms_eps=1e-6),
    # issue 18's 0.8B Llama-shaped target: TinyLlama's widths (intermediate 5632, 32000 vocab), 16 layers
    "llama-0.8b": SyntheticShape("llama-0.8b", "llama", 2048, 5632, 16, 32, 4, 32000),
    # Llama-2-7B: 32 heads of 128, no GQA, 32000 vocab (layers are often cut with --layers)
    "llama2-7b": SyntheticShape("llama2-7b", "llama", 4096, 11008, 32, 32, 32, 32000),
    # smoke-test sizes: same code path, seconds to write
    "tiny-qwen2": SyntheticShape("tiny-qwen2", "qwen2", 128, 256, 2, 4, 2, 512, tied=True, rope_theta=1e6,
                                 rms_eps=1e-6),
    "tiny-llama": SyntheticShape("tiny-llama", "llama", 128, 256, 2, 4, 4, 512),
}


def shape_named(name: str, layers: int | None = None) -> SyntheticShape:
    if name not in SHAPES:
        raise SystemExit(f"unknown synthetic shape {name!r}; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[name]
    return replace(shape, n_layers=layers, name=f"{shape.name}-{layers}l") if layers else shape


def _tokenizer(vocab: int):
    sys.path.insert(0, str(TESTS))
    from model_factory import minimal_tokenizer

    return minimal_tokenizer(vocab)


def layer_tensors(shape: SyntheticShape) -> list[tuple[str, tuple[int, ...]]]:
    """(llama.cpp name, [out, in] or [n]) of every tensor, in file order."""
    h, kv, ff = shape.hidden, shape.n_kv_heads * shape.head_dim, shape.intermediate
    out = [("token_embd.weight", (shape.vocab, h)), ("output_norm.weight", (h,))]
    if not shape.tied:
        out.append(("output.weight", (shape.vocab, h)))
    for i in range(shape.n_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (h, h)), (b + "attn_k.weight", (kv, h)),
                (b + "attn_v.weight", (kv, h))]
        if shape.arch == "qwen2":
            out += [(b + "attn_q.bias", (h,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
        out += [(b + "attn_output.weight", (h, h)), (b + "ffn_norm.weight", (h,)),
                (b + "ffn_gate.weight", (ff, h)), (b + "ffn_up.weight", (ff, h)), (b + "ffn_down.weight", (h, ff))]
    return out


def _random(rng: np.random.Generator, name: str, dims: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)
    scale = 0.02 if len(dims) == 2 else 0.1  # keeps activations bounded through many random layers
    return rng.standard_normal(dims, dtype=np.float32) * np.float32(scale)


def write_gguf(shape: SyntheticShape, path: Path, qtype_name: str = "Q4_0", seed: int = 0) -> Path:
    """Stream a random model to a GGUF that llama.cpp and tpi load; 1-D tensors stay F32."""
    import gguf

    sys.path.insert(0, str(TESTS))
    from model_factory import write_gguf_tokenizer

    qtype = gguf.GGMLQuantizationType[qtype_name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, shape.arch)
    writer.add_name(f"synthetic-{shape.name}")
    writer.add_vocab_size(shape.vocab)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_block_count(shape.n_layers)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype_name}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_gguf_tokenizer(writer, _tokenizer(shape.vocab))
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    tensors = layer_tensors(shape)
    for name, dims in tensors:  # infos first (sizes only), data streamed below in the same order
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            byte_shape = (dims[0], dims[1] // block * type_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in tensors:
        x = _random(rng, name, dims)
        writer.write_tensor_data(x if x.ndim == 1 else gguf.quants.quantize(x, qtype))
    writer.close()
    partial.rename(path)
    return path


def write_hf_folder(shape: SyntheticShape, folder: Path, seed: int = 0) -> Path:
    """A bf16 safetensors folder (one file per layer + index) that transformers and tpi read."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(TESTS))
    from model_factory import TinySpec, hf_config, write_hf_tokenizer

    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(shape.vocab)
    spec = TinySpec(shape.arch, shape.hidden, shape.intermediate, shape.n_layers, shape.n_heads, shape.n_kv_heads,
                    shape.vocab, shape.tied, seed, shape.rope_theta, False, shape.context, shape.rms_eps)
    (partial / "config.json").write_text(json.dumps(hf_config(spec, tok, "bf16"), indent=2))
    (partial / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_id,
                                                                 "eos_token_id": tok.eos_id}))
    write_hf_tokenizer(partial, tok, shape.context)
    gen = torch.Generator().manual_seed(seed)
    h, kv, ff = shape.hidden, shape.n_kv_heads * shape.head_dim, shape.intermediate

    def lin(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1.0 + 0.05 * torch.randn(h, generator=gen)).to(torch.bfloat16)

    files: list[dict[str, torch.Tensor]] = []
    glob = {"model.embed_tokens.weight": lin(shape.vocab, h), "model.norm.weight": norm()}
    if not shape.tied:
        glob["lm_head.weight"] = lin(shape.vocab, h)
    files.append(glob)
    for i in range(shape.n_layers):
        p = f"model.layers.{i}."
        layer = {p + "input_layernorm.weight": norm(), p + "self_attn.q_proj.weight": lin(h, h),
                 p + "self_attn.k_proj.weight": lin(kv, h), p + "self_attn.v_proj.weight": lin(kv, h),
                 p + "self_attn.o_proj.weight": lin(h, h), p + "post_attention_layernorm.weight": norm(),
                 p + "mlp.gate_proj.weight": lin(ff, h), p + "mlp.up_proj.weight": lin(ff, h),
                 p + "mlp.down_proj.weight": lin(h, ff)}
        if shape.arch == "qwen2":
            for n, dim in (("q", h), ("k", kv), ("v", kv)):
                layer[p + f"self_attn.{n}_proj.bias"] = (0.1 * torch.randn(dim, generator=gen)).to(torch.bfloat16)
        files.append(layer)
    weight_map, total = {}, 0
    for k, tensors in enumerate(files, start=1):
        file_name = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(partial / file_name), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = file_name
            total += t.numel() * 2
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    partial.rename(folder)
    return folder


# llama.cpp file types (include/llama.h llama_ftype) made by llama.cpp's own quantizer: real mixes
# (Q4_K_M puts Q6_K on attn_v / ffn_down and the output layer, as model hubs' files do).
LLAMA_MIXES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int = 2) -> Path:
    """dst = src re-quantized by llama.cpp (llama_model_quantize), written to dst.partial and renamed."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_MIXES[qtype]
    params.allow_requantize = True  # from the Q8_0 file: the weights are random, their precision is not the point
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {qtype}")
    partial.rename(dst)
    return dst


def cached_model(name: str, *, layers: int | None = None, hf: bool = False, qtype: str = "Q4_0",
                 out: Path | None = None, log=print) -> Path:
    """Path of the synthetic model, written once into `out` (default ~/.cache/tpi/bench)."""
    shape = shape_named(name, layers)
    out = Path(out or DEFAULT_CACHE)
    path = out / (f"{shape.name}-hf-bf16" if hf else f"{shape.name}-{qtype.lower()}.gguf")
    if path.exists():
        return path
    if qtype in LLAMA_MIXES and not hf:
        base = cached_model(name, layers=layers, qtype="Q8_0", out=out, log=log)
        log(f"quantizing {base.name} to {qtype} with llama.cpp ...")
        return llama_quantize(base, path, qtype)
    log(f"writing synthetic {shape.name} ({shape.params() / 1e9:.2f}B params) to {path} ...")
    t = time.perf_counter()
    write_hf_folder(shape, path) if hf else write_gguf(shape, path, qtype)
    log(f"  done in {time.perf_counter() - t:.0f}s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="keep only this many layers")
    ap.add_argument("--hf", action="store_true", help="write a bf16 safetensors folder instead of a GGUF")
    ap.add_argument("--qtype", default="Q4_0", choices=["Q4_0", "Q4_1", "Q8_0", *LLAMA_MIXES])
    ap.add_argument("--out", type=Path, help=f"directory (default {DEFAULT_CACHE})")
    args = ap.parse_args()
    print(cached_model(args.shape, layers=args.layers, hf=args.hf, qtype=args.qtype, out=args.out,
                       log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    main()
