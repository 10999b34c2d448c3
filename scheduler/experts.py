"""Streamed experts: a MoE block under a memory budget maps in only the experts its tokens chose, and
keeps the hot ones mapped between tokens.

A streamed MoE block's expert tensors are bound where they lie in the shard store's map (ggml reads
them in place, unrepacked); the block scheduler maps in the block's other weights (norms, router) as
for any block, and this cache the chosen experts' pages, after the router has run and before their
graph does (tpi.model.moe_ggml.MoeRunner calls `use`). When the block is released, the experts
outside its hot set are dropped from the process; the hot set is the `hot` most used experts of that
block so far (counts over every token), as many as the budget's slack holds.

A use is a hit when the expert was still mapped (hot, or used earlier in the same block's pass).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from tpi.quant.ggml_stream import drop, page_range, populate


@dataclass
class _BlockExperts:
    """One streamed MoE block: each local expert's page ranges, use counts, and which are mapped."""

    ranges: list[list[tuple[int, int]]]  # per local expert: pages of its gate, up and down slabs
    nbytes: int  # bytes of one expert's slabs
    file: list[list[tuple[int, int]]]  # per local expert: (file offset, bytes) of its slabs in fd
    fd: int
    counts: np.ndarray = field(default=None)
    mapped: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.ranges), np.int64)


@dataclass(frozen=True)
class ExpertStats:
    uses: int
    hits: int
    bytes_read: int  # bytes of experts mapped in on a miss (from the page cache or the disk)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0


class ExpertCache:
    """Maps chosen experts in before they compute; keeps each block's `hot` most used ones mapped."""

    def __init__(self, hot: int = 0):
        self.hot = hot  # experts kept mapped per streamed block between its uses
        self._blocks: dict[int, _BlockExperts] = {}
        self._uses = self._hits = self._bytes = 0

    def add_block(self, blk, tensors: list[tuple[int, int, int]], n_local: int, fd: int) -> None:
        """Register a streamed block by its expert tensors' (address in the map, bytes, offset in file fd),
        n_local experts each."""
        per = [nbytes // n_local for _, nbytes, _ in tensors]
        ranges = [[page_range(a + e * p, p) for (a, _, _), p in zip(tensors, per)] for e in range(n_local)]
        file = [[(off + e * p, p) for (_, _, off), p in zip(tensors, per)] for e in range(n_local)]
        self._blocks[id(blk)] = _BlockExperts(ranges, sum(per), file, fd)

    def use(self, blk, experts) -> None:
        """Map in the local experts about to compute in blk (no-op for a block that does not stream)."""
        b = self._blocks.get(id(blk))
        if b is None:
            return
        for e in experts:
            b.counts[e] += 1
            self._uses += 1
            if e in b.mapped:
                self._hits += 1
                continue
            populate(b.ranges[e])
            b.mapped.add(e)
            self._bytes += b.nbytes

    def done(self, blk) -> None:
        """The chosen experts have computed (they stay mapped until the block is released)."""

    def release(self, blk) -> None:
        """The block leaves the window: drop its experts but the hot ones from this process."""
        b = self._blocks.get(id(blk))
        if b is None:
            return
        keep = set(np.argsort(-b.counts, kind="stable")[: self.hot].tolist()) if self.hot else set()
        for e in b.mapped - keep:
            drop(b.ranges[e])  # out of this process, and out of the page cache: the next use reads the disk
            if hasattr(os, "posix_fadvise"):
                for off, n in b.file[e]:
                    os.posix_fadvise(b.fd, off, n, os.POSIX_FADV_DONTNEED)
        b.mapped &= keep

    def stats(self) -> ExpertStats:
        """Counters since the previous call, then reset."""
        out = ExpertStats(self._uses, self._hits, self._bytes)
        self._uses = self._hits = self._bytes = 0
        return out


class ExpertStreamingStore:
    """A shard store as the block scheduler sees it when MoE experts stream one by one: a block's read
    hint and release cover its other tensors only; its experts are the ExpertCache's to map and drop
    (a whole-block hint would read every expert ahead, a whole-block release would evict the hot ones)."""

    def __init__(self, store, expert_names):
        self._store, self._names = store, frozenset(expert_names)
        self.path = store.path

    def _others(self, key: str):
        """(offset, bytes) of the block's non-expert arrays, or None when the block has no experts."""
        block = self._store.load(key, copy=False)
        if not self._names & set(block):
            return None
        out = []
        for name, v in block.items():
            if name not in self._names:
                for a in (v.arrays.values() if hasattr(v, "arrays") else [v]):
                    out.append((self._store.file_offset(a), a.nbytes))
        return out

    def will_need(self, key: str) -> None:
        others = self._others(key)
        if others is None:
            return self._store.will_need(key)
        if hasattr(os, "posix_fadvise"):
            for off, n in others:
                os.posix_fadvise(self._store.fileno(), off, n, os.POSIX_FADV_WILLNEED)

    def release(self, key: str, drop_cache: bool = True) -> None:
        if self._others(key) is None:
            self._store.release(key, drop_cache)
        # a MoE block: its runtime block dropped its own pages, the expert cache the cold experts'

    def __getattr__(self, name: str):
        return getattr(self._store, name)
