"""Pure shard maths: which heads, intermediate columns and vocab rows each rank owns.

Rounding rule (used for heads, the intermediate dim and the vocabulary alike):
the dimension is cut into whole *units* (one head-unit, or `align` columns/rows); rank i
is owed `ratio_i * units`. Each rank first gets the floor of what it is owed, the units
left over go one each to the ranks with the largest fractional remainders (ties: lower
rank first), and finally any rank left with zero units is raised to one, taking the unit
from the rank whose count most exceeds what it is owed. Ranges are contiguous and in rank
order, so rank 0 holds the first heads / columns / rows.

Column-split matrices (wo along q_dim, w_down along the intermediate dim) keep whole blocks of
their GGUF type along K: `plan_cuts` uses 256-column units for K-quants where every device can
have one, else 32 (and those shards are re-quantized to Q8_0 when cut, tpi.master.shard.cut_cols).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from tpi.model.config import ModelConfig
from tpi.errors import ProtocolError, ShapeError

QUANT_GROUP = 32  # the smallest block along K (q4g32, Q4_0, Q8_0 ...): every reduced-dim boundary is a multiple


@dataclass(frozen=True)
class RankShard:
    """One rank's slice of every layer and of the output layer."""

    rank: int
    head_dim: int
    group_size: int  # query heads per KV head
    q_heads: range  # contiguous global query-head indices
    kv_heads: tuple[int, ...]  # global KV heads this rank needs (replicated across ranks when shared)
    inter: range  # intermediate columns: rows of w_gate/w_up, columns of w_down
    vocab: range  # lm_head rows
    experts: range = range(0)  # MoE: the experts this rank holds (tpi.model.moe.ExpertShare)
    expert_ff: range = range(0)  # MoE: the columns of each of them

    def expert_share(self, cfg: ModelConfig):
        """This rank's experts as a tpi.model.moe.ExpertShare, or None for a dense model."""
        if not cfg.is_moe:
            return None
        from tpi.model.moe import ExpertShare

        return ExpertShare(cfg.n_experts, cfg.expert_ff, self.experts, self.expert_ff)

    @property
    def q_rows(self) -> range:
        """Rows of wq (and entries of bq) this rank takes."""
        return range(self.q_heads.start * self.head_dim, self.q_heads.stop * self.head_dim)

    @property
    def kv_rows(self) -> range:
        """Rows of wk and wv (and bk, bv); contiguous because q_heads is contiguous."""
        return range(self.kv_heads[0] * self.head_dim, (self.kv_heads[-1] + 1) * self.head_dim)

    @property
    def wo_cols(self) -> range:
        """Columns of wo (its reduced dim, q_dim) that pair with this rank's attention output."""
        return self.q_rows

    @property
    def q_to_local_kv(self) -> tuple[int, ...]:
        """For each local query head, the index of its KV head within `kv_heads`."""
        first_kv = self.kv_heads[0]
        return tuple(h // self.group_size - first_kv for h in self.q_heads)

    @property
    def n_q_heads(self) -> int:
        return len(self.q_heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_heads)


def normalize_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """Check ratios are positive and finite and scale them to sum to exactly 1."""
    if len(ratios) == 0:
        raise ShapeError("split ratios are empty; give one ratio per device (e.g. [1.0] for one device)")
    for i, r in enumerate(ratios):
        if not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ShapeError(
                f"split ratio {r!r} for rank {i} must be a positive finite number; "
                "leave a device out of the group instead of giving it ratio 0"
            )
    total = float(sum(ratios))
    if abs(total - 1.0) > 1e-3:
        raise ShapeError(f"split ratios sum to {total:.6f}, not 1; normalise them (ratio / sum) before splitting")
    return tuple(float(r) / total for r in ratios)


def largest_remainder(units: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Whole-unit counts per rank, each >= 1, summing to `units`, as close to ratios as possible."""
    weights = normalize_ratios(ratios)
    n = len(weights)
    if units < n:
        raise ShapeError(f"cannot give {n} ranks at least one of only {units} units; use at most {units} devices")
    owed = [w * units for w in weights]
    counts = [math.floor(o) for o in owed]
    leftover = units - sum(counts)
    # Largest fractional remainder first; ties go to the lower rank.
    by_remainder = sorted(range(n), key=lambda i: (-(owed[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    for i in range(n):
        if counts[i] == 0:
            donor = max((j for j in range(n) if counts[j] > 1), key=lambda j: (counts[j] - owed[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    assert sum(counts) == units and min(counts) >= 1
    return tuple(counts)


def _ranges(counts: Sequence[int], unit: int, total: int | None = None) -> tuple[range, ...]:
    """Contiguous ranges of `count * unit` each; the last one ends at `total` when given."""
    out = []
    start = 0
    for i, c in enumerate(counts):
        stop = start + c * unit
        if total is not None and i == len(counts) - 1:
            stop = total
        out.append(range(start, stop))
        start = stop
    return tuple(out)


def split_aligned(total: int, ratios: Sequence[float], align: int = QUANT_GROUP,
                  tail_to_last: bool = False) -> tuple[range, ...]:
    """Split [0, total) into contiguous ranges whose boundaries are multiples of `align`.

    With tail_to_last=False, `total` must itself be a multiple of `align` (a reduced dim).
    With tail_to_last=True, the last rank also takes the `total % align` tail (the vocab).
    """
    if align < 1:
        raise ShapeError(f"alignment {align} must be >= 1")
    if total % align and not tail_to_last:
        raise ShapeError(
            f"dimension {total} is not a multiple of {align}, so it cannot be split on {align}-aligned "
            "boundaries; this model needs padding or a converter that pads the intermediate dim"
        )
    units = total // align
    if units < len(ratios):
        raise ShapeError(
            f"dimension {total} has only {units} blocks of {align}, fewer than the {len(ratios)} devices; "
            f"use at most {units} devices"
        )
    return _ranges(largest_remainder(units, ratios), align, total)


def head_unit(head_dim: int, align: int = QUANT_GROUP) -> int:
    """Smallest number of whole heads whose width (heads * head_dim) is a multiple of `align`."""
    return align // math.gcd(head_dim, align)


def split_heads(n_heads: int, head_dim: int, ratios: Sequence[float], align: int = QUANT_GROUP) -> tuple[range, ...]:
    """Contiguous whole-head ranges whose wo column boundaries (heads * head_dim) are multiples of `align`."""
    unit = head_unit(head_dim, align)
    n = len(ratios)
    if n > n_heads:
        raise ShapeError(
            f"{n} devices but the model has only {n_heads} query heads; every device needs a head, "
            f"so use at most {n_heads} devices"
        )
    if n_heads % unit:
        raise ShapeError(
            f"head_dim {head_dim} is not a multiple of {align}, and {n_heads} heads cannot be grouped in "
            f"blocks of {unit} heads to align wo columns to {align}; this model cannot be split on "
            f"{align}-aligned head boundaries (run it on one device)"
        )
    units = n_heads // unit
    if units < n:
        raise ShapeError(
            f"head_dim {head_dim} forces head blocks of {unit} (to keep wo columns {align}-aligned), "
            f"leaving {units} blocks for {n} devices; use at most {units} devices"
        )
    return _ranges(largest_remainder(units, ratios), unit)


def kv_heads_for(q_heads: range, group_size: int) -> tuple[int, ...]:
    """The KV heads serving a contiguous run of query heads (GQA groups are contiguous)."""
    return tuple(range(q_heads.start // group_size, (q_heads.stop - 1) // group_size + 1))


@dataclass(frozen=True)
class ShardCuts:
    """The shards of one split, and the column-split matrices whose blocks they could not keep whole."""

    shards: tuple[RankShard, ...]
    wo_align: int  # wo column (q_dim) boundaries are multiples of this
    down_align: int  # w_down column (intermediate) boundaries are multiples of this
    requantized: tuple[str, ...]  # "wo" / "w_down" / "w_down_exps": cut off their block, re-quantized to Q8_0
    experts: object = None  # MoE: the placement's tpi.devices.experts.ExpertCuts
    experts_reason: str = ""  # why that placement


def plan_cuts(cfg: ModelConfig, ratios: Sequence[float], wo_block: int = QUANT_GROUP,
              down_block: int = QUANT_GROUP, experts=None, experts_reason: str = "", *,
              placement: str | None = None, streaming: bool = False) -> ShardCuts:
    """Shards whose wo / w_down boundaries fall on those matrices' blocks along K (32 or 256) where
    the split has room for it; where it has not (fewer whole blocks than devices), that matrix is cut
    on 32 instead and re-quantized to Q8_0 (a 32-element block type) when the shards are cut.

    A MoE model's experts go as `experts` (tpi.devices.experts.ExpertCuts) places them, or as
    `placement` ("split" / "whole", --experts) names; neither: tpi.devices.experts.place_experts picks
    the placement with the shorter predicted MoE layer for ranks as fast as their ratios (whole
    experts when they stream from disk).
    """
    if cfg.is_moe and experts is None:
        from tpi.devices.experts import place_experts

        experts, experts_reason = place_experts(cfg, ratios, placement, down_block, streaming)
    requantized = []

    def aligned(what: str, block: int, split) -> tuple[int, tuple[range, ...]]:
        align = max(QUANT_GROUP, block)
        try:
            return align, split(align)
        except ShapeError:
            if align == QUANT_GROUP:
                raise
            requantized.append(what)
            return QUANT_GROUP, split(QUANT_GROUP)

    wo_align, heads = aligned("wo", wo_block, lambda a: split_heads(cfg.n_heads, cfg.head_dim, ratios, a))
    down_align, inter = aligned("w_down", down_block, lambda a: split_aligned(cfg.intermediate, ratios, a))
    if experts is not None and experts.requantized:
        requantized.append("w_down_exps")
    shards = plan_shards(cfg, ratios, heads=heads, inter=inter, experts=experts)
    return ShardCuts(shards, wo_align, down_align, tuple(requantized), experts, experts_reason)


def plan_shards(cfg: ModelConfig, ratios: Sequence[float], align: int = QUANT_GROUP, *,
                heads: Sequence[range] | None = None, inter: Sequence[range] | None = None,
                experts=None) -> tuple[RankShard, ...]:
    """Every rank's heads, KV heads, intermediate and vocab slices for the given split ratios
    (heads and inter: already split, e.g. on 256-element blocks by plan_cuts; experts: a MoE
    placement's ExpertCuts, by default every expert split by the ratios)."""
    if cfg.is_moe and experts is None:
        from tpi.devices.experts import SPLIT, split_experts

        experts = split_experts(cfg, ratios, SPLIT)
    if cfg.n_kv_heads < 1 or cfg.n_heads % cfg.n_kv_heads:
        raise ShapeError(f"{cfg.n_heads} query heads are not a multiple of {cfg.n_kv_heads} KV heads")
    heads = heads or split_heads(cfg.n_heads, cfg.head_dim, ratios, align)
    inter = inter or split_aligned(cfg.intermediate, ratios, align)
    vocab = split_aligned(cfg.vocab, ratios, align, tail_to_last=True)
    group = cfg.group_size
    shards = tuple(
        RankShard(rank=r, head_dim=cfg.head_dim, group_size=group, q_heads=heads[r],
                  kv_heads=kv_heads_for(heads[r], group), inter=inter[r], vocab=vocab[r],
                  experts=experts.experts[r] if experts else range(0), expert_ff=experts.ff[r] if experts else range(0))
        for r in range(len(ratios))
    )
    check_partition(cfg, shards, align)
    return shards


def check_partition(cfg: ModelConfig, shards: Sequence[RankShard], align: int = QUANT_GROUP) -> None:
    """Raise ShapeError unless the shards cover every head/column/row exactly once, aligned."""
    def covers(parts: Sequence[range], total: int, what: str) -> None:
        pos = 0
        for s in parts:
            if s.start != pos or len(s) == 0:
                raise ShapeError(f"{what} slices do not tile [0, {total}): got {list(parts)}")
            pos = s.stop
        if pos != total:
            raise ShapeError(f"{what} slices end at {pos}, not {total}")

    covers([s.q_heads for s in shards], cfg.n_heads, "query-head")
    covers([s.inter for s in shards], cfg.intermediate, "intermediate")
    covers([s.vocab for s in shards], cfg.vocab, "vocab")
    if cfg.is_moe:  # every (expert, column) on exactly one rank: a grid of expert ranges x column ranges
        def overlap(a: range, b: range) -> bool:
            return a.start < b.stop and b.start < a.stop

        area = sum(len(s.experts) * len(s.expert_ff) for s in shards)
        inside = all(0 <= s.experts.start < s.experts.stop <= cfg.n_experts
                     and 0 <= s.expert_ff.start < s.expert_ff.stop <= cfg.expert_ff for s in shards)
        clash = any(overlap(a.experts, b.experts) and overlap(a.expert_ff, b.expert_ff)
                    for i, a in enumerate(shards) for b in shards[i + 1:])
        if area != cfg.n_experts * cfg.expert_ff or not inside or clash:
            raise ShapeError(f"expert shards {[(s.experts, s.expert_ff) for s in shards]} do not cover "
                             f"{cfg.n_experts} experts x {cfg.expert_ff} columns exactly once")
    for s in shards:
        if s.q_rows.start % align or s.q_rows.stop % align:
            raise ShapeError(f"rank {s.rank}: wo columns {s.q_rows} are not {align}-aligned")
        if s.inter.start % align or s.inter.stop % align:
            raise ShapeError(f"rank {s.rank}: intermediate slice {s.inter} is not {align}-aligned")
        if s.vocab.start % align:
            raise ShapeError(f"rank {s.rank}: vocab slice {s.vocab} does not start on a multiple of {align}")
        if s.kv_heads != kv_heads_for(s.q_heads, cfg.group_size):
            raise ShapeError(f"rank {s.rank}: KV heads {s.kv_heads} do not match query heads {s.q_heads}")


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
