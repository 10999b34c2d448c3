"""GGUF tensors kept in their own types, cut into rank blocks, for the ggml layer tests.

A test-side stand-in for the weights branch (contract §1-2: `ggml:<TYPE>` matrices with rows as in
the file) so the ggml layers can be checked against llama.cpp before that branch lands. Row shards
are byte slices of the mapped file; column shards copy whole blocks; q/k rows of NEOX-rope files
(qwen2) are gathered into adjacent-pair order, as tpi's loaders do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tpi.devices.slicing import RankShard, plan_shards
from tpi.formats.gguf import ADJACENT_PAIR_ARCHS, adjacent_pair_index, open_gguf, read_config


@dataclass(frozen=True)
class RawGgml:
    """A [N, K] matrix in a ggml type: arrays["data"] uint8 [N, row bytes] (the contract's QTensor)."""

    fmt: str
    shape: tuple[int, int]
    arrays: dict

    @property
    def type(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.fmt.split(":", 1)[1]]

    def rows(self, r: range) -> "RawGgml":
        return RawGgml(self.fmt, (len(r), self.shape[1]), {"data": self.arrays["data"][r.start:r.stop]})

    def take(self, idx: np.ndarray) -> "RawGgml":
        return RawGgml(self.fmt, (len(idx), self.shape[1]), {"data": np.ascontiguousarray(self.arrays["data"][idx])})

    def cols(self, r: range) -> "RawGgml":
        block, nbytes = gguf.GGML_QUANT_SIZES[self.type]
        assert r.start % block == 0 and r.stop % block == 0, (self.fmt, r)
        data = self.arrays["data"][:, r.start // block * nbytes: r.stop // block * nbytes]
        return RawGgml(self.fmt, (self.shape[0], len(r)), {"data": np.ascontiguousarray(data)})

    def dequantize(self) -> np.ndarray:
        return gguf.quants.dequantize(self.arrays["data"], self.type).reshape(self.shape).astype(np.float32)


def fuse(parts: list[RawGgml]) -> RawGgml:
    return RawGgml(parts[0].fmt, (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                   {"data": np.concatenate([p.arrays["data"] for p in parts])})


class NativeGguf:
    """A GGUF file's config and tensors: matrices as RawGgml views of the map, vectors as float32."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.config = read_config(self.reader, self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def matrix(self, name: str) -> RawGgml:
        t = self.tensors[name]
        n, k = int(t.shape[1]), int(t.shape[0])
        data = np.asarray(t.data).view(np.uint8).reshape(n, -1)
        return RawGgml(f"ggml:{t.tensor_type.name}", (n, k), {"data": data})

    def vector(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(-1)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _pairs(self, x, heads: int):
        """Rows of a NEOX-rope q/k (matrix or bias) in adjacent-pair order."""
        if self.config.arch in ADJACENT_PAIR_ARCHS:
            return x
        idx = adjacent_pair_index(heads, self.config.head_dim)
        return x[idx] if isinstance(x, np.ndarray) else x.take(idx)

    def embed(self, ids) -> np.ndarray:
        m = self.matrix("token_embd.weight")
        rows = m.arrays["data"][np.asarray(ids)]
        return gguf.quants.dequantize(rows, m.type).reshape(len(ids), m.shape[1]).astype(np.float32)


def _rows(x, r: range):
    return x[r.start:r.stop] if isinstance(x, np.ndarray) else x.rows(r)


def _fused_or_apart(names: tuple[str, ...], fused: str, parts: list[RawGgml]) -> dict:
    """One fused matrix when every part has one type (contract §2), else the parts by name."""
    if len({p.fmt for p in parts}) == 1:
        return {fused: fuse(parts)}
    return dict(zip(names, parts))


def rank_blocks(src: NativeGguf, shards: list[RankShard]) -> list[dict[str, dict]]:
    """Every rank's blocks {"L{i}.attn", "L{i}.mlp", "globals"} as contract §2 lays them out."""
    cfg = src.config
    out = [dict() for _ in shards]
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        wq = src._pairs(src.matrix(p + "attn_q.weight"), cfg.n_heads)
        wk = src._pairs(src.matrix(p + "attn_k.weight"), cfg.n_kv_heads)
        wv, wo = src.matrix(p + "attn_v.weight"), src.matrix(p + "attn_output.weight")
        gate, up, down = (src.matrix(p + f"ffn_{n}.weight") for n in ("gate", "up", "down"))
        bias = None
        if src.has(p + "attn_q.bias"):
            bias = (src._pairs(src.vector(p + "attn_q.bias"), cfg.n_heads),
                    src._pairs(src.vector(p + "attn_k.bias"), cfg.n_kv_heads), src.vector(p + "attn_v.bias"))
        for blocks, s in zip(out, shards):
            attn = {"attn_norm": src.vector(p + "attn_norm.weight"), "wo": wo.cols(s.wo_cols)}
            attn.update(_fused_or_apart(("wq", "wk", "wv"), "wqkv",
                                        [_rows(wq, s.q_rows), _rows(wk, s.kv_rows), _rows(wv, s.kv_rows)]))
            if bias is not None:
                attn["bqkv"] = np.concatenate([_rows(bias[0], s.q_rows), _rows(bias[1], s.kv_rows),
                                               _rows(bias[2], s.kv_rows)]).astype(np.float32)
            mlp = {"mlp_norm": src.vector(p + "ffn_norm.weight"), "wdown": down.cols(s.inter)}
            mlp.update(_fused_or_apart(("wgate", "wup"), "wgu", [_rows(gate, s.inter), _rows(up, s.inter)]))
            blocks[f"L{i}.attn"], blocks[f"L{i}.mlp"] = attn, mlp
    head = src.matrix("output.weight" if src.has("output.weight") else "token_embd.weight")
    for blocks, s in zip(out, shards):
        blocks["globals"] = {"norm": src.vector("output_norm.weight"), "lm_head": _rows(head, s.vocab)}
    return out


def shards_for(src: NativeGguf, ratios) -> list[RankShard]:
    return list(plan_shards(src.config, tuple(ratios)))


def quantize_rows(w: np.ndarray, type_name: str) -> RawGgml:
    """float32 [N, K] -> RawGgml of that type, quantized by ggml's own ggml_quantize_chunk.

    gguf's numpy quantizer lacks the K-quants; ggml's is what llama.cpp's quantize tool runs.
    """
    import ctypes

    from tpi.quant.ggml_lib import library_dir

    lib = ctypes.CDLL(str(library_dir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n, k = w.shape
    src = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((n, k // block * nbytes), np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, n, k, None)
    assert written == out.nbytes, (type_name, written, out.nbytes)
    return RawGgml(f"ggml:{type_name}", (n, k), {"data": out})


# llama.cpp file types a tiny F16 model is re-quantized into (llama_ftype, include/llama.h)
LLAMA_FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12,
                "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "BF16": 32}


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """dst = src re-quantized by llama.cpp itself (a real K-quant mix for Q4_K_M etc.)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize({ftype}) failed with {rc}"
    return dst
