"""Independent fp32 numpy forward pass for the issue-19 families (qwen3, qwen3moe, gemma3, llama, phi3) read
from GGUF, written from each architecture's definition as llama.cpp runs it.

It imports nothing from tpi. Shared maths (RMSNorm, RoPE, matmul) comes from reference.py; what differs per
family is listed in FamilyRef's fields, filled from the GGUF metadata by load_family_reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from reference import ROPE_ADJACENT, ROPE_HALF, apply_rope, base_inv_freq, linear, rms_norm, rope_tables

FAMILY_REF_ARCHS = ("qwen3", "qwen3moe", "gemma3", "llama", "phi3")
GEMMA3_DEFAULT_SWA_PATTERN = 6  # llama.cpp: every 6th layer (il % 6 == 5) is global when no pattern key exists


@dataclass
class FamilyRef:
    """A whole model in float32 numpy plus what its family does differently."""

    arch: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_style: str  # ROPE_ADJACENT for llama (GGUF rows pre-permuted), ROPE_HALF (NEOX) for the others
    inv_freq: np.ndarray  # [head_dim/2] float64, global layers (linear scaling already applied)
    inv_freq_swa: np.ndarray  # [head_dim/2] float64, sliding-window layers (gemma3's own base)
    swa_layers: tuple[bool, ...]  # True where the layer attends only to the last `window` positions
    window: int  # key j is visible from query i on an SWA layer iff 0 <= i - j < window
    attn_scale: float  # multiplies q.k
    embed_scale: float  # gemma3: sqrt(hidden)
    final_softcap: float | None  # logits = c * tanh(logits / c)
    n_experts_used: int
    norm_topk_weights: bool  # qwen3moe: llama.cpp always renormalises the k weights (norm_w = true)
    layers: list[dict[str, np.ndarray]]  # short GGUF names ("attn_q.weight") -> float32, [out, in]
    embed: np.ndarray  # [vocab, hidden]
    final_norm: np.ndarray
    output: np.ndarray  # [vocab, hidden]; the embedding itself when tied
    meta: dict = field(default_factory=dict)

    def logits(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Full causal forward over token_ids -> [T, vocab] float32 ([1, vocab] with last_only)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        assert ids.ndim == 1 and len(ids) > 0 and ids.min() >= 0 and ids.max() < self.embed.shape[0]
        x = self.embed[ids].astype(np.float64) * self.embed_scale  # (T, hidden)
        positions = np.arange(len(ids))
        tables = {False: rope_tables(self.inv_freq, positions), True: rope_tables(self.inv_freq_swa, positions)}
        for w, swa in zip(self.layers, self.swa_layers):
            a = self.attention(w, rms_norm(x, w["attn_norm.weight"], self.rms_eps), *tables[swa], swa)
            if "post_attention_norm.weight" in w:  # gemma3: norm the block output before the residual add
                a = rms_norm(a, w["post_attention_norm.weight"], self.rms_eps)
            x = x + a
            f = self.ffn(w, rms_norm(x, w["ffn_norm.weight"], self.rms_eps))
            if "post_ffw_norm.weight" in w:
                f = rms_norm(f, w["post_ffw_norm.weight"], self.rms_eps)
            x = x + f
        x = x[-1:] if last_only else x  # a 262k-token vocabulary makes [T, vocab] large
        out = linear(rms_norm(x, self.final_norm, self.rms_eps), self.output)  # (T, vocab)
        if self.final_softcap:
            out = self.final_softcap * np.tanh(out / self.final_softcap)
        return out.astype(np.float32)

    def qkv(self, w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q (T, H, hd), k and v (T, KV, hd); phi3's fused attn_qkv rows are q | k | v."""
        t, hd = x.shape[0], self.head_dim
        q_dim, kv_dim = self.n_heads * hd, self.n_kv_heads * hd
        if "attn_qkv.weight" in w:
            fused = linear(x, w["attn_qkv.weight"])  # (T, q_dim + 2 kv_dim)
            q, k, v = fused[:, :q_dim], fused[:, q_dim:q_dim + kv_dim], fused[:, q_dim + kv_dim:]
        else:
            q, k, v = linear(x, w["attn_q.weight"]), linear(x, w["attn_k.weight"]), linear(x, w["attn_v.weight"])
        return q.reshape(t, self.n_heads, hd), k.reshape(t, self.n_kv_heads, hd), v.reshape(t, self.n_kv_heads, hd)

    def attention(self, w: dict, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, swa: bool) -> np.ndarray:
        """Causal (optionally windowed) GQA attention; x (T, hidden) -> (T, hidden)."""
        t, hd = x.shape[0], self.head_dim
        q, k, v = self.qkv(w, x)
        if "attn_q_norm.weight" in w:  # per-head RMSNorm over head_dim, before RoPE
            q = rms_norm(q, w["attn_q_norm.weight"], self.rms_eps)
            k = rms_norm(k, w["attn_k_norm.weight"], self.rms_eps)
        q = apply_rope(q, cos, sin, self.rope_style)
        k = apply_rope(k, cos, sin, self.rope_style)
        dist = np.arange(t)[:, None] - np.arange(t)[None, :]  # query position - key position
        hidden = (dist < 0) | (swa & (dist >= self.window))  # (T, T) True where masked
        group = self.n_heads // self.n_kv_heads
        out = np.empty((t, self.n_heads, hd))
        for h in range(self.n_heads):
            kv = h // group
            scores = q[:, h, :] @ k[:, kv, :].T * self.attn_scale  # (T, T)
            scores[hidden] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=1, keepdims=True)
            out[:, h, :] = probs @ v[:, kv, :]
        return linear(out.reshape(t, self.n_heads * hd), w["attn_output.weight"])

    def ffn(self, w: dict, x: np.ndarray) -> np.ndarray:
        """The family's feed-forward block; x (T, hidden) -> (T, hidden)."""
        if "ffn_gate_inp.weight" in w:
            return self.moe(w, x)
        if self.arch == "phi3":  # ffn_up rows are gate | up
            gate, up = np.split(linear(x, w["ffn_up.weight"]), 2, axis=1)
        else:
            gate, up = linear(x, w["ffn_gate.weight"]), linear(x, w["ffn_up.weight"])
        act = gelu_tanh(gate) if self.arch == "gemma3" else silu(gate)
        return linear(act * up, w["ffn_down.weight"])

    def moe(self, w: dict, x: np.ndarray) -> np.ndarray:
        """Qwen3-MoE: softmax over all experts, top-k, the k weights renormalised to sum 1, weighted SwiGLU sum."""
        probs = softmax(linear(x, w["ffn_gate_inp.weight"]))  # (T, n_expert)
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.n_experts_used]  # (T, k)
        weights = np.take_along_axis(probs, top, axis=1)
        if self.norm_topk_weights:
            weights /= weights.sum(axis=1, keepdims=True)
        gate_e, up_e, down_e = w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"], w["ffn_down_exps.weight"]
        out = np.zeros_like(x)
        for ti in range(x.shape[0]):
            for e, we in zip(top[ti], weights[ti]):
                xi = x[ti : ti + 1]
                hidden = silu(linear(xi, gate_e[e])) * linear(xi, up_e[e])  # (1, expert_ff)
                out[ti] += we * linear(hidden, down_e[e])[0]
        return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh; ggml_gelu)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def swa_layer_flags(arch: str, n_layers: int, meta: dict) -> tuple[bool, ...]:
    """Which layers slide, as llama.cpp decides: only gemma3 honours sliding_window among these archs."""
    window = meta.get(f"{arch}.attention.sliding_window", 0)
    if arch != "gemma3" or not window:
        return (False,) * n_layers  # llama never reads the key; phi3 reads it, warns and disables SWA
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", GEMMA3_DEFAULT_SWA_PATTERN)
    if isinstance(pattern, list):  # per-layer flags
        return tuple(bool(p) for p in pattern[:n_layers])
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers))


