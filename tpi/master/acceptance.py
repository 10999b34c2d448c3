"""Which drafted tokens the target model keeps: the acceptance rule of speculative decoding.

A verify pass gives the target's logits after the history and after each drafted prefix:
rows[j] predicts the token at position n + j (n = len(history)) given drafts[:j]. The sampler's own
distribution (repeat penalty over the history so far, temperature, top-k, top-p, min-p:
`tpi.master.sampler.distribution`) is computed for every row with exactly the history plain
decoding would have had there, so the rule keeps whatever distribution the sampler defines.

Deterministic drafts (prompt lookup, or a greedy draft model): the draft distribution q is a point
mass on the drafted token x, so the standard rule accepts x with probability min(1, p(x) / 1) =
p(x) and otherwise samples from the normalised (p - q)+ = p without x. Sampling the row plainly
with the position's own generator and accepting when the sample equals x realises exactly that rule
(the sample is x with probability p(x); when it is not, it is distributed as p given "not x"), and
the tokens are then the ones plain decoding draws with the same seed, token for token. Greedy is
the special case where the sample is the argmax.

Sampled drafts (a draft model at temperature > 0, q its own distribution under the same sampler
settings): accept x with probability min(1, p(x) / q(x)), else sample from the normalised
(p - q)+ (Leviathan et al. 2023, Chen et al. 2023), so every token still follows p.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tpi.master.sampler import SamplingParams, distribution, sample

Dist = tuple[np.ndarray, np.ndarray]  # (token ids, probabilities) as sampler.distribution returns them
RngAt = Callable[[int], np.random.Generator]  # offset j from the first verified position -> its generator


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verify pass: accepted drafts, then one token of the target's own."""

    tokens: tuple[int, ...]
    accepted: int  # drafts kept (len(tokens) - 1)


def verify(rows: np.ndarray, drafts: Sequence[int], params: SamplingParams, history: Sequence[int], rng_at: RngAt,
           draft_dists: Sequence[Dist] | None = None) -> Verdict:
    """Accept the longest prefix of drafts the rule keeps; rows: (len(drafts) + 1, vocab) target logits.

    draft_dists: the draft model's distribution at each drafted position when it sampled them;
    None when the drafts are deterministic (point masses).
    """
    assert rows.shape[0] == len(drafts) + 1, "one row per draft plus the bonus row"
    seen = list(history)
    for j, x in enumerate(drafts):
        if draft_dists is None or params.greedy:
            token = sample(rows[j], params, seen, rng_at(j))
            if token != x:
                return Verdict(tuple(drafts[:j]) + (token,), j)
        else:
            token = _speculative_sample(distribution(rows[j], params, seen), draft_dists[j], x, rng_at(j))
            if token is not None:
                return Verdict(tuple(drafts[:j]) + (token,), j)
        seen.append(x)
    return Verdict(tuple(drafts) + (sample(rows[-1], params, seen, rng_at(len(drafts))),), len(drafts))


def _prob(dist: Dist, token: int) -> float:
    ids, p = dist
    hit = np.flatnonzero(ids == token)
    return float(p[hit[0]]) if hit.size else 0.0


def _speculative_sample(p: Dist, q: Dist, x: int, rng: np.random.Generator) -> int | None:
    """None when the sampled draft x is kept (probability min(1, p(x)/q(x))), else a token from (p - q)+."""
    px, qx = _prob(p, x), _prob(q, x)
    if qx <= 0.0 or rng.random() * qx < px:  # a draft outside q cannot happen; keep the rule total anyway
        return None
    ids = np.union1d(p[0], q[0])
    residual = np.zeros(ids.size)
    residual[np.searchsorted(ids, p[0])] += p[1]
    residual[np.searchsorted(ids, q[0])] -= q[1]
    np.maximum(residual, 0.0, out=residual)
    total = residual.sum()
    if total <= 0.0:  # p == q up to rounding: the rule would have accepted
        return None
    return int(ids[rng.choice(ids.size, p=residual / total)])
