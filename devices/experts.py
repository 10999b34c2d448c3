"""Pure maths of spreading a mixture of experts over a group: placements, per-token load, the choice.

Two placements (tpi.model.moe), both 1/N of the expert bytes per rank and one allreduce per layer:
- "split" (A): every rank holds every expert at a slice of its ff columns; each token runs all k
  chosen experts on every rank at 1/N width: balanced, but the down_exps column cut must fall on its
  K block (256 for K-quants) or be re-quantized to Q8_0 (more bytes), and 768 = 3 x 256 splits 2 ways
  only as 512 / 256.
- "whole" (B): rank r holds a contiguous range of whole experts; a token's k chosen experts land
  where they live, so the busiest rank does more than k/N of them (uniform routing, 128 experts top 8:
  1.26x / 1.51x / 1.74x the balanced work for N = 2 / 3 / 4). Whole experts stream as one read each,
  and a cache keeps the hot ones: the placement to take when experts do not fit in memory.
The choice compares the predicted critical path of one MoE layer (`moe_layer_s`) per placement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from tpi.devices.slicing import QUANT_GROUP, split_aligned
from tpi.errors import ShapeError
from tpi.model.config import ModelConfig

SPLIT, WHOLE = "split", "whole"  # tpi.model.moe.PLACEMENTS (kept import-light: pure maths)
EXACT_LIMIT = 20_000  # compositions of k chosen experts over N ranks enumerated exactly up to this many
SAMPLES = 4_000  # otherwise routings drawn (fixed seed: the plan is deterministic)
# The split path of placement B (a router graph, Python picks the local experts, an expert graph):
# one more graph launch and a few numpy touches per MoE layer (bench/moe.py measures it).
SPLIT_PATH_S = 60e-6
Q8_0_BYTES = 34 / 32
# Split experts only when they predict a MoE layer at least 10% shorter than whole ones. Calibrated in
# place (bench/moe.py, 4B synthetic, 2 ranks of 1 thread, 3 rounds): split predicted 7% shorter
# (0.612 vs 0.655 ms: its Q6_K down cut 512 / 256) but decoded 9% slower (13.7 vs 14.2 tok/s);
# the bytes model misses split's extra cost (every rank runs every chosen expert: k small matmuls).
SPLIT_WIN = 0.9
Q4_K_BYTES, Q6_K_BYTES = 144 / 256, 210 / 256  # Q4_K_M: gate / up Q4_K, down Q6_K (most layers)
# A device of mean speed reads decode weights at this rate when the plan has no profiles (dual-channel
# DDR4 class); only the two placements' ratio depends on it, against the fixed split-path cost.
NOMINAL_BYTES_S = 20e9


@dataclass(frozen=True)
class ExpertCuts:
    """Every rank's experts and their columns under one placement."""

    placement: str
    experts: tuple[range, ...]
    ff: tuple[range, ...]
    down_align: int  # down_exps column boundaries are multiples of this
    requantized: bool  # down_exps cut off its block: re-quantized to Q8_0 at the cut


def split_experts(cfg: ModelConfig, ratios: Sequence[float], placement: str, down_block: int = QUANT_GROUP) -> ExpertCuts:
    """The experts x columns of each rank for `placement` ("split" or "whole")."""
    n = len(ratios)
    full_e, full_ff = range(cfg.n_experts), range(cfg.expert_ff)
    if placement == WHOLE:
        if cfg.n_experts < n:
            raise ShapeError(f"{n} devices but {cfg.name} has only {cfg.n_experts} experts per layer; "
                             "use at most that many devices or split every expert (--experts split)")
        return ExpertCuts(WHOLE, split_aligned(cfg.n_experts, ratios, 1), (full_ff,) * n, down_block, False)
    if placement != SPLIT:
        raise ShapeError(f"unknown expert placement '{placement}'; use split or whole")
    align = max(QUANT_GROUP, down_block)
    try:
        ff = split_aligned(cfg.expert_ff, ratios, align)
        requantized = False
    except ShapeError:
        if align == QUANT_GROUP:
            raise
        ff, align, requantized = split_aligned(cfg.expert_ff, ratios, QUANT_GROUP), QUANT_GROUP, True
    return ExpertCuts(SPLIT, (full_e,) * n, ff, align, requantized and n > 1)


@lru_cache(maxsize=256)
def chosen_spread(n_experts: int, k: int, counts: tuple[int, ...]) -> tuple[tuple[float, tuple[int, ...]], ...]:
    """(probability, chosen experts per rank) over uniform routings of k distinct experts, ranks
    holding `counts` experts each: a multivariate hypergeometric, exact where small, else sampled."""
    assert sum(counts) == n_experts and 1 <= k <= n_experts
    if math.comb(k + len(counts) - 1, len(counts) - 1) <= EXACT_LIMIT:
        total = math.comb(n_experts, k)
        out = []

        def walk(r: int, left: int, xs: tuple[int, ...], ways: int) -> None:
            if r == len(counts) - 1:
                if left <= counts[r]:
                    out.append((ways * math.comb(counts[r], left) / total, xs + (left,)))
                return
            for x in range(min(left, counts[r]) + 1):
                walk(r + 1, left - x, xs + (x,), ways * math.comb(counts[r], x))

        walk(0, k, (), 1)
        return tuple(out)
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(len(counts)), counts)
    draws = [np.bincount(owner[rng.choice(n_experts, k, replace=False)], minlength=len(counts)) for _ in range(SAMPLES)]
    return tuple((1.0 / SAMPLES, tuple(int(v) for v in d)) for d in draws)


