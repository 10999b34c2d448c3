"""Block scheduler: prefetch order, window bound, error surfacing, stats, and peak RSS."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest

from tpi.errors import ShapeError
from tpi.scheduler.prefetch import BlockLoadError, BlockOrderError, BlockScheduler
from tpi.scheduler.store import ShardStore, write_store
from tpi.scheduler.window import plan_window

from test_scheduler_store import assert_same_block, make_blocks


class RecordingStore:
    """Wraps a ShardStore: logs loads and releases, can delay loads or fail the n-th one."""

    def __init__(self, store: ShardStore, delay: float = 0.0, fail_at: int | None = None,
                 error: BaseException | None = None):
        self.store, self.path = store, store.path
        self.delay, self.fail_at, self.error = delay, fail_at, error
        self.loads: list[tuple[str, bool]] = []
        self.releases: list[str] = []

    def load(self, key: str, copy: bool = True) -> dict:
        self.loads.append((key, copy))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at is not None and len(self.loads) >= self.fail_at:
            raise self.error
        return self.store.load(key, copy)

    def release(self, key: str) -> None:
        self.releases.append(key)
        self.store.release(key)

    def block_nbytes(self, key: str) -> int:
        return self.store.block_nbytes(key)

    def will_need(self, key: str) -> None:
        self.store.will_need(key)


class Runtime:
    """Stand-in runtime block that counts how many are alive at once."""

    live = 0
    peak = 0

    def __init__(self, block: dict):
        self.block = block
        Runtime.live += 1
        Runtime.peak = max(Runtime.peak, Runtime.live)
        weakref.finalize(self, Runtime._gone)

    @staticmethod
    def _gone() -> None:
        Runtime.live -= 1


@pytest.fixture
def store(tmp_path):
    write_store(tmp_path / "s.tpis", {}, make_blocks(layers=4))
    with ShardStore.open(tmp_path / "s.tpis") as s:
        yield s


def streaming_plan(store: ShardStore, window: int):
    sizes = store.block_sizes()
    return plan_window(sizes, sum(n for _, n in sizes) // 2, kv_cache_bytes=0, activation_bytes=0,
                       runtime_overhead_bytes=0, preferred_window=window)


@pytest.mark.parametrize("window", [1, 2])
def test_delivers_store_blocks_in_order_for_several_tokens(store, window):
    plan = streaming_plan(store, window)
    assert plan.window == window and plan.pinned and len(plan.streamed) > window
    want = dict(make_blocks(layers=4))
    rec = RecordingStore(store)
    Runtime.live = Runtime.peak = 0
    tokens = 3
    with BlockScheduler(rec, plan, Runtime) as sched:
        for _ in range(tokens):
            for key in plan.order:
                blk = sched.get(key)
                assert_same_block(blk.block, want[key])
                del blk  # compute holds no reference after release
                sched.release(key)
    stats = sched.token_stats()  # after close: the loader has stopped, counts are final
    n_pinned = len(plan.pinned)
    assert sorted(rec.loads[:n_pinned]) == sorted((k, True) for k in plan.pinned)
    streamed_loads = [k for k, _ in rec.loads[n_pinned:]]
    cycle = list(plan.streamed) * (tokens + 1)
    assert streamed_loads == cycle[:len(streamed_loads)]
    assert tokens * len(plan.streamed) <= len(streamed_loads) <= tokens * len(plan.streamed) + window
    assert all(copy for _, copy in rec.loads)
    assert Runtime.peak <= n_pinned + window  # never more than the window streamed at once
    assert stats.blocks_loaded == len(streamed_loads)
    assert stats.bytes_read == sum(store.block_nbytes(k) for k in streamed_loads)
    assert sched.pinned_bytes == sum(store.block_nbytes(k) for k in plan.pinned)
    assert Runtime.live == 0  # close() dropped everything


def test_everything_pinned_loads_once_and_starts_no_thread(store):
    sizes = store.block_sizes()
    plan = plan_window(sizes, 1 << 30, kv_cache_bytes=0, activation_bytes=0, runtime_overhead_bytes=0)
    rec = RecordingStore(store)
    with BlockScheduler(rec, plan, Runtime) as sched:
        for _ in range(3):
            for key in plan.order:
                sched.get(key)
                sched.release(key)
        assert sched._thread is None and sched.token_stats().bytes_read == 0
    assert sorted(k for k, _ in rec.loads) == sorted(plan.order)


def test_loader_error_surfaces_in_get_not_a_hang(store):
    plan = streaming_plan(store, 2)
    n_pinned = len(plan.pinned)
    rec = RecordingStore(store, fail_at=n_pinned + 3, error=OSError("disk went away"))
    with BlockScheduler(rec, plan, Runtime) as sched:
        with pytest.raises(BlockLoadError, match=rf"'{plan.streamed[2]}'.*OSError: disk went away") as e:
            for _ in range(2):
                for key in plan.order:
                    sched.get(key)
                    sched.release(key)
        assert isinstance(e.value.__cause__, OSError)
        with pytest.raises(BlockLoadError):  # the next block fails too, rather than hanging
            sched.get(plan.streamed[3])


def test_runtime_conversion_tpi_error_passes_through(store):
    plan = streaming_plan(store, 2)
    calls = []

    def to_runtime(block: dict) -> object:
        calls.append(block)
        if len(calls) > len(plan.pinned):
            raise ShapeError("kernel refuses this shape")
        return block

    with BlockScheduler(store, plan, to_runtime) as sched:
        with pytest.raises(ShapeError, match="kernel refuses"):
            sched.get(plan.streamed[0])


def test_misuse_is_a_clear_error(store):
    plan = streaming_plan(store, 1)
    with BlockScheduler(store, plan, Runtime) as sched:
        first, second = plan.streamed[0], plan.streamed[1]
        with pytest.raises(BlockOrderError, match=f"next streamed block is '{first}'"):
            sched.get(second)
        with pytest.raises(BlockOrderError, match="without a matching get"):
            sched.release(first)
        sched.get(first)
        with pytest.raises(BlockOrderError, match="window of 1 is full"):
            sched.get(second)
        with pytest.raises(BlockOrderError, match="not in this device's plan"):
            sched.get("L99.attn")
    with pytest.raises(BlockOrderError, match="closed"):
        sched.get(second)
    sched.close()  # idempotent


def test_slow_disk_shows_up_as_stall(store):
    plan = streaming_plan(store, 2)
    with BlockScheduler(RecordingStore(store, delay=0.02), plan, Runtime) as sched:
        sched.token_stats()
        for key in plan.order:
            sched.get(key)
            sched.release(key)
        stats = sched.token_stats()
    assert stats.stall_s > 0 and 0.0 <= stats.overlap < 1.0
    assert stats.wall_s >= stats.stall_s


def test_close_wakes_a_waiting_get(store):
    plan = streaming_plan(store, 2)
    sched = BlockScheduler(RecordingStore(store, delay=0.2), plan, Runtime)
    threading.Timer(0.05, sched.close).start()
    with pytest.raises(BlockOrderError, match="closed"):
        sched.get(plan.streamed[0])


RSS_CHILD = r"""
import json, sys
import numpy as np
from tpi.scheduler.overhead import peak_rss_bytes, runtime_overhead_bytes
from tpi.scheduler.prefetch import BlockScheduler
from tpi.scheduler.store import ShardStore
from tpi.scheduler.window import plan_window

