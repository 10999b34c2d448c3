"""Speculative decoding in the cost model: k drafted tokens verified as one step of k + 1 rows.

A step of r rows costs its ranks' compute, a little more per extra row (the weights are read once;
`row_cost` is the extra compute of a row as a fraction of a one-row step), the group's communication
for r rows (allreduce bytes and logits grow with r, round trips and per-message costs do not) and
the disk reads of streamed blocks once. With each draft kept with probability a (independently), a
step of k drafts yields E(k) = 1 + a + ... + a^k tokens. `--speculate auto` steps at k in 0, 1, 2,
4, 8 and only where the best k predicts GAIN_MARGIN times plain decoding's tokens/s (k = 0, plain
decoding, elsewhere: open-ended text, where prompt lookup rarely matches, always ends there);
`--speculate lookup` always drafts MAX_DRAFT. `SpeculationPlan` is what a plan assumes.
"""
from __future__ import annotations

from dataclasses import dataclass

from tpi.devices.costmodel import step_comm_s

ASSUMED_ACCEPTANCE = 0.7  # per draft: prompt lookup on prompt-grounded work (edits, code, summaries)
ROW_COST = 0.15  # extra compute per verified row, fraction of a one-row step (int4 decode is memory-bound)
MAX_DRAFT = 8  # drafted tokens per step at most (tpi.master.speculation; --speculate lookup drafts this many)
AUTO_STEPS = (0, 1, 2, 4, 8)  # the k auto steps at, so step shapes' graphs stay built (tpi.master.speculation)
GAIN_MARGIN = 1.1  # auto speculates only for >= 1.1x plain tokens/s (tpi.master.speculation.GAIN_MARGIN)
PLAN_MODES = ("auto", "lookup", "off")  # tpi plan --speculate


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


def estimate(plan, acceptance: float, row_cost: float = ROW_COST, ks: tuple[int, ...] = AUTO_STEPS,
             margin: float = GAIN_MARGIN) -> SpeculationEstimate:
    """The k among `ks` `--speculate auto` would step at for this plan and acceptance, with its
    predicted step and per-token times (k = 0 unless some k gains `margin`; ks without 0: fixed k)."""
    plain = SpeculationEstimate(acceptance, 0, 1.0, step_s(plan, 1, row_cost))
    best = None
    for k in ks:
        e = plain if k == 0 else SpeculationEstimate(acceptance, k, expected_tokens(acceptance, k),
                                                     step_s(plan, k + 1, row_cost))
        if best is None or e.token_s < best.token_s:
            best = e
    if 0 in ks and best.token_s * margin > plain.token_s:
        return plain  # a gain within the policy's margin: auto does not speculate
    return best


@dataclass(frozen=True)
class SpeculationPlan:
    """What a plan assumes about speculative decoding: the mode (tpi run/serve --speculate) and the
    share of drafts kept on prompt-grounded work, assumed or given (measured: `tpi run --stats`)."""

    mode: str = "auto"  # auto | lookup | off
    acceptance: float = ASSUMED_ACCEPTANCE
    given: bool = False  # the acceptance came from the user (--acceptance), not the default assumption

    def __post_init__(self) -> None:
        assert self.mode in PLAN_MODES and 0.0 <= self.acceptance < 1.0

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def estimate(self, plan, acceptance: float | None = None) -> SpeculationEstimate:
        """The step this mode would take on prompt-grounded work (plain decoding when off)."""
        a = self.acceptance if acceptance is None else acceptance
        if not self.on:
            return SpeculationEstimate(a, 0, 1.0, step_s(plan, 1))
        return estimate(plan, a, ks=(MAX_DRAFT,) if self.mode == "lookup" else AUTO_STEPS)

    def decode_s(self, plan) -> float:
        """The planner's objective: predicted seconds per decoded token under this assumption."""
        return self.estimate(plan).token_s if self.on else plan.prediction.token_latency_s

    def words(self) -> str:
        """The assumption in plain words, for the plan's reader."""
        if not self.on:
            return "planned for plain decoding (--speculate off): one token per step"
        source = ("as given (--acceptance)" if self.given
                  else "assumed, not measured (pass --acceptance with spec_acceptance_per_draft from `tpi run --stats`)")
        k = (f"k = {MAX_DRAFT} drafts per step (--speculate lookup)" if self.mode == "lookup"
             else f"k in {', '.join(map(str, AUTO_STEPS[1:]))} where it gains >= {GAIN_MARGIN - 1:.0%} "
                  "(--speculate auto)")
        return (f"planned for speculative decoding by prompt lookup, {k}; on prompt-grounded tasks (edits, "
                f"code, summaries, questions about a given text) {self.acceptance:.0%} of drafts kept, {source}; "
                "on open-ended tasks (stories, chat) lookup rarely matches and auto turns itself off: "
                "the plain figure")


def assumptions(row_cost: float = ROW_COST) -> str:
    """What the speculation rows assume, for the plan's reader."""
    return (f"assumed: each draft kept independently with the given probability; an extra verified row costs "
            f"{row_cost:.0%} of a one-row step's compute; all k+1 rows' logits are gathered; drafting "
            "(prompt lookup) costs nothing; measured acceptance: `tpi run --stats` (spec_acceptance_per_draft)")
