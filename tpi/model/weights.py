"""A rank's weights: all resident, or pinned + streamed from its shard store under a memory budget.

The budget is the whole process (DESIGN.md §5): pinned blocks + streaming window + KV cache +
transient buffers + runtime overhead. The runtime overhead is measured when the plan is made: this
process's resident set (interpreter, torch, sockets, tokenizer, on the master the open model
source) less the KV cache already resident, plus a margin. Transient buffers are one prefill
chunk's activations and one block's conversion into kernel form (the torch int4 repack holds a
block's stored qweights beside the repacked ones until the block is ready).

On rank 0 the embedding table stays a read-only map of the store: a step reads one row per token,
and those pages are dropped again at the end of every step, so the table costs no budget.

A streamed torch engine would repack every q4g32 block into torch's int4 layout each time it
loads it (measured: 241 ms per 81 MiB block against 55 ms to read it), and a torch or numpy
engine would convert every GGUF-typed block into its kernel formats. Both stream instead from a
kernel-layout copy of the shard, written once beside it (kernel_layout_store), whose blocks
prepare zero-copy. Pinned and streamed blocks are budgeted at the size their kernels hold
(`kernels.resident_nbytes`: a Q4_0 block held as q4g32 is 11% larger than on disk).
"""
from __future__ import annotations

import ctypes
import logging
import time
import tracemalloc
from dataclasses import replace

import numpy as np

from tpi.errors import BudgetError, ModelFormatError
from tpi.model.blocks import EMBED, GLOBALS, mlp_key  # rank 0's embedding is mapped, not copied
from tpi.model.moe import EXPERT_TENSORS
from tpi.model.rows import slots_refusal
from tpi.model.transformer import ResidentWeights
from tpi.quant.formats import Q4G32, Q4G32_PREPACKED, slice_rows
from tpi.quant.kernel_forms import kernel_block
from tpi.scheduler.experts import ExpertStreamingStore
from tpi.scheduler.budget import activation_bytes, kv_cache_bytes, plan_budget, resident_block_sizes
from tpi.scheduler.overhead import runtime_overhead_bytes
from tpi.scheduler.prefetch import BlockScheduler
from tpi.scheduler.store import ShardStore, write_store

log = logging.getLogger(__name__)


def _layers_kv_bytes(layers, cfg, shard, context: int) -> tuple[int, int]:
    """(KV cache bytes, of which already resident) of a layers object (torch or numpy)."""
    caches = []
    for name in ("k_cache", "v_cache"):
        c = getattr(layers, name, None)
        if c is None:
            return kv_cache_bytes(cfg, shard.n_kv_heads, context), 0
        caches += list(c) if isinstance(c, (list, tuple)) else [c]  # one array, or one per layer
    total = sum(int(c.nbytes) for c in caches)
    # torch.zeros writes every page now; np.zeros gets lazily zeroed pages, resident once written.
    resident = sum(int(c.nbytes) for c in caches if not isinstance(c, np.ndarray))
    return total, resident


def kernel_layout(layers, store=None):
    """(name, prepare_block) of the kernel-layout copy a streamed engine of these layers reads, or None.

    ggml: the layers' own (GgmlLayers.kernel_layout: weights in ggml's repacked bytes, mapped by the
    streamed blocks instead of repacked per load). torch / numpy: GGUF types converted and q4g32 in
    this CPU's int4 order (tpi.quant.kernel_forms).
    """
    own = getattr(layers, "kernel_layout", None)
    if own is not None:
        return own
    if not _converts_store(layers, store):
        return None
    name = getattr(layers.kernels, "capability", None) or layers.kernels.name
    return name, lambda block: kernel_block(layers.kernels, block, keep=(EMBED,))


def prepacks(layers, store=None) -> bool:
    """Whether a streamed engine of these layers reads a kernel-layout copy (kernel_layout_store)."""
    return kernel_layout(layers, store) is not None


