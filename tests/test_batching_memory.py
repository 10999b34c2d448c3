"""--parallel N counts N KV caches: in the group planner and under --memory-budget; an N that does
not fit is refused naming the largest that does (issue 17)."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from test_budget_parity import CONTEXT, Rank0Store
from test_plan_group import LAN, PARAMS, profile
from tpi.devices.costmodel import rank_load
from tpi.devices.group_plan import Candidate, plan_real_group
from tpi.devices.shapes import model_shape
from tpi.devices.slicing import plan_cuts
from tpi.errors import BudgetError
from tpi.master.batch import default_slots
from tpi.master.options import GroupOptions
from tpi.master.setup import group_default_slots
from tpi.model.backends import make_layers
from tpi.model.rows import slots_refusal
from tpi.model.weights import plan_memory
from tpi.transport.keeper import JoinRequest

QWEN7 = model_shape("qwen2.5-7b")


def test_the_planner_counts_one_kv_cache_per_slot_and_names_the_most_that_fit():
    params = replace(PARAMS, context=32768)
    shard = plan_cuts(QWEN7, (1.0,)).shards[0]
    one, four = (rank_load(QWEN7, shard, replace(params, slots=n)).kv_cache_bytes for n in (1, 4))
    assert four == 4 * one

    def plan(n: int):
        return plan_real_group(QWEN7, profile("master", 100, mem_gb=12), None,
                               [Candidate("w", profile("w", 100, mem_gb=12).to_dict(), LAN)],
                               replace(params, slots=n), leave_out=False)

    with pytest.raises(BudgetError) as err:
        plan(8)
    refusal = str(slots_refusal(err.value, plan, 8))
    most = int(re.search(r"use --parallel (\d+)", refusal).group(1))
    assert 1 <= most < 8
    plan(most)  # it fits
    with pytest.raises(BudgetError):
        plan(most + 1)


def test_a_memory_budget_refuses_slots_past_it_with_the_largest_that_fits(tmp_path, tiny_gguf):
    r = Rank0Store(tiny_gguf("tiny_llama_q4_0", n_layers=4), tmp_path, "ggml")

    def budget_plan(slots: int, budget: int):
        layers = make_layers("ggml", r.cfg, r.shard, CONTEXT, 1, slots=slots)
        return plan_memory(r.store, layers, r.cfg, r.shard, CONTEXT, budget, runtime_overhead=0)

    one = budget_plan(1, 1 << 40).breakdown
    kv = one.kv_cache
    assert budget_plan(3, 1 << 40).breakdown.kv_cache == 3 * kv
    minimum = int(re.search(r"\((\d+) bytes", str(pytest.raises(BudgetError, budget_plan, 1, 1000).value)).group(1))
    budget = minimum + 2 * kv  # room for three KV caches, not for five
    budget_plan(3, budget)
    with pytest.raises(BudgetError, match=r"^5 KV caches \(--parallel 5\) do not fit: the most that fit are 3, "
                                          r"use --parallel 3 "):  # the fix first, before the memory figures
        budget_plan(5, budget)


def test_the_default_parallel_comes_from_memory(smollm2_source):
    cfg = smollm2_source.config
    per_slot = 2 * cfg.n_layers * cfg.kv_dim * 2048 * 2  # F16 keys and values of one 2048-token sequence
    assert default_slots(cfg, 2048, "ggml", 4 * per_slot * 2) == 2
    assert default_slots(cfg, 2048, "ggml", 1 << 40) == 4  # at most 4
    assert default_slots(cfg, 2048, "ggml", 1000) == 1
    assert default_slots(cfg, 2048, "torch", 1 << 40) == 1


def test_a_groups_default_parallel_comes_from_its_smallest_room(smollm2_source):
    cfg = smollm2_source.config
    per_slot = 2 * cfg.n_layers * cfg.kv_dim * 2048 * 2
    opts = GroupOptions(backend="ggml", context=2048)
    joins = [JoinRequest(b"w1", "w1", {"free_memory_bytes": 4 * per_slot * 2}, (), "10.0.0.2", b""),
             JoinRequest(b"w2", "w2", {}, (), "10.0.0.3", b"")]  # no free memory reported: not counted
    assert group_default_slots(opts, cfg, 2048, joins, {"free_memory_bytes": 1 << 40}) == 2  # w1 has least room
    budget = replace(opts, memory_budget=4 * per_slot * 3)  # rank 0's --memory-budget is its room
    assert group_default_slots(budget, cfg, 2048, joins[1:], {"free_memory_bytes": 1 << 40}) == 3
