"""GGUF reader: metadata -> ModelConfig, tensors -> canonical names in native formats."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from tpi.model.config import ARCHITECTURES, ModelConfig, RopeScaling, supported_architectures
from tpi.model.rope import adjacent_pair_index
from tpi.errors import ModelFormatError, UnsupportedArchitectureError
from tpi.formats.gguf_file import GGUFFile, GGUFFormatError
from tpi.model.tokenizer import LlamaCppTokenizer
from tpi.quant.formats import GGML_TYPES, ggml_fmt, slice_rows, take_rows
from tpi.quant.gguf_import import import_tensor, unsupported_type

log = logging.getLogger(__name__)

# canonical short name -> GGUF name (per layer: "blk.{i}.<x>.weight" / ".bias")
_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "wo": "attn_output.weight", "post_attn_norm": "post_attention_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "post_mlp_norm": "post_ffw_norm.weight",
    # mixture of experts (tpi.model.moe): the router and the experts stacked along a third dim
    "router": "ffn_gate_inp.weight",
    "w_gate_exps": "ffn_gate_exps.weight", "w_up_exps": "ffn_up_exps.weight", "w_down_exps": "ffn_down_exps.weight",
}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
_QKV = "attn_qkv.weight"  # fused rows q | k | v (phi3; llama.cpp accepts it for every arch)
_GATE_UP = "ffn_up.weight"  # rows gate | up in gate_up_fused families
# Tensors that change what a layer computes and that tpi does not run: refused when the file is opened.
_REFUSED = {
    "rope_factors_long.weight": "LongRoPE (Phi-3 128k context) is not supported yet; use the 4k variant",
    "rope_factors_short.weight": "LongRoPE (Phi-3 128k context) is not supported yet; use the 4k variant",
    "output.bias": "an output bias is not supported",
    "blk.0.attn_qkv.bias": "a fused q|k|v bias is not supported",
}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's default: every 6th layer global (il % 6 == 5) without a pattern key


def _swa_layers(arch: str, reader: GGUFFile, n_layers: int) -> tuple[int, ...]:
    """Local layers from attention.sliding_window_pattern: per-layer flags, or a period n (il % n < n - 1)."""
    pattern = reader.value(f"{arch}.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, list):
        return tuple(i for i, local in enumerate(pattern[:n_layers]) if local)
    n = int(pattern)
    return tuple(i for i in range(n_layers) if n == 0 or i % n < n - 1)


def _window(arch: str, reader: GGUFFile, n_layers: int, path: Path) -> dict:
    """Sliding-window fields of the config: honoured where llama.cpp honours them, else logged and ignored."""
    window = int(reader.value(f"{arch}.attention.sliding_window", 0) or 0)
    if window <= 0:
        return {}
    if not ARCHITECTURES[arch].sliding_window:
        # llama.cpp's llama loader never reads the key and its phi3 loader disables SWA, so both run
        # full attention; tpi follows llama.cpp (the logits then match it) and says so once.
        log.info("%s: %s.attention.sliding_window = %d is ignored: llama.cpp runs %s models with full attention, "
                 "and so does tpi", path.name, arch, window, arch)
        return {}
    return {"sliding_window": window, "swa_layers": _swa_layers(arch, reader, n_layers),
            "rope_theta_swa": float(reader.value(f"{arch}.rope.freq_base_swa", 10000.0))}


def read_config(reader: GGUFFile, path: Path) -> ModelConfig:
    arch = reader.value("general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path}: no general.architecture in GGUF metadata; is this a model file?")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: unknown model architecture '{arch}'; tpi runs {supported_architectures()}"
        )

    def need(key: str):
        v = reader.value(f"{arch}.{key}")
        if v is None:
            raise ModelFormatError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_layers = int(need("block_count"))
    n_kv = int(reader.value(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(reader.value(f"{arch}.attention.key_length", hidden // n_heads))
    names = {t.name for t in reader.tensors}
    for name, why in _REFUSED.items():
        if name in names:
            raise UnsupportedArchitectureError(f"{path}: {why} (tensor {name})")
    n_rot = int(reader.value(f"{arch}.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise UnsupportedArchitectureError(
            f"{path}: partial rotary embeddings ({arch}.rope.dimension_count {n_rot} of head_dim {head_dim}, as in "
            "Phi-4-mini) are not supported yet; use a model that rotates whole heads (Phi-3 does)")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelFormatError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(reader.value(f"{arch}.vocab_size", int(embd.shape[1])))
    kind = reader.value(f"{arch}.rope.scaling.type")
    scaling = RopeScaling()
    if kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(reader.value(f"{arch}.rope.scaling.factor", 1.0)))
    experts = {}
    if reader.value(f"{arch}.expert_count") is not None:  # qwen3moe: every layer's MLP is experts
        used = int(need("expert_used_count"))
        ff = reader.value(f"{arch}.expert_feed_forward_length")  # llama.cpp's fallback: n_ff / n_expert_used
        experts = dict(n_experts=int(need("expert_count")), n_experts_used=used,
                       expert_ff=int(ff) if ff is not None else int(need("feed_forward_length")) // used)
    freq_factors = None
    if "rope_freqs.weight" in names:  # llama3-style scaling, precomputed per dimension by the converter
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        freq_factors = tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1))
    extra = _window(arch, reader, n_layers, path)
    if arch == "gemma3":
        # llama.cpp: Gemma 3 27B (62 layers) scales queries by 1/sqrt(hidden / heads), the others by 1/sqrt(hd)
        if n_layers == 62:
            extra["attn_scale"] = 1.0 / math.sqrt(hidden // n_heads)
        extra["final_softcap"] = float(reader.value(f"{arch}.final_logit_softcapping", 0.0) or 0.0)
    return ModelConfig(
        arch=arch,
        hidden=hidden,
        intermediate=int(need("feed_forward_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab=vocab,
        context=int(reader.value(f"{arch}.context_length", 2048)),
        rms_eps=float(reader.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(reader.value(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=freq_factors,
        qkv_bias="blk.0.attn_q.bias" in names,
        tied_embeddings="output.weight" not in names,
        name=str(reader.value("general.name", path.stem)),
        **extra,
        **experts,
    ).validate()


def open_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF file's header (tokenizer arrays are skipped, tensors mapped), as a ModelFormatError if malformed."""
    try:
        return GGUFFile(path)
    except (GGUFFormatError, OSError) as e:
        raise ModelFormatError(
            f"{path}: not a readable GGUF file ({e}); the file may be truncated or corrupt, download it again"
        ) from None


