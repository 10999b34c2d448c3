"""Independent fp32 numpy forward pass for Llama / Qwen2 models, read from GGUF or a Hugging Face folder.

It imports nothing from tpi: the engine's logits are checked against this file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

# GGUF llama stores q/k rows permuted so RoPE rotates adjacent pairs (llama.cpp "NORM" mode);
# qwen2 GGUF and every HF checkpoint rotate the two halves of each head ("NEOX" / rotate-half).
ROPE_ADJACENT = "adjacent"
ROPE_HALF = "half"


@dataclass
class RefLayer:
    """One decoder block's float32 weights, HF orientation [out, in]."""

    attn_norm: np.ndarray  # [hidden]
    wq: np.ndarray  # [n_heads*hd, hidden]
    wk: np.ndarray  # [n_kv*hd, hidden]
    wv: np.ndarray  # [n_kv*hd, hidden]
    wo: np.ndarray  # [hidden, n_heads*hd]
    ffn_norm: np.ndarray  # [hidden]
    w_gate: np.ndarray  # [ff, hidden]
    w_up: np.ndarray  # [ff, hidden]
    w_down: np.ndarray  # [hidden, ff]
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None


@dataclass
class RefModel:
    """A whole model in float32 numpy plus the few numbers the forward pass needs."""

    arch: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_style: str
    inv_freq: np.ndarray  # [head_dim/2] float64, already divided by any llama3 scaling factor
    embed: np.ndarray  # [vocab, hidden]
    layers: list[RefLayer]
    final_norm: np.ndarray  # [hidden]
    output: np.ndarray  # [vocab, hidden]; the embedding itself when tied
    tied: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return self.output.shape[0]

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Full causal forward over token_ids -> [T, vocab] float32."""
        ids = np.asarray(token_ids, dtype=np.int64)
        assert ids.ndim == 1 and len(ids) > 0 and ids.min() >= 0 and ids.max() < self.embed.shape[0]
        x = self.embed[ids].astype(np.float64)  # (T, hidden)
        positions = np.arange(len(ids))
        cos, sin = rope_tables(self.inv_freq, positions)  # (T, hd/2) each
        for layer in self.layers:
            x = x + self.attention(layer, rms_norm(x, layer.attn_norm, self.rms_eps), cos, sin)
            x = x + mlp(layer, rms_norm(x, layer.ffn_norm, self.rms_eps))
        x = rms_norm(x, self.final_norm, self.rms_eps)
        return linear(x, self.output).astype(np.float32)  # (T, vocab)

    def attention(self, layer: RefLayer, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Causal multi-head attention with grouped KV heads; x (T, hidden) -> (T, hidden)."""
        t, hd = x.shape[0], self.head_dim
        q = linear(x, layer.wq, layer.bq).reshape(t, self.n_heads, hd)  # (T, H, hd)
        k = linear(x, layer.wk, layer.bk).reshape(t, self.n_kv_heads, hd)  # (T, KV, hd)
        v = linear(x, layer.wv, layer.bv).reshape(t, self.n_kv_heads, hd)  # (T, KV, hd)
        q = apply_rope(q, cos, sin, self.rope_style)
        k = apply_rope(k, cos, sin, self.rope_style)
        group = self.n_heads // self.n_kv_heads
        future = np.triu(np.ones((t, t), dtype=bool), k=1)  # True where key position > query position
        out = np.empty((t, self.n_heads, hd))
        for h in range(self.n_heads):
            kv = h // group  # query heads h*group..: share one KV head
            scores = q[:, h, :] @ k[:, kv, :].T / np.sqrt(hd)  # (T, T)
            scores[future] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=1, keepdims=True)
            out[:, h, :] = probs @ v[:, kv, :]  # (T, hd)
        return linear(out.reshape(t, self.n_heads * hd), layer.wo)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x (T, in) float64 @ w[out, in].T (float32 BLAS, float64 result) + b."""
    y = (x.astype(np.float32) @ w.T).astype(np.float64)
    return y if b is None else y + b


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, hidden) / rms(x) * weight, in float64."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def mlp(layer: RefLayer, x: np.ndarray) -> np.ndarray:
    """SiLU-gated feed-forward; x (T, hidden) -> (T, hidden)."""
    gate = linear(x, layer.w_gate)  # (T, ff)
    up = linear(x, layer.w_up)  # (T, ff)
    return linear(gate / (1.0 + np.exp(-gate)) * up, layer.w_down)


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * frequency, each (T, hd/2)."""
    angles = np.outer(positions.astype(np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate x (T, heads, hd); pair i is (2i, 2i+1) for adjacent style, (i, i+hd/2) for half style."""
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2)
    half = x.shape[-1] // 2
    if style == ROPE_ADJACENT:
        a, b = x[..., 0::2], x[..., 1::2]
    elif style == ROPE_HALF:
        a, b = x[..., :half], x[..., half:]
    else:
        raise ValueError(f"unknown rope style {style!r}")
    ra, rb = a * c - b * s, a * s + b * c
    out = np.empty_like(x)
    if style == ROPE_ADJACENT:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :half], out[..., half:] = ra, rb
    return out


def base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """theta^(-2i/d) for i in 0..d/2, float64."""
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


# ---------------------------------------------------------------- GGUF


def load_gguf_reference(path: Path | str | gguf.GGUFReader) -> RefModel:
    """Dequantize every tensor of a llama / qwen2 GGUF (path or an open reader) into a RefModel."""
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"reference supports llama and qwen2 GGUF files, not {arch!r}")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)

    hidden = meta[f"{arch}.embedding_length"]
    n_heads = meta[f"{arch}.attention.head_count"]
    head_dim = hidden // n_heads
    rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
    assert rope_dims == head_dim, "partial rotary embeddings are not part of llama / qwen2"
    inv_freq = base_inv_freq(meta.get(f"{arch}.rope.freq_base", 10000.0), head_dim)
    if "rope_freqs.weight" in tensors:  # llama3 scaling: llama.cpp divides each frequency by its factor
        inv_freq = inv_freq / tensors["rope_freqs.weight"].astype(np.float64)

    layers = []
    for i in range(meta[f"{arch}.block_count"]):
        g = lambda name: tensors.get(f"blk.{i}.{name}")  # noqa: E731
        layers.append(RefLayer(
            attn_norm=g("attn_norm.weight"), wq=g("attn_q.weight"), wk=g("attn_k.weight"), wv=g("attn_v.weight"),
            wo=g("attn_output.weight"), ffn_norm=g("ffn_norm.weight"), w_gate=g("ffn_gate.weight"),
            w_up=g("ffn_up.weight"), w_down=g("ffn_down.weight"),
            bq=g("attn_q.bias"), bk=g("attn_k.bias"), bv=g("attn_v.bias"),
        ))
    tied = "output.weight" not in tensors
    return RefModel(
        arch=arch,
        n_heads=n_heads,
        n_kv_heads=meta.get(f"{arch}.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        rope_style=ROPE_ADJACENT if arch == "llama" else ROPE_HALF,
        inv_freq=inv_freq,
        embed=tensors["token_embd.weight"],
        layers=layers,
        final_norm=tensors["output_norm.weight"],
        output=tensors["token_embd.weight"] if tied else tensors["output.weight"],
        tied=tied,
        meta=meta,
    )


# ---------------------------------------------------------------- Hugging Face


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32; BF16 widened by hand (numpy has no bfloat16)."""
    with open(path, "rb") as f:
        (head_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(head_len))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    if "BF16" not in dtypes:
        from safetensors.numpy import load_file

        return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + head_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        chunk = np.asarray(raw[start:end])
        if info["dtype"] == "BF16":
            arr = (chunk.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = chunk.view({"F32": np.float32, "F16": np.float16}[info["dtype"]]).astype(np.float32)
        out[name] = arr.reshape(info["shape"])
    return out


def llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Hugging Face's llama3 frequency rescaling of rope_scaling in config.json."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, smoothed, scaled)


def load_hf_reference(folder: Path | str) -> RefModel:
    """Read config.json and (possibly sharded) safetensors of a Llama / Qwen2 HF folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"reference supports llama and qwen2 checkpoints, not {arch!r}")
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    w: dict[str, np.ndarray] = {}
    for name in files:
        w.update(read_safetensors(folder / name))

    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    inv_freq = base_inv_freq(config.get("rope_theta", 10000.0), head_dim)
    scaling = config.get("rope_scaling")
    if scaling:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"reference implements only llama3 rope scaling, got {scaling}")
        inv_freq = llama3_inv_freq(inv_freq, scaling)

    layers = []
    for i in range(config["num_hidden_layers"]):
        g = lambda name: w.get(f"model.layers.{i}.{name}")  # noqa: E731
        layers.append(RefLayer(
            attn_norm=g("input_layernorm.weight"), wq=g("self_attn.q_proj.weight"), wk=g("self_attn.k_proj.weight"),
            wv=g("self_attn.v_proj.weight"), wo=g("self_attn.o_proj.weight"),
            ffn_norm=g("post_attention_layernorm.weight"), w_gate=g("mlp.gate_proj.weight"),
            w_up=g("mlp.up_proj.weight"), w_down=g("mlp.down_proj.weight"),
            bq=g("self_attn.q_proj.bias"), bk=g("self_attn.k_proj.bias"), bv=g("self_attn.v_proj.bias"),
        ))
    tied = "lm_head.weight" not in w
    return RefModel(
        arch=arch,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        head_dim=head_dim,
        rms_eps=config["rms_norm_eps"],
        rope_style=ROPE_HALF,
        inv_freq=inv_freq,
        embed=w["model.embed_tokens.weight"],
        layers=layers,
        final_norm=w["model.norm.weight"],
        output=w["model.embed_tokens.weight"] if tied else w["lm_head.weight"],
        tied=tied,
        meta=config,
    )