def expected_busiest(n_experts: int, k: int, counts: Sequence[int], per_expert_s: Sequence[float]) -> float:
    """E[max over ranks of (chosen experts there x that rank's seconds per expert)] for one token."""
    return sum(p * max(x * s for x, s in zip(xs, per_expert_s)) for p, xs in chosen_spread(n_experts, k, tuple(counts)))


def imbalance(n_experts: int, k: int, n_ranks: int) -> float:
    """The busiest rank's expected share of a token's experts over the balanced k / N (equal ranks)."""
    counts = tuple(len(r) for r in split_aligned(n_experts, [1.0 / n_ranks] * n_ranks, 1))
    return expected_busiest(n_experts, k, counts, [1.0] * n_ranks) / (k / n_ranks)


def expert_bytes(cfg: ModelConfig, gate_up_bpw: float, down_bpw: float, ff: int | None = None) -> float:
    """Bytes of one expert (gate + up + down) at `ff` of its columns."""
    ff = cfg.expert_ff if ff is None else ff
    return cfg.hidden * ff * (2 * gate_up_bpw + down_bpw)


def moe_layer_s(cfg: ModelConfig, cuts: ExpertCuts, seconds_per_byte: Sequence[float], gate_up_bpw: float,
                down_bpw: float) -> float:
    """Predicted critical path of one decode MoE layer: the busiest rank's chosen experts' bytes over
    its speed (decode matmuls are bound by the weight bytes they read), plus B's split-path cost."""
    k = cfg.n_experts_used
    if cuts.placement == SPLIT:
        down = Q8_0_BYTES if cuts.requantized else down_bpw
        return max(k * expert_bytes(cfg, gate_up_bpw, down, len(f)) * s for f, s in zip(cuts.ff, seconds_per_byte))
    per_expert = [expert_bytes(cfg, gate_up_bpw, down_bpw) * s for s in seconds_per_byte]
    busiest = expected_busiest(cfg.n_experts, k, [len(e) for e in cuts.experts], per_expert)
    return busiest + (SPLIT_PATH_S if len(cuts.experts) > 1 else 0.0)


def choose_placement(cfg: ModelConfig, ratios: Sequence[float], seconds_per_byte: Sequence[float],
                     gate_up_bpw: float, down_bpw: float, down_block: int = QUANT_GROUP,
                     streaming: bool = False) -> tuple[ExpertCuts, str]:
    """The placement with the shorter predicted MoE layer, and why. Experts that must stream go whole:
    a streamed split expert is a slice of every chosen expert read on every rank, and no rank can keep
    whole hot experts."""
    options = {}
    for placement in (SPLIT, WHOLE):
        try:
            cuts = split_experts(cfg, ratios, placement, down_block)
        except ShapeError:
            continue
        options[placement] = (cuts, moe_layer_s(cfg, cuts, seconds_per_byte, gate_up_bpw, down_bpw))
    if not options:
        raise ShapeError(f"{cfg.name}'s experts cannot be spread over {len(ratios)} devices")
    if len(ratios) == 1:
        return options[SPLIT][0], "one device: every expert whole on it"
    ms = {p: t * 1e3 for p, (_, t) in options.items()}
    text = ", ".join(f"{p} {t:.3f} ms" for p, t in ms.items())
    if streaming and WHOLE in options:
        return options[WHOLE][0], f"experts whole per rank: they stream from disk, whole experts cache best ({text} per MoE layer)"
    best = min(options, key=lambda p: options[p][1])
    if best == SPLIT and WHOLE in options and options[SPLIT][1] > SPLIT_WIN * options[WHOLE][1]:
        # within the margin the bytes model misses (bench/moe.py: whole measured faster there)
        return options[WHOLE][0], (f"whole experts per rank: split predicts a MoE layer less than "
                                   f"{1 - SPLIT_WIN:.0%} shorter ({text}), within what its extra matmuls cost")
    cuts = options[best][0]
    why = "every expert split across ranks" if best == SPLIT else "whole experts per rank"
    extra = "; down_exps re-quantized to Q8_0 at the cut" if cuts.requantized else ""
    return cuts, f"{why}: predicts the shorter MoE layer ({text}){extra}"


def place_experts(cfg: ModelConfig, ratios: Sequence[float], placement: str | None = None,
                  down_block: int = QUANT_GROUP, streaming: bool = False) -> tuple[ExpertCuts, str]:
    """(cuts, why): `placement` as asked (--experts), else the cost model's choice for ranks as fast
    as their ratios, at Q4_K_M's bytes per weight (the choice compares the two at the same bytes)."""
    if placement is not None:
        cuts = split_experts(cfg, ratios, placement, down_block)
        return cuts, f"{'every expert split across ranks' if placement == SPLIT else 'whole experts per rank'}: asked for (--experts {placement})"
    n = len(ratios)
    seconds_per_byte = [1.0 / (r * n * NOMINAL_BYTES_S) for r in ratios]  # faster devices got larger ratios
    return choose_placement(cfg, ratios, seconds_per_byte, Q4_K_BYTES, Q6_K_BYTES, down_block, streaming)


def active_experts(cfg: ModelConfig, shard) -> float:
    """Experts (at this rank's columns) a decode token runs on `shard`: all k when every expert is here
    (one device, split); whole experts: the busiest rank's expected count, as for ranks holding as
    many experts as this one (the critical path the cost model predicts)."""
    k, n_local = cfg.n_experts_used, len(shard.experts)
    if n_local >= cfg.n_experts:
        return float(k)
    ranks = max(1, round(cfg.n_experts / n_local))
    return min(float(k), k / ranks * imbalance(cfg.n_experts, k, ranks))
