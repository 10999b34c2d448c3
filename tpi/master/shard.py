"""Cutting shards: a model source into per-rank blocks, and those blocks into cached shard stores.

The blocks' keys, names and fused order are tpi.model.blocks'. Each block is a flat dict of
QTensors (matrices) and float32 vectors. Column shards (wo, wdown) are cut on the tensor's block; a boundary inside a block re-quantizes
that rank's slice to Q8_0 (32-element blocks), which the planner avoids where it can.

A shard store is cached under a key of the model file and the shard it holds (`store_key`); one pass
over the model imports each tensor once and feeds every rank's store (`write_stores`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tpi.devices.slicing import RankShard, shard_to_dict
from tpi.errors import GroupError
from tpi.model.config import ModelConfig, config_to_dict, layer_name
from tpi.scheduler.store import write_store
from tpi.quant.formats import QTensor, concat_rows, dequantize, k_block, quantize, slice_cols, slice_rows, take_rows
from tpi.model.blocks import EMBED, FUSED, GLOBALS, POST_ATTN_NORM, POST_MLP_NORM, QK_NORMS, attn_key, mlp_key
from tpi.model.moe import DOWN_EXPS, GATE_EXPS, MOE_CANONICAL, ROUTER, UP_EXPS

log = logging.getLogger(__name__)

REQUANT_FMT = "ggml:Q8_0"  # where a column shard boundary splits a 256-element block
STORE_FORMAT = 2  # bump when the block layout (tpi.model.blocks) changes: old cached stores go stale (2: GGUF types)


def _rows(x, r: range):
    return x[r.start : r.stop] if isinstance(x, np.ndarray) else slice_rows(x, r.start, r.stop)


def cut_cols(x: QTensor, r: range) -> tuple[QTensor, bool]:
    """Columns r of x, and whether they had to be re-quantized to REQUANT_FMT (r splits a block)."""
    block = k_block(x.fmt)
    if r.start % block == 0 and r.stop % block == 0:
        return slice_cols(x, r.start, r.stop), False
    lo, hi = r.start // block * block, -(-r.stop // block) * block  # the whole blocks around r
    w = dequantize(slice_cols(x, lo, hi))[:, r.start - lo : r.stop - lo]
    return quantize(w, REQUANT_FMT), True


def _fuse_or_keep(fused: str, parts: Sequence) -> dict:
    """{fused: rows stacked} when the parts share a fmt and K (vectors always), else each under its own key."""
    if isinstance(parts[0], np.ndarray):
        return {fused: np.concatenate(parts).astype(np.float32)}
    if len({(p.fmt, p.shape[1]) for p in parts}) == 1:
        return {fused: concat_rows(list(parts))}
    return dict(zip(FUSED[fused], parts))


def _attn_block(t: dict, s: RankShard, bias: bool, requantized: set) -> dict:
    wo, redone = cut_cols(t["wo"], s.wo_cols)
    if redone:
        requantized.add(("wo", t["wo"].fmt))
    blk = {"attn_norm": t["attn_norm"],
           **_fuse_or_keep("wqkv", [_rows(t["wq"], s.q_rows), _rows(t["wk"], s.kv_rows), _rows(t["wv"], s.kv_rows)]),
           "wo": wo}
    if bias:
        blk |= _fuse_or_keep("bqkv", [_rows(t["bq"], s.q_rows), _rows(t["bk"], s.kv_rows), _rows(t["bv"], s.kv_rows)])
    return blk | {n: t[n] for n in (*QK_NORMS, POST_ATTN_NORM) if n in t}  # whole on every rank


def _mlp_block(t: dict, s: RankShard, requantized: set) -> dict:
    wdown, redone = cut_cols(t["w_down"], s.inter)
    if redone:
        requantized.add(("w_down", t["w_down"].fmt))
    return {"mlp_norm": t["mlp_norm"], **_fuse_or_keep("wgu", [_rows(t["w_gate"], s.inter), _rows(t["w_up"], s.inter)]),
            "wdown": wdown} | ({POST_MLP_NORM: t[POST_MLP_NORM]} if POST_MLP_NORM in t else {})


def _moe_block(t: dict, s: RankShard, cfg: ModelConfig, requantized: set) -> dict:
    """A rank's MoE MLP: the whole router, and its experts' rows (gate / up: rows f0..f1 of each
    expert's slab; down: each expert's hidden rows, columns f0..f1), zero-copy where contiguous."""
    ff, h = cfg.expert_ff, cfg.hidden
    e0, e1, f0, f1 = s.experts.start, s.experts.stop, s.expert_ff.start, s.expert_ff.stop
    if (f0, f1) == (0, ff):
        gate, up = (slice_rows(t[n], e0 * ff, e1 * ff) for n in ("w_gate_exps", "w_up_exps"))
    else:
        rows = (np.arange(e0, e1)[:, None] * ff + np.arange(f0, f1)[None, :]).reshape(-1)
        gate, up = (take_rows(t[n], rows) for n in ("w_gate_exps", "w_up_exps"))
    down, redone = cut_cols(slice_rows(t["w_down_exps"], e0 * h, e1 * h), s.expert_ff)
    if redone:
        requantized.add(("w_down_exps", t["w_down_exps"].fmt))
    return {"mlp_norm": t["mlp_norm"], ROUTER: t["router"], GATE_EXPS: gate, UP_EXPS: up, DOWN_EXPS: down}


def iter_rank_blocks(source, cfg: ModelConfig, shards: Sequence[RankShard]) -> Iterator[tuple[str, list[dict]]]:
    """Yield (key, [block for each rank]) in execution order, loading each source tensor once.

    Rank 0 (the master) also gets the embedding in its globals block.
    """
    requantized: set[tuple[str, str]] = set()
    family = cfg.family
    attn_names = ["attn_norm", "wq", "wk", "wv", "wo"] + (["bq", "bk", "bv"] if cfg.qkv_bias else []) + (
        list(QK_NORMS) if family.qk_norm else []) + ([POST_ATTN_NORM] if family.post_norms else [])
    mlp_names = ["mlp_norm", "w_gate", "w_up", "w_down"] + ([POST_MLP_NORM] if family.post_norms else [])
    for i in range(cfg.n_layers):
        t = {n: source.load(layer_name(i, n)) for n in attn_names}
        yield attn_key(i), [_attn_block(t, s, cfg.qkv_bias, requantized) for s in shards]
        if cfg.is_moe:
            t = {n: source.load(layer_name(i, n)) for n in ("mlp_norm", *MOE_CANONICAL)}
            yield mlp_key(i), [_moe_block(t, s, cfg, requantized) for s in shards]
            continue
        t = {n: source.load(layer_name(i, n)) for n in mlp_names}
        yield mlp_key(i), [_mlp_block(t, s, requantized) for s in shards]
    for name, fmt in sorted(requantized):
        log.info("re-quantized %s shards to Q8_0: a shard boundary splits a %d-element %s block", name,
                 k_block(fmt), fmt)
    embed = source.load(EMBED)
    head = embed if cfg.tied_embeddings else source.load("lm_head")
    norm = source.load("norm")
    globs = [{"norm": norm, "lm_head": _rows(head, s.vocab)} for s in shards]
    globs[0][EMBED] = embed
    yield GLOBALS, globs


def store_key(source, shard: RankShard, with_embed: bool) -> str:
    """The cache name of a rank's store: the model file (path, size, mtime) and the shard it holds."""
    st = Path(source.path).stat()
    ident = {"v": STORE_FORMAT, "model": str(Path(source.path).resolve()), "size": st.st_size,
             "mtime": st.st_mtime_ns, "shard": shard_to_dict(shard), "embed": with_embed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def write_stores(source, cfg: ModelConfig, shards: Sequence[RankShard], paths: dict[int, Path],
                 rank0_sink: Callable[[str, dict], None]) -> None:
    """One pass over the model: rank 0's blocks go to rank0_sink, ranks in `paths` to store files.

    Each store is written by its own thread from a small queue, so every source tensor is
    read and imported once however many ranks there are.
    """
    queues = {r: queue.Queue(maxsize=2) for r in paths}
    errors: dict[int, BaseException] = {}

    def feed(q: queue.Queue):
        while (item := q.get()) is not None:
            yield item

    def write(rank: int) -> None:
        meta = {"format": STORE_FORMAT, "config": config_to_dict(cfg), "shard": shard_to_dict(shards[rank])}
        try:
            write_store(paths[rank], meta, feed(queues[rank]))
        except BaseException as e:  # reported after the pass; keep draining so the producer never blocks
            errors[rank] = e
            for _ in feed(queues[rank]):
                pass

    threads = [threading.Thread(target=write, args=(r,), daemon=True) for r in paths]
    for t in threads:
        t.start()
    try:
        for key, per_rank in iter_rank_blocks(source, cfg, shards):
            rank0_sink(key, per_rank[0])
            for r, q in queues.items():
                q.put((key, per_rank[r]))
    finally:
        for q in queues.values():
            q.put(None)
        for t in threads:
            t.join()
    if errors:
        rank, e = next(iter(errors.items()))
        raise GroupError(f"writing the shard for rank {rank} failed: {e}") from e
