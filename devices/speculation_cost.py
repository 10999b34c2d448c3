"""Speculative decoding in the cost model: k drafted tokens verified as one step of k + 1 rows.

A step of r rows costs its ranks' compute, a little more per extra row (the weights are read once;
`row_cost` is the extra compute of a row as a fraction of a one-row step), the group's communication
for r rows (allreduce bytes and logits grow with r, round trips and per-message costs do not) and
the disk reads of streamed blocks once. With each draft kept with probability a (independently), a
step of k drafts yields E(k) = 1 + a + ... + a^k tokens; the best k minimises step(k + 1) / E(k),
and k = 0 is plain decoding (what `--speculate auto` falls back to where drafts do not pay).
"""
from __future__ import annotations

from dataclasses import dataclass

from tpi.devices.costmodel import step_comm_s

ASSUMED_ACCEPTANCE = 0.7  # per draft: prompt lookup on prompt-grounded work (edits, code, summaries)
ROW_COST = 0.15  # extra compute per verified row, fraction of a one-row step (int4 decode is memory-bound)
MAX_DRAFT = 8  # drafted tokens per step at most (tpi.master.speculation; --speculate lookup drafts this many)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step of k drafts yields when each draft is kept with probability `acceptance`."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class SpeculationEstimate:
    acceptance: float  # per draft, assumed or measured
    k: int  # drafts per step (0: plain decoding)
    tokens_per_step: float
    step_s: float

    @property
    def token_s(self) -> float:
        return self.step_s / self.tokens_per_step


def step_s(plan, rows: int, row_cost: float = ROW_COST) -> float:
    """Predicted seconds of one decode step of `rows` rows of one sequence (every row's logits)."""
    pred = plan.prediction
    links = [d.link for d in plan.devices]
    comm, _ = step_comm_s(plan.config, plan.shards, links, rows, pred.params, logit_rows=rows)
    return max(max(r.compute_s * (1.0 + row_cost * (rows - 1)) + comm, r.stream_s) for r in pred.ranks)


def estimate(plan, acceptance: float, row_cost: float = ROW_COST, max_draft: int = MAX_DRAFT) -> SpeculationEstimate:
    """The best k for this plan at this acceptance, and its predicted step and per-token times."""
    best = None
    for k in range(max_draft + 1):
        e = SpeculationEstimate(acceptance, k, expected_tokens(acceptance, k), step_s(plan, k + 1, row_cost))
        if best is None or e.token_s < best.token_s:
            best = e
    return best


def assumptions(row_cost: float = ROW_COST) -> str:
    """What the speculation rows assume, for the plan's reader."""
    return (f"assumed: each draft kept independently with the given probability; an extra verified row costs "
            f"{row_cost:.0%} of a one-row step's compute; all k+1 rows' logits are gathered; drafting "
            "(prompt lookup) costs nothing; measured acceptance: `tpi run --stats` (spec_acceptance)")
