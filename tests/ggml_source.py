"""Models for the ggml tests, cut the way tpi cuts them, and GGUF-typed fixtures made by ggml itself.

`model_blocks` opens a model with tpi's own loader (GGUF types kept native) and cuts every rank's
blocks as a group does (tpi.master.shard, with column cuts on each tensor's block); `quantize_rows` and
`llama_quantize` make weights and whole models with llama.cpp's own quantizers (the K-quants that
gguf's numpy quantizer lacks).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tpi.quant.formats import QTensor, dequantize, take_rows


@dataclass(frozen=True)
class ModelBlocks:
    """A model cut for `ratios`: its config and shards, each rank's blocks, and rank 0's embedding."""

    source: object
    shards: tuple
    blocks: list[dict[str, dict]]
    embed_table: QTensor

    @property
    def config(self):
        return self.source.config

    def embed(self, ids) -> np.ndarray:
        h = dequantize(take_rows(self.embed_table, np.asarray(ids, dtype=np.int64)))
        return h * np.float32(self.config.embed_scale)  # gemma3: sqrtf(hidden); 1 elsewhere

    def matrix_types(self) -> set[str]:
        """GGUF types of the file's matrices."""
        return {t.tensor_type.name for t in self.source.reader.tensors if len(t.shape) == 2}


def model_blocks(path: Path | str, ratios=(1.0,), placement: str | None = None) -> ModelBlocks:
    """The model cut for `ratios`; a MoE model's experts placed `placement` ("split" / "whole"; None:
    the planner's choice for devices as fast as their ratios)."""
    from tpi.devices.experts import split_experts
    from tpi.devices.group_plan import weight_profile_of
    from tpi.devices.slicing import plan_cuts
    from tpi.formats import open_model
    from tpi.master.shard import iter_rank_blocks

    source = open_model(str(path))
    profile = weight_profile_of(source)
    blocks_k = (profile.wo_block, profile.down_block) if profile else ()
    experts = split_experts(source.config, tuple(ratios), placement, *blocks_k[1:]) if placement else None
    shards = plan_cuts(source.config, tuple(ratios), *blocks_k, experts=experts).shards
    blocks: list[dict[str, dict]] = [{} for _ in shards]
    for key, per_rank in iter_rank_blocks(source, source.config, shards):
        for mine, block in zip(blocks, per_rank):
            mine[key] = block
    return ModelBlocks(source, shards, blocks, blocks[0]["globals"].pop("embed"))


def quantize_rows(w: np.ndarray, type_name: str) -> QTensor:
    """float32 [N, K] -> a ggml:<type> QTensor, quantized by ggml's own ggml_quantize_chunk (F32 and
    BF16 stay tpi's native "f32" / "bf16", which are those bytes already: contract §1)."""
    from tpi.quant.formats import quantize
    from tpi.quant.ggml_lib import library_dir

    if type_name in ("F32", "BF16"):
        return quantize(w, type_name.lower())

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
    return QTensor(f"ggml:{type_name}", (n, k), {"data": out})


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
