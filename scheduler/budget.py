"""Memory budgets: what a rank's process must hold, estimated one way for the runtime and the cost model.

The budget is the whole process (DESIGN.md §5): pinned blocks + streaming window + KV cache +
transient buffers + runtime overhead. The estimators here are the ones both the window plan of a
running rank (tpi.model.weights.plan_memory) and the planner's cost model (tpi.devices.costmodel)
count with; `plan_budget` turns them into a WindowPlan, or a BudgetError naming the minimum.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from tpi.errors import BudgetError
from tpi.model.blocks import EMBED, GLOBALS
from tpi.model.config import PREFILL_CHUNK
from tpi.scheduler.window import WindowPlan, plan_window

MiB = 1 << 20


def kv_cache_bytes(cfg, n_kv_heads: int, context: int, itemsize: int = 4) -> int:
    """Keys and values of `n_kv_heads` KV heads over every layer and the whole context (fp32 by default)."""
    return 2 * cfg.n_layers * n_kv_heads * context * cfg.head_dim * itemsize


def activation_bytes(cfg, shard, context: int, chunk: int = PREFILL_CHUNK) -> int:
    """Upper estimate of one forward pass's transient memory on a rank: a prefill chunk of `chunk` tokens."""
    t = min(chunk, context)
    qkv = (shard.n_q_heads + 2 * shard.n_kv_heads) * cfg.head_dim
    per_token = cfg.hidden * 16 + qkv * 8 + len(shard.inter) * 12 + len(shard.vocab) * 4
    scores = t * context * shard.n_q_heads * 4  # attention probabilities if materialised
    return t * per_token + scores


def embed_nbytes(store) -> int:
    """Bytes of rank 0's embedding table in a store (0 elsewhere)."""
    if GLOBALS not in store.keys():
        return 0
    t = store.load(GLOBALS, copy=False).get(EMBED)
    return 0 if t is None else sum(a.nbytes for a in t.arrays.values())


def resident_block_sizes(store, embed_mapped: bool, resident_nbytes: Callable | None = None) -> list[tuple[str, int]]:
    """(key, resident bytes) per block of a store; a mapped embedding is not resident. With
    `resident_nbytes(qtensor)`, matrices count at the size the kernels hold, not as stored."""
    sizes = []
    for key, nbytes in store.block_sizes():
        if key == GLOBALS and embed_mapped:
            nbytes -= embed_nbytes(store)
        if resident_nbytes is not None:
            block = store.load(key, copy=False)
            nbytes += sum(resident_nbytes(t) - t.nbytes for name, t in block.items()
                          if name != EMBED and not isinstance(t, np.ndarray))
        sizes.append((key, nbytes))
    return sizes


def plan_budget(block_sizes: Sequence[tuple[str, int]], budget: int, *, kv_cache: int, activations: int,
                runtime_overhead: int, setup_rss: int = 0, always_pinned: Iterable[str] = ()) -> WindowPlan:
    """The WindowPlan under `budget` bytes; BudgetError (nothing loaded) if it cannot fit.

    `setup_rss` is what the process held while opening the model (the master's parsed model file,
    freed before the plan): the budget must cover that moment too.
    """
    always_pinned = list(always_pinned)

    def plan(for_budget: int) -> WindowPlan:
        return plan_window(block_sizes, for_budget, kv_cache_bytes=kv_cache, activation_bytes=activations,
                           runtime_overhead_bytes=runtime_overhead, always_pinned=always_pinned)

    if budget < setup_rss:
        try:
            plan(setup_rss)
        except BudgetError:  # serving needs more than setup did: refuse with that (larger) minimum
            return plan(budget)
        raise BudgetError(
            f"memory budget {budget / MiB:.1f} MiB is too small: the minimum feasible budget is "
            f"{setup_rss / MiB:.1f} MiB ({setup_rss} bytes = what this process held while opening the "
            f"model); raise --memory-budget to at least {setup_rss / MiB:.1f} MiB"
        )
    return plan(budget)
