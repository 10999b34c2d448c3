"""GGUF reader: metadata -> ModelConfig, tensors -> canonical names in native formats."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tpi.model.config import ARCHITECTURES, ModelConfig, RopeScaling, layer_name
from tpi.model.rope import ADJACENT_PAIR_ARCHS, adjacent_pair_index
from tpi.errors import ModelFormatError, UnsupportedArchitectureError
from tpi.formats.gguf_file import GGUFFile, GGUFFormatError

log = logging.getLogger(__name__)

# canonical short name -> GGUF name (per layer: "blk.{i}.<x>.weight" / ".bias")
_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    # mixture of experts (tpi.model.moe): the router and the experts stacked along a third dim
    "router": "ffn_gate_inp.weight",
    "w_gate_exps": "ffn_gate_exps.weight", "w_up_exps": "ffn_up_exps.weight", "w_down_exps": "ffn_down_exps.weight",
}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}


def read_config(reader: GGUFFile, path: Path) -> ModelConfig:
    arch = reader.value("general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path}: no general.architecture in GGUF metadata; is this a model file?")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: unknown model architecture '{arch}'; tpi supports {', '.join(sorted(ARCHITECTURES))}"
        )

    def need(key: str):
        v = reader.value(f"{arch}.{key}")
        if v is None:
            raise ModelFormatError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(reader.value(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(reader.value(f"{arch}.attention.key_length", hidden // n_heads))
    names = {t.name for t in reader.tensors}
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
    return ModelConfig(
        arch=arch,
        hidden=hidden,
        intermediate=int(need("feed_forward_length")),
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab=vocab,
        context=int(reader.value(f"{arch}.context_length", 2048)),
        rms_eps=float(reader.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(reader.value(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=freq_factors,
        qkv_bias=f"blk.0.attn_q.bias" in names,
        tied_embeddings="output.weight" not in names,
        name=str(reader.value("general.name", path.stem)),
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
        from tpi.quant.formats import GGML_TYPES
        from tpi.quant.gguf_import import unsupported_type

        for t in self.reader.tensors:  # refuse the file now, not after a group has formed
            if t.tensor_type.name not in GGML_TYPES:
                raise ModelFormatError(f"{path}: {unsupported_type(t.tensor_type.name, tuple(reversed(t.shape)))}")

    def metadata(self, key: str, default=None):
        return self.reader.value(key, default)

    def gguf_name(self, name: str) -> str:
        if name.startswith("layers."):
            _, i, short = name.split(".", 2)
            return f"blk.{i}.{_LAYER_NAMES[short]}"
        return _GLOBAL_NAMES[name]

    def has(self, name: str) -> bool:
        return self.gguf_name(name) in self._tensors

    def raw_type(self, name: str) -> str:
        return self._tensors[self.gguf_name(name)].tensor_type.name

    def weight_fmt(self, name: str) -> str:
        """The fmt `load(name)` gives this matrix ("ggml:Q4_K", "f32", ...), from the header alone."""
        from tpi.quant.formats import ggml_fmt

        if not self.has(name):
            raise ModelFormatError(f"{self.path}: tensor {self.gguf_name(name)} is missing")
        return ggml_fmt(self.raw_type(name))  # every type was checked when the file was opened

    def load(self, name: str):
        """Canonical tensor -> QTensor (matrices) or float32 array (vectors)."""
        from tpi.quant.formats import take_rows
        from tpi.quant.gguf_import import import_tensor

        gname = self.gguf_name(name)
        t = self._tensors.get(gname)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {gname} is missing")
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == 3:  # experts [E, N, K]: one matrix of E * N stacked rows (tpi.model.moe)
            shape = (shape[0] * shape[1], shape[2])
        out, note = import_tensor(t.tensor_type, t.data, shape)
        self.notes[name] = note
        cfg = self.config
        short = name.rsplit(".", 1)[-1]
        # llama.cpp stores llama q/k already in adjacent-pair order; NEOX-rope archs are HF order
        # (a gather of whole rows, so any block type permutes as bytes).
        if cfg.arch not in ADJACENT_PAIR_ARCHS and short in ("wq", "wk", "bq", "bk"):
            heads = cfg.n_heads if short in ("wq", "bq") else cfg.n_kv_heads
            idx = adjacent_pair_index(heads, cfg.head_dim)
            out = out[idx] if isinstance(out, np.ndarray) else take_rows(out, idx)
        return out

    def tokenizer(self):
        from tpi.model.tokenizer import LlamaCppTokenizer

        return LlamaCppTokenizer(self.path, self.metadata)
