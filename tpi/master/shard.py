"""Cut a model source into per-rank blocks: the weights a rank needs, in execution order.

The blocks' keys, names and fused order are tpi.model.blocks'. Each block is a flat dict of
QTensors (matrices) and float32 vectors. Column shards (wo, wdown) are cut on the tensor's block; a boundary inside a block re-quantizes
that rank's slice to Q8_0 (32-element blocks), which the planner avoids where it can.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from tpi.model.config import ModelConfig, layer_name
from tpi.devices.slicing import RankShard
from tpi.quant.formats import QTensor, concat_rows, dequantize, k_block, quantize, slice_cols, slice_rows, take_rows
from tpi.model.moe import DOWN_EXPS, GATE_EXPS, MOE_CANONICAL, ROUTER, UP_EXPS
from tpi.model.blocks import EMBED, FUSED, GLOBALS, attn_key, mlp_key

log = logging.getLogger(__name__)

REQUANT_FMT = "ggml:Q8_0"  # where a column shard boundary splits a 256-element block


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
    return blk


def _mlp_block(t: dict, s: RankShard, requantized: set) -> dict:
    wdown, redone = cut_cols(t["w_down"], s.inter)
    if redone:
        requantized.add(("w_down", t["w_down"].fmt))
    return {"mlp_norm": t["mlp_norm"], **_fuse_or_keep("wgu", [_rows(t["w_gate"], s.inter), _rows(t["w_up"], s.inter)]),
            "wdown": wdown}


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
    for i in range(cfg.n_layers):
        names = ["attn_norm", "wq", "wk", "wv", "wo"] + (["bq", "bk", "bv"] if cfg.qkv_bias else [])
        t = {n: source.load(layer_name(i, n)) for n in names}
        yield attn_key(i), [_attn_block(t, s, cfg.qkv_bias, requantized) for s in shards]
        if cfg.is_moe:
            t = {n: source.load(layer_name(i, n)) for n in ("mlp_norm", *MOE_CANONICAL)}
            yield mlp_key(i), [_moe_block(t, s, cfg, requantized) for s in shards]
            continue
        t = {n: source.load(layer_name(i, n)) for n in ("mlp_norm", "w_gate", "w_up", "w_down")}
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


def shard_to_dict(s: RankShard) -> dict:
    """Wire form of a RankShard (sent in the worker's assignment)."""
    return {
        "rank": s.rank, "head_dim": s.head_dim, "group_size": s.group_size,
        "q_heads": [s.q_heads.start, s.q_heads.stop], "kv_heads": list(s.kv_heads),
        "inter": [s.inter.start, s.inter.stop], "vocab": [s.vocab.start, s.vocab.stop],
        "experts": [s.experts.start, s.experts.stop], "expert_ff": [s.expert_ff.start, s.expert_ff.stop],
    }


def shard_from_dict(d: dict, cfg: ModelConfig) -> RankShard:
    """Inverse of shard_to_dict, checked against the model so a bad assignment fails clearly."""
    from tpi.errors import ProtocolError

    try:
        s = RankShard(
            rank=int(d["rank"]), head_dim=int(d["head_dim"]), group_size=int(d["group_size"]),
            q_heads=range(*map(int, d["q_heads"])), kv_heads=tuple(int(k) for k in d["kv_heads"]),
            inter=range(*map(int, d["inter"])), vocab=range(*map(int, d["vocab"])),
            experts=range(*map(int, d.get("experts", (0, 0)))), expert_ff=range(*map(int, d.get("expert_ff", (0, 0)))),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed shard assignment: {e!r}") from None
    ok = (
        s.head_dim == cfg.head_dim and s.group_size == cfg.group_size and len(s.q_heads) > 0
        and 0 <= s.q_heads.start and s.q_heads.stop <= cfg.n_heads and len(s.kv_heads) > 0
        and 0 <= s.inter.start < s.inter.stop <= cfg.intermediate
        and 0 <= s.vocab.start < s.vocab.stop <= cfg.vocab
        and (not cfg.is_moe or (0 <= s.experts.start < s.experts.stop <= cfg.n_experts
                                and 0 <= s.expert_ff.start < s.expert_ff.stop <= cfg.expert_ff))
    )
    if not ok:
        raise ProtocolError(f"shard assignment {d} does not fit the model; master and worker disagree")
    return s