store = ShardStore.open(sys.argv[1])
overhead = runtime_overhead_bytes(margin=0.0, floor=0)  # bare baseline: a tight check
sizes = store.block_sizes()
window = max(n for _, n in sizes) * 2
budget = overhead + window
plan = plan_window(sizes, budget, kv_cache_bytes=0, activation_bytes=0,
                   runtime_overhead_bytes=overhead)
sums = []
with BlockScheduler(store, plan, lambda block: block["data"]) as sched:
    for _ in range(3):
        for key in plan.order:
            data = sched.get(key)
            sums.append(int(data[::4096].sum(dtype=np.uint64)))  # touch every page
            del data
            sched.release(key)
print(json.dumps({"hwm": peak_rss_bytes(), "budget": budget, "overhead": overhead,
                  "pinned": len(plan.pinned), "window": plan.window, "sums": sums}))
"""


@pytest.mark.slow
def test_peak_rss_stays_under_budget_while_streaming(tmp_path):
    block = 8 << 20
    n_blocks = 24  # 192 MiB of weights, several times the budget
    path = tmp_path / "big.tpis"
    write_store(path, {}, ((f"L{i // 2}.{'mlp' if i % 2 else 'attn'}",
                            {"data": np.full(block, i, np.uint8)}) for i in range(n_blocks)))
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path)], check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out)
    assert n_blocks * block > 2.5 * r["budget"]
    assert r["window"] == 2 and r["pinned"] <= 1
    assert r["sums"][:n_blocks] == [i * (block // 4096) for i in range(n_blocks)]
    # Stated allowance over the bare baseline: thread stack, allocator slack. One extra block
    # resident (8 MiB) would exceed it.
    assert r["hwm"] <= r["budget"] + (4 << 20), r
