"""Speculative decoding on the master: draft k tokens, verify k+1 positions in one forward of the group.

A group pays its round trips per forward, whatever the rows it carries, so a forward that checks k
drafted tokens and always yields at least one token of the target's own turns accepted drafts into
tokens for free. `Speculator.step` is one decode forward: plain (k = 0) or a verify pass. With several
sequences at once (`tpi serve --parallel N`) tpi.master.batch_spec drafts and verifies per slot
inside the batched steps, with a KPolicy per slot and this Speculator's counts.

k adapts (`--speculate auto`): `KPolicy` keeps the measured acceptance rate a (exponentially
weighted) and the measured cost of a step, t(r) = t1 + (r - 1) dt for r rows (medians of the last
few steps; the first step of a shape builds its graphs and is no sample), and picks the k in 0, 1,
2, 4, 8 with the most expected tokens per second, E(k) / (t1 + k dt + k d), E(k) = 1 + a + ... +
a^k (each draft kept with probability a; d = drafting cost per token), when that beats plain
decoding by GAIN_MARGIN. k = 0 is plain decoding: chosen whenever no k pays, e.g. on open-ended
text where lookups rarely match, or on one CPU device where an extra row costs nearly a whole
step. While it speculates nothing, prompt lookup is still consulted (it costs microseconds) and its
first guess scored against the token that came, so the rate stays measured; every PROBE_EVERY
plain steps (doubling while it does not pay, up to 256) one k = 1 step re-measures the costs.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tpi.devices.speculation_cost import MAX_DRAFT, expected_tokens  # the planner's model of the same steps
from tpi.errors import TpiError
from tpi.master.acceptance import verify
from tpi.master.drafters import DraftModel, PromptLookup, check_draft_path
from tpi.master.sampler import SamplingParams, sample, token_rng

MODES = ("auto", "off", "lookup")
PROBE_EVERY = 16  # plain steps between probes, at first
MAX_PROBE_EVERY = 256
PRIOR_ACCEPT = (0.5, 4.0)  # (rate, weight in trials) before anything is measured
DECAY = 0.95  # weight kept per new trial: the rate follows the last ~20 trials
PRIOR_ROW_COST = 0.25  # extra rows cost this fraction of a one-row forward each until measured
COST_SAMPLES = 9  # step times kept: their median is the estimate
GAIN_MARGIN = 1.1  # speculate only where it predicts at least this many times plain decoding's tokens/s


@dataclass(frozen=True)
class SpeculationOptions:
    mode: str = "auto"  # auto: adaptive k; lookup: prompt lookup at k = max_draft; off: plain decoding
    draft: str | None = None  # path of a draft model (auto only); None: prompt lookup
    max_draft: int = MAX_DRAFT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TpiError(f"--speculate {self.mode!r} is not a mode; use one of {', '.join(MODES)}")
        if self.draft is not None and self.mode != "auto":
            raise TpiError(f"--draft needs --speculate auto (it is {self.mode}): a draft model's k adapts "
                           "to its acceptance; drop --draft for prompt lookup")
        if self.draft is not None:
            check_draft_path(self.draft)
        if not 1 <= self.max_draft <= 64:
            raise TpiError(f"{self.max_draft} drafted tokens per step is out of range: use 1 to 64")


def best_k(accept: float, t1: float, row_s: float, draft_s: float, max_k: int) -> int:
    """The k in 0..max_k with the most expected tokens per second (0: do not speculate)."""
    rates = [expected_tokens(accept, k) / (t1 + k * (row_s + draft_s)) for k in range(max_k + 1)]
    return int(np.argmax(rates))


def _step_size(k: int) -> int:
    """k rounded down to 0, 1, 2, 4 or 8: few step shapes, so their graphs stay built (tpi.model.layers_ggml)."""
    return 1 << (k.bit_length() - 1) if k > 0 else 0


class StepCosts:
    """Seconds of decode steps: plain ones per number of sequences n, and the extra seconds per drafted
    row of verify steps (medians of the recent ones: a slow outlier moves no median). The first step of
    each shape (n, extra rows) built its graphs and is no sample."""

    def __init__(self):
        self._plain: dict[int, deque[float]] = {}
        self._rows: deque[float] = deque(maxlen=COST_SAMPLES)
        self._timed: set[tuple[int, int]] = set()

    def plain(self, n: int = 1) -> float | None:
        """Median seconds of a plain decode step of n sequences (None: not measured)."""
        d = self._plain.get(n)
        return float(np.median(d)) if d else None

    @property
    def row_s(self) -> float | None:
        return float(np.median(self._rows)) if self._rows else None

    def record(self, n: int, extra: int, seconds: float) -> None:
        """A decode step of n sequences carrying `extra` drafted rows in all (0: a plain step)."""
        if (n, extra) not in self._timed:
            self._timed.add((n, extra))
            return
        if not extra:
            self._plain.setdefault(n, deque(maxlen=COST_SAMPLES)).append(seconds)
        elif (t := self.plain(n)) is not None:
            self._rows.append(max(0.0, seconds - t) / extra)


class KPolicy:
    """Measured acceptance and forward costs -> the next k (fixed at max_k when not adaptive)."""

    def __init__(self, max_k: int, adaptive: bool = True, probes: bool = True):
        self.max_k, self.adaptive = max_k, adaptive
        self.probes = probes  # off: the caller probes (a batch probes once for all its slots)
        self.hits, self.trials = PRIOR_ACCEPT[0] * PRIOR_ACCEPT[1], PRIOR_ACCEPT[1]
        self.costs = StepCosts()  # this policy's own one-sequence steps (a batch measures its own)
        self.draft_s = 0.0
        self.plain_streak = 0
        self.probe_every = PROBE_EVERY  # doubles after each probe that does not bring speculation back

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    def _trial(self, hits: int, trials: int) -> None:
        keep = DECAY ** trials
        self.hits = self.hits * keep + hits
        self.trials = self.trials * keep + trials

    def choose(self, available: int, t1: float | None = None, row_s: float | None = None) -> int:
        """k for the next forward when up to `available` drafts can be had. t1, row_s: a batched step's
        costs (tpi.master.batch_spec: the step's share per slot, the extra seconds per row) instead of
        this policy's own measurements."""
        if available <= 0:
            return 0
        if not self.adaptive:
            return _step_size(min(self.max_k, available))
        if t1 is None:
            t1, row_s = self.t1, self.row_s
        if t1 is None:
            return 0  # measure a plain forward first
        row_s = PRIOR_ROW_COST * t1 if row_s is None else row_s
        k = best_k(self.acceptance, t1, row_s, self.draft_s, min(self.max_k, available))
        if k > 0 and expected_tokens(self.acceptance, k) / (t1 + k * (row_s + self.draft_s)) < GAIN_MARGIN / t1:
            k = 0  # a predicted gain within the noise of the measurements is no gain
        if k > 0:
            self.probe_every = PROBE_EVERY
        elif self.probes and self.plain_streak >= self.probe_every:
            k = 1  # costs re-measured now and then: one slow step must not keep speculation off for good
            self.probe_every = min(MAX_PROBE_EVERY, 2 * self.probe_every)
        return _step_size(k)

    @property
    def t1(self) -> float | None:
        """Seconds of a plain step: the median of the recent ones."""
        return self.costs.plain()

    @property
    def row_s(self) -> float | None:
        return self.costs.row_s

    def record_plain(self, seconds: float | None) -> None:
        """A plain step (None: untimed, a batched step's cost is measured by the batch)."""
        self.plain_streak += 1
        if seconds is not None:
            self.costs.record(1, 0, seconds)

    def record_verify(self, k: int, accepted: int, seconds: float, draft_seconds: float) -> None:
        """A verify pass of k drafts kept `accepted` of them (a rejection ends the trials)."""
        self.record_acceptance(k, accepted)
        self.plain_streak = 0
        self.draft_s = 0.8 * self.draft_s + 0.2 * draft_seconds / k
        if self.t1 is not None:  # an unmeasured plain step leaves the shape untimed, to be sampled later
            self.costs.record(1, k, seconds)

    def record_acceptance(self, k: int, accepted: int) -> None:
        """The acceptance trials of a verify pass alone (a batch's overall rate, tpi.master.batch_spec)."""
        self._trial(accepted, accepted + (accepted < k))

    def record_shadow(self, hit: bool) -> None:
        """A draft that was not verified, scored against the token that came instead."""
        self._trial(int(hit), 1)


@dataclass
class SpeculationStats:
    """Counts over decode forwards (one request, or everything since start)."""

    forwards: int = 0  # decode forwards, plain or verify
    verify_forwards: int = 0
    drafted: int = 0  # drafts verified
    accepted: int = 0
    rejections: int = 0  # verify forwards that rejected a draft (the drafts after it were not judged)
    tokens: int = 0  # tokens the decode forwards yielded

    def add(self, other: "SpeculationStats") -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {"spec_forwards": self.forwards, "spec_verify_forwards": self.verify_forwards,
                "spec_drafted": self.drafted, "spec_accepted": self.accepted,
                "spec_acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                # the chance a draft is kept once those before it were: the rate `tpi plan --acceptance` takes
                # (spec_acceptance counts the drafts after a rejection as lost, so it reads lower)
                "spec_acceptance_per_draft": (self.accepted / (self.accepted + self.rejections)
                                              if self.accepted + self.rejections else 0.0),
                "tokens_per_forward": self.tokens / self.forwards if self.forwards else 0.0}


@dataclass
class Speculator:
    """One decode forward at a time: plain, or drafts verified in one pass."""

    drafter: object  # tpi.master.drafters.PromptLookup / DraftModel
    policy: KPolicy
    mode: str = "auto"
    totals: SpeculationStats = field(default_factory=SpeculationStats)
    _shadow: tuple[int, int] | None = None  # (position, guessed token) of an unverified lookup guess

    @classmethod
    def from_options(cls, opts: SpeculationOptions, drafter) -> "Speculator | None":
        if opts.mode == "off":
            return None
        return cls(drafter, KPolicy(opts.max_draft, adaptive=opts.mode == "auto"), opts.mode)

    @property
    def cheap_drafts(self) -> bool:
        return getattr(self.drafter, "name", "") == "lookup"

    def new_stats(self) -> SpeculationStats:
        """The counts of one request (added to totals as it goes)."""
        return SpeculationStats()

    def status(self) -> dict:
        """For /health and --stats: mode, drafter, measured acceptance and tokens per forward."""
        return {"mode": self.mode, "drafter": getattr(self.drafter, "label", getattr(self.drafter, "name", "?")),
                "acceptance_estimate": round(self.policy.acceptance, 4), **self.totals.as_dict()}

    def step(self, engine, history: Sequence[int], params: SamplingParams, seed: int, budget: int,
             stats: SpeculationStats) -> list[int]:
        """Forward history[-1] (and drafts after it); returns the 1..budget tokens that follow the history."""
        n = len(history)  # position of the first new token; history[-1] sits at n - 1, not yet cached
        room = min(budget - 1, engine.context - n)
        self._score_shadow(history)
        draft = None
        if self.cheap_drafts:
            draft = self.drafter.propose(history, min(room, self.policy.max_k))
            k = self.policy.choose(len(draft.tokens))
        else:
            k = self.policy.choose(room)
            if k > 0:
                draft = self.drafter.propose(history, k, params, lambda j: token_rng(seed, n + j, 1))
                k = len(draft.tokens)
        stats_now = SpeculationStats(forwards=1, verify_forwards=int(k > 0))
        t0 = time.perf_counter()
        if k == 0:
            logits = engine.forward([history[-1]], n - 1)[-1]
            self.policy.record_plain(time.perf_counter() - t0)
            tokens = [sample(logits, params, history, token_rng(seed, n))]
            if draft is not None and draft.tokens:
                self._shadow = (n, draft.tokens[0])
        else:
            drafts = list(draft.tokens[:k])
            rows = engine.forward([history[-1]] + drafts, n - 1, all_positions=True, exact=True)
            seconds = time.perf_counter() - t0
            dists = None if draft.dists is None else draft.dists[:k]
            verdict = verify(rows, drafts, params, history, lambda j: token_rng(seed, n + j), dists)
            if verdict.accepted < k:  # rejected drafts' keys/values: dropped on every rank, overwritten next
                engine.truncate(n + verdict.accepted)
            self.policy.record_verify(k, verdict.accepted, seconds, draft.seconds)
            stats_now.drafted, stats_now.accepted = k, verdict.accepted
            stats_now.rejections = int(verdict.accepted < k)
            tokens = list(verdict.tokens)
        stats_now.tokens = len(tokens)
        stats.add(stats_now)
        self.totals.add(stats_now)
        return tokens

    def _score_shadow(self, history: Sequence[int]) -> None:
        if self._shadow is not None:
            pos, guess = self._shadow
            if pos < len(history):
                self.policy.record_shadow(history[pos] == guess)
            self._shadow = None

    def close(self) -> None:
        self.drafter.close()


def build_speculator(opts: SpeculationOptions, engine, threads: int | None = None, backend: str = "auto"):
    """The Speculator for these options on this engine (None when off); loads a draft model if named."""
    if opts.mode == "off":
        return None
    drafter = (DraftModel.open(opts.draft, engine.tokenizer, engine.context, threads, backend)
               if opts.draft else PromptLookup())
    return Speculator.from_options(opts, drafter)