def load_family_reference(path: Path | str | gguf.GGUFReader) -> FamilyRef:
    """Dequantize every tensor of a family GGUF (path or open reader) into a FamilyRef."""
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch not in FAMILY_REF_ARCHS:
        raise ValueError(f"family reference supports {FAMILY_REF_ARCHS}, not {arch!r}")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)

    m = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, n_heads, n_layers = m("embedding_length"), m("attention.head_count"), m("block_count")
    head_dim = m("attention.key_length", hidden // n_heads)
    assert m("rope.dimension_count", head_dim) == head_dim, "partial rotary embeddings are not in these families"
    inv_freq = base_inv_freq(m("rope.freq_base", 10000.0), head_dim)
    if m("rope.scaling.type") == "linear":  # llama.cpp: freq_scale = 1 / factor, global layers only
        inv_freq = inv_freq / m("rope.scaling.factor", 1.0)
    if arch == "gemma3":
        # llama.cpp infers query_pre_attn_scalar from the model size: hidden / heads for 27B (62 layers).
        attn_scale = (hidden / n_heads) ** -0.5 if n_layers == 62 else head_dim**-0.5
    else:
        attn_scale = head_dim**-0.5
    layers = []
    for i in range(n_layers):
        prefix = f"blk.{i}."
        layers.append({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    tied = "output.weight" not in tensors
    return FamilyRef(
        arch=arch,
        n_heads=n_heads,
        n_kv_heads=m("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_eps=m("attention.layer_norm_rms_epsilon"),
        rope_style=ROPE_ADJACENT if arch == "llama" else ROPE_HALF,
        inv_freq=inv_freq,
        inv_freq_swa=base_inv_freq(m("rope.freq_base_swa", 10000.0), head_dim),  # llama.cpp's default 10000
        swa_layers=swa_layer_flags(arch, n_layers, meta),
        window=m("attention.sliding_window", 0) or 0,
        attn_scale=attn_scale,
        embed_scale=float(np.sqrt(np.float32(hidden))) if arch == "gemma3" else 1.0,
        final_softcap=m("final_logit_softcapping") if arch == "gemma3" else None,
        n_experts_used=m("expert_used_count", 0),
        norm_topk_weights=True,
        layers=layers,
        embed=tensors["token_embd.weight"],
        final_norm=tensors["output_norm.weight"],
        output=tensors["token_embd.weight"] if tied else tensors["output.weight"],
        meta=meta,
    )
