"""Window plan: which blocks stay pinned in memory and how many streamed blocks are resident.

Pure maths over block sizes and a memory budget; no I/O. The prefetcher (prefetch.py) runs a
plan; the planner and `tpi plan` show one before anything is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from tpi.errors import BudgetError

MiB = 1 << 20


def _mib(nbytes: int) -> str:
    """Human size: KiB below 1 MiB, GiB from 10 GiB up, MiB between."""
    if abs(nbytes) < MiB:
        return f"{nbytes / 1024:.1f} KiB"
    if abs(nbytes) >= 10 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / MiB:.1f} MiB"


@dataclass(frozen=True)
class BudgetBreakdown:
    """Where a device's memory budget goes, in bytes; `slack` is what is left unused."""

    budget: int
    pinned: int
    window: int
    kv_cache: int
    activations: int
    runtime_overhead: int

    @property
    def used(self) -> int:
        return self.pinned + self.window + self.kv_cache + self.activations + self.runtime_overhead

    @property
    def slack(self) -> int:
        return self.budget - self.used


@dataclass(frozen=True)
class WindowPlan:
    """Pinned blocks (loaded once), streamed blocks (cycled every token) and the window.

    `window` is the most streamed blocks resident at once, the one being computed included:
    1 means no overlap of I/O with compute, 2 lets the next block load while one computes.
    `window == 0` exactly when nothing is streamed.
    """

    order: tuple[str, ...]  # every block, in execution order
    pinned: tuple[str, ...]  # in execution order
    streamed: tuple[str, ...]  # in execution order; the prefetcher cycles through these
    window: int
    breakdown: BudgetBreakdown
    streamed_bytes_per_token: int

    @property
    def is_streaming(self) -> bool:
        return bool(self.streamed)

    def describe(self) -> str:
        """One-paragraph summary for stats output and `tpi plan`."""
        b = self.breakdown
        if not self.streamed:
            head = f"all {len(self.pinned)} blocks pinned ({_mib(b.pinned)})"
        else:
            head = (
                f"{len(self.pinned)}/{len(self.order)} blocks pinned ({_mib(b.pinned)}), "
                f"{len(self.streamed)} streamed with window {self.window} ({_mib(b.window)}), "
                f"{_mib(self.streamed_bytes_per_token)} read per token"
            )
        return (
            f"{head}; budget {_mib(b.budget)} = pinned {_mib(b.pinned)} + window {_mib(b.window)}"
            f" + KV cache {_mib(b.kv_cache)} + activations {_mib(b.activations)}"
            f" + runtime overhead {_mib(b.runtime_overhead)} + slack {_mib(b.slack)}"
        )


def window_bytes(streamed_sizes: Sequence[int], window: int) -> int:
    """Most bytes any `window` cyclically consecutive streamed blocks hold at once."""
    n = len(streamed_sizes)
    if n == 0 or window == 0:
        return 0
    assert 1 <= window <= n, "window must be between 1 and the number of streamed blocks"
    run = sum(streamed_sizes[:window])
    best = run
    for start in range(1, n):  # slide the run around the cycle (tokens wrap to block 0)
        run += streamed_sizes[(start + window - 1) % n] - streamed_sizes[start - 1]
        best = max(best, run)
    return best


def spread_order(n: int) -> list[int]:
    """Positions 0..n-1 ordered so that every prefix is spread evenly over the range.

    Uses the base-2 radical inverse (van der Corput) of each position: the first picks are
    0, n/2, n/4, 3n/4, ... so pinned blocks interleave with streamed ones.
    """

    def radical_inverse(i: int) -> float:
        inv, f = 0.0, 0.5
        while i:
            inv += f * (i & 1)
            i >>= 1
            f /= 2
        return inv

    if n == 0:
        return []
    # Walk a power-of-two grid in van der Corput order and map each point onto 0..n-1; the
    # map is onto because the grid is at least as fine as the positions.
    bits = max(1, (n - 1).bit_length())
    out: list[int] = []
    seen: set[int] = set()
    for k in sorted(range(1 << bits), key=radical_inverse):
        pos = (k * n) >> bits
        if pos not in seen:
            seen.add(pos)
            out.append(pos)
    assert len(out) == n
    return out


