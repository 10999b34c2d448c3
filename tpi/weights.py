"""A rank's weights: all resident, or pinned + streamed from its shard store under a budget."""
from __future__ import annotations

import logging

from tpi.generate import PREFILL_CHUNK
from tpi.model import ResidentWeights

log = logging.getLogger(__name__)


def activation_bytes(cfg, shard, context: int, chunk: int = PREFILL_CHUNK) -> int:
    """Upper estimate of transient memory for one prefill chunk on this rank."""
    t = min(chunk, context)
    qkv = (shard.n_q_heads + 2 * shard.n_kv_heads) * cfg.head_dim
    per_token = cfg.hidden * 16 + qkv * 8 + len(shard.inter) * 12 + len(shard.vocab) * 4
    scores = t * context * shard.n_q_heads * 4  # attention probabilities if materialised
    return t * per_token + scores


def kv_cache_bytes(cfg, shard, context: int, itemsize: int = 2) -> int:
    return 2 * cfg.n_layers * shard.n_kv_heads * context * cfg.head_dim * itemsize


class StreamedWeights:
    """BlockScheduler behind the model's get/release, with per-token stats for --stats."""

    def __init__(self, scheduler, plan):
        self.scheduler, self.plan = scheduler, plan

    def get(self, key: str):
        return self.scheduler.get(key)

    def release(self, key: str) -> None:
        self.scheduler.release(key)

    def token_stats(self) -> dict:
        s = self.scheduler.token_stats()
        return {"stall_s": s.stall_s, "bytes_read": s.bytes_read, "overlap": s.overlap}

    def close(self) -> None:
        self.scheduler.close()


def open_store_weights(store, layers, cfg, shard, context: int, budget: int | None):
    """Weights for the model from a shard store: everything resident, or a window plan under budget."""
    if budget is None:
        blocks = {}
        for key in store.keys():
            blocks[key] = layers.to_runtime(store.load(key, copy=True))
            store.release(key)
        return ResidentWeights(blocks)
    from tpi.scheduler.overhead import runtime_overhead_bytes
    from tpi.scheduler.prefetch import BlockScheduler
    from tpi.scheduler.window import plan_window

    plan = plan_window(
        store.block_sizes(),
        budget,
        kv_cache_bytes=kv_cache_bytes(cfg, shard, context),
        activation_bytes=activation_bytes(cfg, shard, context),
        runtime_overhead_bytes=runtime_overhead_bytes(),
        always_pinned=["globals"],
    )
    log.info("memory plan: %s", plan.describe())
    return StreamedWeights(BlockScheduler(store, plan, layers.to_runtime), plan)