class GGUFSource:
    """A GGUF model file opened lazily; tensors are imported on demand."""

    kind = "gguf"

    def __init__(self, path: Path):
        if not path.is_file():
            raise ModelFormatError(f"model file not found: {path}; pass a .gguf file or a Hugging Face folder")
        self.reader = open_gguf(path)
        self.path = path
        self.config = read_config(self.reader, path)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.notes: dict[str, object] = {}  # per-tensor import notes (every type is kept as it is)
        for t in self.reader.tensors:  # refuse the file now, not after a group has formed
            if t.tensor_type.name not in GGML_TYPES:
                raise ModelFormatError(f"{path}: {unsupported_type(t.tensor_type.name, tuple(reversed(t.shape)))}")

    def metadata(self, key: str, default=None):
        return self.reader.value(key, default)

    def _locate(self, name: str) -> tuple[str, tuple[int, int] | None]:
        """(GGUF tensor name, rows of it or None for all) holding canonical tensor `name`.

        Fused files keep q|k|v in one attn_qkv and gate|up in one ffn_up (phi3): a part is a row range.
        """
        if not name.startswith("layers."):
            return _GLOBAL_NAMES[name], None
        _, i, short = name.split(".", 2)
        cfg, prefix = self.config, f"blk.{i}."
        if short in ("wq", "wk", "wv") and prefix + _QKV in self._tensors:
            q, kv = cfg.q_dim, cfg.kv_dim
            return prefix + _QKV, {"wq": (0, q), "wk": (q, q + kv), "wv": (q + kv, q + 2 * kv)}[short]
        if short in ("w_gate", "w_up") and cfg.family.gate_up_fused:
            ff = cfg.intermediate
            return prefix + _GATE_UP, (0, ff) if short == "w_gate" else (ff, 2 * ff)
        return prefix + _LAYER_NAMES[short], None

    def gguf_name(self, name: str) -> str:
        return self._locate(name)[0]

    def has(self, name: str) -> bool:
        return self.gguf_name(name) in self._tensors

    def raw_type(self, name: str) -> str:
        return self._tensors[self.gguf_name(name)].tensor_type.name

    def weight_fmt(self, name: str) -> str:
        """The fmt `load(name)` gives this matrix ("ggml:Q4_K", "f32", ...), from the header alone."""
        if not self.has(name):
            raise ModelFormatError(f"{self.path}: tensor {self.gguf_name(name)} is missing")
        return ggml_fmt(self.raw_type(name))  # every type was checked when the file was opened

    def load(self, name: str):
        """Canonical tensor -> QTensor (matrices) or float32 array (vectors)."""
        gname, rows = self._locate(name)
        t = self._tensors.get(gname)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {gname} is missing")
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == 3:  # experts [E, N, K]: one matrix of E * N stacked rows (tpi.model.moe)
            shape = (shape[0] * shape[1], shape[2])
        out, note = import_tensor(t.tensor_type, t.data, shape)
        self.notes[name] = note
        if rows is not None:  # a part of a fused tensor: a view of its rows
            if shape[0] < rows[1]:
                raise ModelFormatError(f"{self.path}: {gname} has {shape[0]} rows, fewer than its parts need")
            out = out[rows[0]:rows[1]] if isinstance(out, np.ndarray) else slice_rows(out, *rows)
        cfg = self.config
        short = name.rsplit(".", 1)[-1]
        # llama.cpp stores llama q/k already in adjacent-pair order; NEOX-rope archs are HF order
        # (a gather of whole rows, so any block type permutes as bytes). The per-head q/k norm
        # weights [hd] take the same order within a head.
        if cfg.family.rope_neox and short in ("wq", "wk", "bq", "bk", "q_norm", "k_norm"):
            heads = {"wq": cfg.n_heads, "bq": cfg.n_heads, "wk": cfg.n_kv_heads, "bk": cfg.n_kv_heads}.get(short, 1)
            idx = adjacent_pair_index(heads, cfg.head_dim)
            out = out[idx] if isinstance(out, np.ndarray) else take_rows(out, idx)
        return out

    def tokenizer(self):
        return LlamaCppTokenizer(self.path, self.metadata)
