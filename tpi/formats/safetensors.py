"""Hugging Face folders: config.json plus *.safetensors (sharded index included), read by mmap."""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from tpi.model.config import ARCHITECTURES, ModelConfig, RopeScaling, supported_architectures
from tpi.errors import ModelFormatError, UnsupportedArchitectureError
from tpi.model.rope import adjacent_pair_index
from tpi.model.tokenizer import HFTokenizer
from tpi.quant.gguf_import import ImportNote
from tpi.quant.formats import (BF16, F32, GGML_QUANTIZABLE, GGML_TYPES, QTensor, bf16_bits_to_f32, ggml_fmt, quant_error,
                               quantize)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32}
_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
}
_GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
HF_ARCHS = ("llama", "mistral", "qwen2")  # the others (qwen3, gemma3, phi3) load from GGUF


def read_hf_config(folder: Path, names: set[str]) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: config.json is missing; a Hugging Face model folder needs it")
    c = json.loads(path.read_text())
    arch = c.get("model_type")
    if arch not in HF_ARCHS:
        known = arch in ARCHITECTURES or arch == "gemma3_text"
        raise UnsupportedArchitectureError(
            f"{folder}: tpi reads {arch} models from GGUF files only; convert the folder with llama.cpp's "
            "convert_hf_to_gguf.py" if known else
            f"{folder}: unknown model architecture '{arch}'; tpi runs {supported_architectures()} "
            f"(from a Hugging Face folder: {', '.join(HF_ARCHS)})"
        )
    try:
        hidden, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        rs = c.get("rope_scaling") or {}
        kind = rs.get("rope_type", rs.get("type"))
        scaling = RopeScaling()
        if kind in ("llama3", "linear"):
            scaling = RopeScaling(
                kind=kind,
                factor=float(rs.get("factor", 1.0)),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_context=int(rs.get("original_max_position_embeddings", 8192)),
            )
        return ModelConfig(
            arch=arch,
            hidden=hidden,
            intermediate=int(c["intermediate_size"]),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=int(c.get("head_dim") or hidden // n_heads),
            vocab=int(c["vocab_size"]),
            context=int(c.get("max_position_embeddings", 2048)),
            rms_eps=float(c.get("rms_norm_eps", 1e-5)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in names,
            tied_embeddings=bool(c.get("tie_word_embeddings", False)) or "lm_head.weight" not in names,
            name=folder.name,
        ).validate()
    except KeyError as e:
        raise ModelFormatError(f"{path}: missing field {e}; the config is incomplete") from None


class _SafetensorsFile:
    """One .safetensors file: JSON header, then raw little-endian tensor bytes."""

    def __init__(self, path: Path):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: truncated safetensors file; download it again")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ModelFormatError(f"{path}: header runs past the end of the file; it is truncated")
            header = json.loads(f.read(n))
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header.pop("__metadata__", None)
        self.base, self.path, self.entries = 8 + n, path, header
        for name, e in header.items():
            if self.base + e["data_offsets"][1] > size:
                raise ModelFormatError(f"{path}: tensor {name} runs past the end of the file; it is truncated")

    def array(self, name: str) -> np.ndarray:
        e = self.entries[name]
        dt = _DTYPES.get(e["dtype"])
        if dt is None:
            raise ModelFormatError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        return np.frombuffer(self._mm, dtype=dt, count=(b - a) // np.dtype(dt).itemsize, offset=self.base + a).reshape(
            e["shape"]
        ), e["dtype"]


# `--quant` values: GGML types tpi can write, and the names of the formats they replace.
QUANT_ALIASES = {"q8": "Q8_0", "q4g32": "Q4_1", "int4": "Q4_1", "q4": "Q4_0"}


def quant_type(quant: str | None) -> str | None:
    """The GGML type name a `--quant` value asks for (None: keep the folder's own dtypes)."""
    if quant is None:
        return None
    name = QUANT_ALIASES.get(quant.lower(), quant.upper())
    if name not in GGML_QUANTIZABLE + ("BF16",):
        raise ModelFormatError(
            f"--quant {quant!r} is not a type tpi can write; use one of {', '.join(GGML_QUANTIZABLE + ('BF16',))} "
            f"(old names: {', '.join(f'{k} = {v}' for k, v in QUANT_ALIASES.items())})")
    return name


class HFSource:
    """A Hugging Face model folder; 2-D weights become bf16 / ggml:F16 / f32 QTensors, or a GGML type on request."""

    kind = "hf"

    def __init__(self, folder: Path, quant: str | None = None, measure_error: bool = False):
        quant = quant_type(quant)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{folder}: no *.safetensors files; tpi reads safetensors weights only")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            wanted = set(json.loads(index.read_text())["weight_map"].values())
            missing = wanted - {f.name for f in files}
            if missing:
                raise ModelFormatError(f"{folder}: shards {sorted(missing)} listed in the index are missing")
        self._files = [_SafetensorsFile(f) for f in files]
        self._where = {n: f for f in self._files for n in f.entries}
        self.path = folder
        self.quant = quant
        self.config = read_hf_config(folder, set(self._where))
        self.notes: dict[str, object] = {}
        self.measure_error = measure_error
        self.keep_bf16_above: float | None = None  # --quant tensors with a larger relative error stay bf16

    def hf_name(self, name: str) -> str:
        if name.startswith("layers."):
            _, i, short = name.split(".", 2)
            return f"model.layers.{i}.{_LAYER[short]}"
        return _GLOBAL[name]

    def has(self, name: str) -> bool:
        return self.hf_name(name) in self._where

    def _entry(self, name: str) -> tuple[str, dict]:
        hname = self.hf_name(name)
        if hname not in self._where:
            raise ModelFormatError(f"{self.path}: tensor {hname} is missing")
        return hname, self._where[hname].entries[hname]

    def weight_fmt(self, name: str) -> str:
        """The fmt `load(name)` gives this matrix, from the header alone."""
        _, e = self._entry(name)
        if self.quant and e["shape"][-1] % GGML_TYPES[self.quant].block == 0:
            return ggml_fmt(self.quant)  # (a K off the block stays in the folder's dtype)
        return ggml_fmt({"BF16": "BF16", "F16": "F16"}.get(e["dtype"], "F32"))

    def load(self, name: str):
        hname, _ = self._entry(name)
        a, dtype = self._where[hname].array(hname)
        short = name.rsplit(".", 1)[-1]
        if short in ("wq", "wk", "bq", "bk"):  # rotate-half rows -> adjacent-pair rows
            heads = self.config.n_heads if short in ("wq", "bq") else self.config.n_kv_heads
            a = a[adjacent_pair_index(heads, self.config.head_dim)]
        if a.ndim == 1:
            return _to_f32(a, dtype)
        fmt = self.weight_fmt(name)
        if self.quant and fmt == ggml_fmt(self.quant):
            return self._quantized(name, _to_f32(a, dtype), dtype)
        if dtype == "BF16":
            return QTensor(BF16, a.shape, {"weight": np.ascontiguousarray(a)})
        if dtype == "F16":  # kept as GGML F16 (the torch / numpy kernels widen it to bf16)
            return QTensor(fmt, a.shape, {"data": np.ascontiguousarray(a).view(np.uint8)})
        return QTensor(F32, a.shape, {"weight": np.ascontiguousarray(a, dtype=np.float32)})

    def _quantized(self, name: str, ref: np.ndarray, dtype: str) -> QTensor:
        """ref in the --quant type (bf16 instead where its error is above keep_bf16_above), noted."""
        qt = quantize(ref, ggml_fmt(self.quant))
        measure = self.measure_error or self.keep_bf16_above is not None
        err = quant_error(ref, qt) if measure else None
        if self.keep_bf16_above is not None and err.rel_rmse > self.keep_bf16_above:
            qt = quantize(ref, BF16)
            err = quant_error(ref, qt)
        self.notes[name] = ImportNote(dtype, qt.fmt, False, err)
        return qt

    def tokenizer(self):
        return HFTokenizer(self.path)


def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bits_to_f32(a)
    return a.astype(np.float32)