def _converts_store(layers, store=None) -> bool:
    """torch on a CPU with a verified int4 layout, or a torch / numpy backend on GGUF types."""
    if getattr(layers.kernels, "kernel_form", None) is None:
        return False
    if getattr(layers.kernels, "capability", None) in Q4G32_PREPACKED:
        return True
    return store is not None and any(_is_ggml(t) for key in store.keys() for t in store.load(key, copy=False).values())


def _is_ggml(t) -> bool:
    return str(getattr(t, "fmt", "")).startswith("ggml:")


def _converts(t) -> bool:
    """Whether preparing t transforms its bytes (torch repacks q4g32; ggml types convert)."""
    return getattr(t, "fmt", None) == Q4G32 or _is_ggml(t)


def conversion_bytes(store, layers) -> int:
    """Transient bytes of turning the worst block into kernel form, from a measured ratio.

    The torch int4 repack allocates about 3x a tensor's bytes while it runs, a GGUF type's
    conversion its float32 rows (measured below on a slice, through the layers' own to_runtime),
    beside the block's stored bytes and the tensors it already converted. A backend that prepares
    zero-copy measures about 0.
    """
    worst, largest = 0, None
    for key in store.keys():
        block = store.load(key, copy=False)  # views of the map: reads the index only
        tensors = [t for name, t in block.items() if name != EMBED and _converts(t)]
        total = sum(t.nbytes for t in tensors)
        if tensors and total > worst:
            worst, largest = total, max(tensors, key=lambda t: t.nbytes)
    if largest is None:
        return 0
    ratio = _conversion_ratio(layers, largest)
    return int(ratio * largest.nbytes + min(1.0, ratio) * (worst - largest.nbytes))


def _conversion_ratio(layers, qt, rows: int = 256) -> float:
    """Peak bytes allocated by to_runtime per stored byte, on the first rows of `qt` (tracemalloc)."""
    part = slice_rows(qt, 0, min(rows, qt.shape[0]))  # owned copies: the stored bytes are not counted
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    runtime = layers.to_runtime({"w": part})
    peak = tracemalloc.get_traced_memory()[1] - base
    if not tracing:
        tracemalloc.stop()
    del runtime
    return peak / part.nbytes


def planned_block_sizes(store, embed_mapped: bool, layers=None) -> list[tuple[str, int]]:
    """(key, resident bytes) per block; with `layers`, matrices count at what their kernels hold."""
    resident = getattr(getattr(layers, "kernels", None), "resident_nbytes", None)  # numpy / torch convert; ggml not
    return resident_block_sizes(store, embed_mapped, resident)


