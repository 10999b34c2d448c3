"""Speculation inside continuous batching (issues 17 and 18): one step carries many sequences' rows,
and a decoding sequence's run may be its last token plus k drafted tokens, verified in that step.

Per slot: a PromptLookup over that slot's history drafts, a KPolicy keeps that slot's measured
acceptance (and its probes), and `verify` (tpi.master.acceptance) keeps drafts with the same rule and
the same token_rng(seed, position) per position as the lone path, so greedy and seeded-sampled
output is plain decoding's. Rejected positions are rolled back for that slot only.

k (`--speculate auto`): a batched step's cost is shared by the slots it decodes, so slot i's drafts
pay when the tokens they add per extra second beat the step's own rate: E_i(k) / (t/n + k c) against
n / t, t the measured seconds of a plain decode step of n slots and c the measured extra seconds per
drafted row (steps that also read a prompt are no sample). That is KPolicy's rule with t1 = t/n. On
one CPU device an extra row costs about a row's share of a step, so auto mostly stays at k = 0; in a
group a step's round trips dominate, rows are nearly free, and it drafts. While no slot drafts, the
batch (not each slot) probes with one draft every 16 steps, doubling up to 256, to re-measure c:
each probe is an exact step of a new shape, so per-slot probes would cost n times as much.

Exactness: a step carrying drafts is exact (Rows.exact): its verify runs and decode rows are computed
as one-row decode steps, bit for bit (tpi.model.ggml_exact), so a verified row is the row plain
decoding computes; its prompt chunks stay batched prefill rows (Rows.exact_runs), which equal a lone
run's prefill on Q4_0-class weights and are near-ties elsewhere, as in plain batching (tests/test_rows.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tpi.errors import TpiError
from tpi.master.acceptance import verify
from tpi.master.drafters import PromptLookup
from tpi.master.sampler import token_rng
from tpi.master.speculation import (MAX_PROBE_EVERY, PRIOR_ROW_COST, PROBE_EVERY, KPolicy, SpeculationStats,
                                    Speculator, StepCosts)


@dataclass
class SlotSpeculation:
    """One running sequence's drafter, acceptance and counts."""

    lookup: PromptLookup
    policy: KPolicy
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    shadow: tuple[int, int] | None = None  # (position, guessed token) of a lookup guess not verified
    drafts: list[int] = field(default_factory=list)  # this step's drafts
    draft_s: float = 0.0


class BatchSpeculation:
    """Drafts for a batched step's decoding slots, and their verdicts after it (one thread calls it)."""

    def __init__(self, speculator: Speculator):
        if not speculator.cheap_drafts:
            raise TpiError("a draft model (--draft) runs one sequence's draft KV cache; serve it with --parallel 1")
        self.speculator = speculator
        self.costs = StepCosts()
        self.slots: dict[int, SlotSpeculation] = {}
        self.streak, self.probe_every = 0, PROBE_EVERY  # plain steps since a slot drafted; steps between probes

    def slot(self, index: int) -> SlotSpeculation:
        if index not in self.slots:
            p = self.speculator.policy
            self.slots[index] = SlotSpeculation(PromptLookup(), KPolicy(p.max_k, p.adaptive, probes=False))
        return self.slots[index]

    def leave(self, index: int) -> dict:
        """A sequence left its slot: its counts, as Generation.speculation holds them."""
        s = self.slots.pop(index, None)
        return s.stats.as_dict() if s is not None else {}

    def plan(self, decoding: Sequence[tuple[int, list[int], int]], context: int) -> dict[int, list[int]]:
        """Drafts per slot for this step: decoding holds (slot, history, tokens it may still take)."""
        n = len(decoding)
        t = self.costs.plain(n)
        share = None if t is None else t / n
        row_s = self.costs.row_s
        if row_s is None and share is not None:
            row_s = PRIOR_ROW_COST * share
        chosen, proposed = {}, {}
        for index, history, budget in decoding:
            s = self.slot(index)
            self._score_shadow(s, history)
            room = min(budget - 1, context - len(history), s.policy.max_k)
            proposed[index] = draft = s.lookup.propose(history, room)
            chosen[index] = s.policy.choose(len(draft.tokens), share, row_s)
        self._probe(chosen, proposed, share)
        for index, history, _ in decoding:
            s, draft, k = self.slots[index], proposed[index], chosen[index]
            s.drafts, s.draft_s = list(draft.tokens[:k]), draft.seconds
            if not k and draft.tokens:
                s.shadow = (len(history), draft.tokens[0])
        return {index: self.slots[index].drafts for index, _, _ in decoding}

    def _probe(self, chosen: dict[int, int], proposed: dict, share: float | None) -> None:
        """One k = 1 step for the whole batch now and then while no slot speculates (KPolicy's probes, but
        once per batch, not per slot: the costs are the batch's; each probe is an exact step of a new shape)."""
        if not self.speculator.policy.adaptive or any(chosen.values()):
            self.streak, self.probe_every = 0, PROBE_EVERY
            return
        self.streak += 1
        ready = [i for i in chosen if proposed[i].tokens]
        if share is None or not ready or self.streak < self.probe_every:
            return
        chosen[max(ready, key=lambda i: self.slots[i].policy.acceptance)] = 1
        self.streak, self.probe_every = 0, min(MAX_PROBE_EVERY, 2 * self.probe_every)

    def decided(self, index: int, rows: np.ndarray, history: Sequence[int], params, seed: int) -> list[int]:
        """The tokens after slot's history from its run's logits rows (1 + its drafts), counted."""
        s = self.slots[index]
        n, drafts = len(history), s.drafts
        verdict = verify(rows, drafts, params, history, lambda j: token_rng(seed, n + j))
        now = SpeculationStats(forwards=1, verify_forwards=int(bool(drafts)), drafted=len(drafts),
                               accepted=verdict.accepted, tokens=len(verdict.tokens),
                               rejections=int(verdict.accepted < len(drafts)))
        if drafts:
            s.policy.record_verify(len(drafts), verdict.accepted, 0.0, s.draft_s)
            self.speculator.policy.record_acceptance(len(drafts), verdict.accepted)  # /health's estimate
        else:
            s.policy.record_plain(None)
        s.stats.add(now)
        self.speculator.totals.add(now)
        s.drafts = []
        return list(verdict.tokens)

    def record_step(self, n: int, extra: int, seconds: float) -> None:
        """A decode-only step of n slots and `extra` drafted rows took `seconds`."""
        self.costs.record(n, extra, seconds)

    def _score_shadow(self, s: SlotSpeculation, history: Sequence[int]) -> None:
        if s.shadow is not None:
            pos, guess = s.shadow
            if pos < len(history):
                s.policy.record_shadow(history[pos] == guess)
                self.speculator.policy.record_shadow(history[pos] == guess)
            s.shadow = None
