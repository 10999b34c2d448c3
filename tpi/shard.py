"""Cut a model source into per-rank blocks: the weights a rank needs, in execution order.

Block keys: "L{i}.attn", "L{i}.mlp" for each layer, then "globals". Each block is a flat dict of
QTensors (matrices) and float32 vectors; q|k|v and gate|up are fused into one matrix each.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from tpi.config import ModelConfig, layer_name
from tpi.devices.slicing import RankShard
from tpi.quant.formats import QTensor, concat_rows, slice_cols, slice_rows


def block_keys(n_layers: int) -> list[str]:
    """Execution order of a forward pass."""
    keys = []
    for i in range(n_layers):
        keys += [f"L{i}.attn", f"L{i}.mlp"]
    return keys + ["globals"]


def _rows(x, r: range):
    return x[r.start : r.stop] if isinstance(x, np.ndarray) else slice_rows(x, r.start, r.stop)


def _cols(x: QTensor, r: range) -> QTensor:
    return slice_cols(x, r.start, r.stop)


def _fuse(parts: Sequence):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts).astype(np.float32)
    return concat_rows(list(parts))


def _attn_block(t: dict, s: RankShard, bias: bool) -> dict:
    blk = {
        "attn_norm": t["attn_norm"],
        "wqkv": _fuse([_rows(t["wq"], s.q_rows), _rows(t["wk"], s.kv_rows), _rows(t["wv"], s.kv_rows)]),
        "wo": _cols(t["wo"], s.wo_cols),
    }
    if bias:
        blk["bqkv"] = _fuse([_rows(t["bq"], s.q_rows), _rows(t["bk"], s.kv_rows), _rows(t["bv"], s.kv_rows)])
    return blk


def _mlp_block(t: dict, s: RankShard) -> dict:
    return {
        "mlp_norm": t["mlp_norm"],
        "wgu": _fuse([_rows(t["w_gate"], s.inter), _rows(t["w_up"], s.inter)]),
        "wdown": _cols(t["w_down"], s.inter),
    }


def iter_rank_blocks(source, cfg: ModelConfig, shards: Sequence[RankShard]) -> Iterator[tuple[str, list[dict]]]:
    """Yield (key, [block for each rank]) in execution order, loading each source tensor once.

    Rank 0 (the master) also gets the embedding in its globals block.
    """
    for i in range(cfg.n_layers):
        names = ["attn_norm", "wq", "wk", "wv", "wo"] + (["bq", "bk", "bv"] if cfg.qkv_bias else [])
        t = {n: source.load(layer_name(i, n)) for n in names}
        yield f"L{i}.attn", [_attn_block(t, s, cfg.qkv_bias) for s in shards]
        t = {n: source.load(layer_name(i, n)) for n in ("mlp_norm", "w_gate", "w_up", "w_down")}
        yield f"L{i}.mlp", [_mlp_block(t, s) for s in shards]
    embed = source.load("embed")
    head = embed if cfg.tied_embeddings else source.load("lm_head")
    norm = source.load("norm")
    globs = [{"norm": norm, "lm_head": _rows(head, s.vocab)} for s in shards]
    globs[0]["embed"] = embed
    yield "globals", globs