def plan_window(
    blocks: Sequence[tuple[str, int]],
    budget: int,
    *,
    kv_cache_bytes: int,
    activation_bytes: int,
    runtime_overhead_bytes: int,
    preferred_window: int = 2,
    always_pinned: Iterable[str] = (),
) -> WindowPlan:
    """Decide pinned vs streamed blocks and the window for a memory budget (all sizes in bytes).

    `blocks` are (key, nbytes) in execution order. Rules, in priority:
    1. Everything is pinned when it fits: no block is ever re-read.
    2. Otherwise the window is the largest w <= preferred_window for which streaming every
       block fits, so that prefetch can overlap (w=2) rather than merely run (w=1).
    3. Then blocks are pinned greedily, largest first (fewest bytes re-read per token; ties
       are broken by `spread_order`, so pinned blocks interleave with streamed ones and the
       loader has pinned compute to hide behind). A block is pinned only if the pinned bytes
       plus the window over the blocks still streamed stay within the budget.
    Raises BudgetError, before anything is loaded, when even streaming every block one at a
    time does not fit; the message gives the minimum feasible budget.
    """
    keys = [k for k, _ in blocks]
    sizes = [int(s) for _, s in blocks]
    assert len(set(keys)) == len(keys), "block keys must be unique"
    assert all(s >= 0 for s in sizes), "block sizes must be non-negative"
    assert preferred_window >= 1, "preferred_window must be at least 1"
    for name, v in (("kv_cache_bytes", kv_cache_bytes), ("activation_bytes", activation_bytes),
                    ("runtime_overhead_bytes", runtime_overhead_bytes)):
        assert v >= 0, f"{name} must be non-negative"
    forced = set(always_pinned)
    unknown = forced - set(keys)
    assert not unknown, f"always_pinned names unknown blocks: {sorted(unknown)}"

    fixed = kv_cache_bytes + activation_bytes + runtime_overhead_bytes
    forced_bytes = sum(s for k, s in blocks if k in forced)
    size_of = dict(blocks)

    def finish(pinned_set: set[str], window: int) -> WindowPlan:
        streamed = tuple(k for k in keys if k not in pinned_set)
        pinned = tuple(k for k in keys if k in pinned_set)
        wbytes = window_bytes([size_of[k] for k in streamed], window)
        breakdown = BudgetBreakdown(
            budget=budget, pinned=sum(size_of[k] for k in pinned), window=wbytes,
            kv_cache=kv_cache_bytes, activations=activation_bytes,
            runtime_overhead=runtime_overhead_bytes,
        )
        assert breakdown.slack >= 0
        return WindowPlan(
            order=tuple(keys), pinned=pinned, streamed=streamed, window=window,
            breakdown=breakdown, streamed_bytes_per_token=sum(size_of[k] for k in streamed),
        )

    if fixed + sum(sizes) <= budget:
        return finish(set(keys), 0)

    streamable = [k for k in keys if k not in forced]
    largest = max(streamable, key=lambda k: size_of[k]) if streamable else None
    minimum = fixed + forced_bytes + (size_of[largest] if largest else 0)
    if not streamable or minimum > budget:
        parts = [f"KV cache {_mib(kv_cache_bytes)}", f"activations {_mib(activation_bytes)}",
                 f"runtime overhead {_mib(runtime_overhead_bytes)}"]
        if forced_bytes:
            parts.append(f"always-pinned blocks {_mib(forced_bytes)}")
        if largest is not None:
            parts.append(f"largest block '{largest}' {_mib(size_of[largest])} streamed alone")
        raise BudgetError(
            f"memory budget {_mib(budget)} is too small: the minimum feasible budget is "
            f"{_mib(minimum)} ({minimum} bytes = {' + '.join(parts)}); raise --memory-budget "
            f"to at least {_mib(minimum)}, plan a shorter context, or give this device a "
            "smaller share of the model"
        )

    capacity = budget - fixed - forced_bytes  # for pinned (non-forced) blocks plus the window
    window = 1
    for w in range(min(preferred_window, len(streamable)), 0, -1):
        if window_bytes([size_of[k] for k in streamable], w) <= capacity:
            window = w
            break

    spread_rank = {streamable[p]: r for r, p in enumerate(spread_order(len(streamable)))}
    candidates = sorted(streamable, key=lambda k: (-size_of[k], spread_rank[k]))
    pinned_set = set(forced)
    pinned_bytes = 0
    for k in candidates:
        rest = [size_of[j] for j in streamable if j not in pinned_set and j != k]
        if not rest:
            break  # streaming was needed, so keep at least one block streamed
        w = min(window, len(rest))
        if pinned_bytes + size_of[k] + window_bytes(rest, w) <= capacity:
            pinned_set.add(k)
            pinned_bytes += size_of[k]
    still_streamed = len(streamable) - (len(pinned_set) - len(forced))
    return finish(pinned_set, min(window, still_streamed))