def plan_memory(store, layers, cfg, shard, context: int, budget: int, *, runtime_overhead: int | None = None,
                setup_rss: int = 0, prepacked: bool | None = None):
    """The WindowPlan for this rank under `budget` bytes (tpi.scheduler.budget.plan_budget).

    `runtime_overhead` overrides the measurement (tests and the planner's what-ifs). `setup_rss`
    is what this process held while opening the model. `prepacked`: blocks stream from a
    kernel-layout copy, so no repack transient (default: whether these layers use one).
    """
    kv_total, kv_resident = _layers_kv_bytes(layers, cfg, shard, context)
    if prepacked is None:
        prepacked = prepacks(layers, store)
    converting = 0 if prepacked else conversion_bytes(store, layers)
    if runtime_overhead is None:
        runtime_overhead = max(0, runtime_overhead_bytes() - kv_resident)
    slots = getattr(layers, "slots", 1)  # kv_total holds every slot's cache (tpi serve --parallel)

    def plan(kv: int):
        return plan_budget(planned_block_sizes(store, embed_mapped=True, layers=layers), budget, kv_cache=kv,
                           activations=activation_bytes(cfg, shard, context) + converting,
                           runtime_overhead=runtime_overhead, setup_rss=setup_rss,
                           always_pinned=[GLOBALS] if GLOBALS in store.keys() else [])

    try:
        return plan(kv_total)
    except BudgetError as e:  # with fewer KV caches (--parallel) it may fit: say how many
        raise slots_refusal(e, lambda n: plan(kv_total * n // slots), slots) from None


def _owned_copy(t):
    """A numpy array or QTensor with its own memory, off a read-only map."""
    if isinstance(t, np.ndarray):
        return np.array(t)
    return replace(t, arrays={n: np.array(a) for n, a in t.arrays.items()})


def _return_freed_blocks_to_the_os(threshold: int = 1 << 20) -> None:
    """Make glibc mmap every allocation >= threshold, so a released block's memory leaves the process.

    By default glibc raises its mmap threshold up to 32 MiB after large frees, after which block-sized
    buffers come from heap arenas that do not shrink: measured here, peak RSS of a streamed 7B-shape
    shard fell from 814 to 677 MiB under an 800 MiB budget. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; a fixed value also stops the dynamic raise
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): their allocators return large frees on their own terms


class _EmbedMappedStore:
    """A ShardStore whose globals block loads with the embedding as a map view, the rest copied."""

    def __init__(self, store):
        self._store = store
        self.path = store.path

    def load(self, key: str, copy: bool = True) -> dict:
        if key != GLOBALS or not copy:
            return self._store.load(key, copy)
        mapped = self._store.load(key, copy=False)
        return {name: t if name == EMBED else _owned_copy(t) for name, t in mapped.items()}

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class StreamedWeights:
    """A BlockScheduler behind the model's get/release, with per-interval stats for --stats.

    A forward pass starts at its first block (plan.order[0]) and ends when globals is released.
    """

    def __init__(self, scheduler, plan, store, clock=time.perf_counter, owned=None):
        self.scheduler, self.plan, self.store = scheduler, plan, store
        self._owned = owned  # a store opened for these weights (the kernel-layout copy): closed with them
        self._clock = clock
        self._first = plan.order[0]
        self._pass_start: float | None = None
        self._forward_s = 0.0
        self._passes = 0

    def get(self, key: str):
        if key == self._first:
            self._pass_start = self._clock()
        return self.scheduler.get(key)

    def release(self, key: str) -> None:
        self.scheduler.release(key)
        if key == GLOBALS:
            # The embedding rows this step read are file pages of the map: drop them from the
            # resident set (the page cache keeps them, so the next lookup is cheap).
            self.store.release(GLOBALS, drop_cache=False)
            if self._pass_start is not None:
                self._forward_s += self._clock() - self._pass_start
                self._passes += 1
                self._pass_start = None

    def token_stats(self) -> dict:
        """Streaming figures since the previous call (one generation, for the CLI), then reset.

        Per-token values divide by forward passes: a decode step is one token, a prefill chunk
        one pass. overlap = 1 - stall / time spent in forward passes.
        """
        s = self.scheduler.token_stats()
        passes, forward_s = self._passes, self._forward_s
        self._passes, self._forward_s = 0, 0.0
        b = self.plan.breakdown
        return {
            "stall_s": s.stall_s,
            "stall_s_per_token": s.stall_s / passes if passes else 0.0,
            "bytes_read": s.bytes_read,
            "bytes_read_per_token": s.bytes_read // passes if passes else 0,
            "overlap": 1.0 - s.stall_s / forward_s if forward_s > 0 else 1.0,
            "budget_bytes": b.budget,
            "pinned_bytes": b.pinned,
            "window_bytes": b.window,
            "streamed_bytes_per_token": self.plan.streamed_bytes_per_token,
            "runtime_overhead_bytes": b.runtime_overhead,
        }

    def close(self) -> None:
        self.scheduler.close()
        if self._owned is not None:
            self._owned.close()


def hot_experts(plan, store, cfg, shard) -> int:
    """Experts each streamed MoE block keeps mapped between tokens: as many as the budget's slack holds
    over every streamed MoE block (the window already counts a whole block per slot)."""
    moe = [mlp_key(i) for i in range(cfg.n_layers) if mlp_key(i) in plan.streamed]
    if not moe or not shard.experts:
        return 0
    per_expert = max(store.block_nbytes(k) for k in moe) // len(shard.experts)
    return int(min(len(shard.experts), max(0, plan.breakdown.slack) // (per_expert * len(moe))))


def kernel_layout_store(store, layers):
    """The shard in this backend's kernel layout (kernel_layout: ggml's repacked bytes; GGUF types
    converted and q4g32 in this CPU's int4 order for torch / numpy), beside it as
    `<shard>.<layout>.kernel` (a shard store too, but not named *.tpis: a worker's cache offers its
    *.tpis files to the master by hash); written on first use, reused while its source hash matches.

    The store itself comes back when the backend has nothing to convert (numpy on q4g32,
    unverified CPUs) or the copy cannot be written (read-only directory, full disk: logged, and
    streaming repacks).
    """
    layout = kernel_layout(layers, store)
    if layout is None:
        return store
    name, prepare = layout
    path = store.path.with_name(f"{store.path.name}.{name.lower()}.kernel")
    meta = {"source_hash": store.content_hash, "kernel_layout": name}
    try:
        if path.exists():
            try:
                packed = ShardStore.open(path)
            except ModelFormatError as e:
                log.warning("rewriting %s: %s", path, e)
            else:
                if {k: packed.meta.get(k) for k in meta} == meta:
                    return packed
                packed.close()  # the kernel copy of an older shard: write it again

        def blocks():
            for key in store.keys():
                yield key, prepare(store.load(key, copy=False))
                store.release(key, drop_cache=False)

        t0 = time.perf_counter()
        write_store(path, meta, blocks())
        log.info("wrote the %s kernel layout of %s in %.1fs", name, store.path.name, time.perf_counter() - t0)
        return ShardStore.open(path)
    except (OSError, ModelFormatError) as e:
        log.warning("streaming repacks every block: could not write %s (%s)", path, e)
        return store


def open_store_weights(store, layers, cfg, shard, context: int, budget: int | None,
                       *, runtime_overhead: int | None = None, setup_rss: int = 0):
    """Weights for the model from a shard store: everything resident, or a window plan under budget.

    The plan (and a BudgetError for an impossible budget) comes before any block is loaded.
    """
    if budget is None:
        blocks = {}
        for key in store.keys():
            blocks[key] = layers.to_runtime(store.load(key, copy=True))
            store.release(key)
        return ResidentWeights(blocks)
    _return_freed_blocks_to_the_os()
    plan = plan_memory(store, layers, cfg, shard, context, budget, runtime_overhead=runtime_overhead,
                       setup_rss=setup_rss)
    packed = kernel_layout_store(store, layers)  # after the plan: an impossible budget converts nothing
    if packed is store and prepacks(layers, store):  # no kernel copy after all: every block repacks as it loads
        plan = plan_memory(store, layers, cfg, shard, context, budget, runtime_overhead=runtime_overhead,
                           setup_rss=setup_rss, prepacked=False)
    log.info("memory plan: %s", plan.describe())
    mapped = _EmbedMappedStore(packed)
    pinned = stream = layers.to_runtime
    if hasattr(layers, "runtime_for"):  # ggml computes on weights where they lie: streamed blocks stay map views
        pinned, stream = layers.runtime_for(packed)
        cache = getattr(layers, "expert_cache", None)
        if cache is not None:  # MoE: experts map in one by one, through the cache, not with their block
            cache.hot = hot_experts(plan, packed, cfg, shard)
            mapped = ExpertStreamingStore(mapped, EXPERT_TENSORS)
    scheduler = BlockScheduler(mapped, plan, pinned, copy=not hasattr(layers, "runtime_for"),
                               stream_to_runtime=stream)
    return StreamedWeights(scheduler, plan, packed, owned=packed if packed is not store else None)
