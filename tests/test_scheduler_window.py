"""Window plan maths: pinned vs streamed blocks under a memory budget."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.errors import BudgetError
from tpi.scheduler.window import plan_window, spread_order, window_bytes

MiB = 1 << 20


def layer_blocks(layers: int, attn: int = 3 * MiB, mlp: int = 7 * MiB) -> list[tuple[str, int]]:
    out = []
    for i in range(layers):
        out += [(f"L{i}.attn", attn), (f"L{i}.mlp", mlp)]
    return out


def brute_window_bytes(sizes: list[int], w: int) -> int:
    """Reference: list every cyclic run of w blocks explicitly."""
    n = len(sizes)
    if n == 0 or w == 0:
        return 0
    doubled = sizes + sizes
    return max(sum(doubled[s:s + w]) for s in range(n))


def plan(blocks, budget, fixed=(1 * MiB, 2 * MiB, 5 * MiB), **kw):
    kv, act, over = fixed
    return plan_window(blocks, budget, kv_cache_bytes=kv, activation_bytes=act,
                       runtime_overhead_bytes=over, **kw)


def min_budget_in(message: str) -> int:
    return int(re.search(r"\((\d+) bytes =", message).group(1))


def test_everything_pinned_when_it_fits():
    blocks = layer_blocks(4)
    p = plan(blocks, 40 * MiB + 8 * MiB)
    assert p.pinned == tuple(k for k, _ in blocks) and p.streamed == () and p.window == 0
    assert not p.is_streaming and p.streamed_bytes_per_token == 0
    assert p.breakdown.slack == 0 and p.breakdown.window == 0
    assert "all 8 blocks pinned" in p.describe()


def test_budget_below_fixed_costs_is_refused_with_minimum():
    blocks = layer_blocks(4)
    with pytest.raises(BudgetError) as e:
        plan(blocks, 4 * MiB)
    assert min_budget_in(str(e.value)) == 8 * MiB + 7 * MiB  # fixed costs + largest block
    assert "L0.mlp" in str(e.value) and "--memory-budget" in str(e.value)


def test_minimum_budget_is_exactly_feasible():
    blocks = layer_blocks(4)
    with pytest.raises(BudgetError) as e:
        plan(blocks, 1)
    minimum = min_budget_in(str(e.value))
    p = plan(blocks, minimum)
    assert p.window == 1 and p.pinned == () and p.breakdown.slack == 0
    with pytest.raises(BudgetError):
        plan(blocks, minimum - 1)


def test_single_block_larger_than_budget_is_refused_naming_it():
    blocks = [("L0.attn", 1 * MiB), ("L0.mlp", 500 * MiB), ("L1.attn", 1 * MiB)]
    with pytest.raises(BudgetError, match=r"largest block 'L0.mlp' 500.0 MiB") as e:
        plan(blocks, 100 * MiB)
    assert min_budget_in(str(e.value)) == 508 * MiB


def test_window_two_preferred_then_one():
    blocks = layer_blocks(4)
    two = plan(blocks, 8 * MiB + 10 * MiB)  # exactly attn + mlp: a window of 2
    assert two.window == 2 and two.pinned == () and two.breakdown.window == 10 * MiB
    one = plan(blocks, 8 * MiB + 9 * MiB)  # room for the largest block only
    assert one.window == 1 and one.breakdown.window == 7 * MiB
    assert one.streamed == tuple(k for k, _ in blocks)


def test_pins_largest_blocks_spread_over_layers():
    blocks = layer_blocks(8)  # 80 MiB of weights
    p = plan(blocks, 8 * MiB + 10 * MiB + 4 * 7 * MiB)  # window 2 + room for four mlp blocks
    assert p.window == 2
    assert len(p.pinned) == 4 and all(k.endswith(".mlp") for k in p.pinned)
    layers = sorted(int(k[1:k.index(".")]) for k in p.pinned)
    assert max(b - a for a, b in zip(layers, layers[1:])) <= 3  # not bunched at one end
    assert p.streamed_bytes_per_token == 80 * MiB - 28 * MiB
    assert p.breakdown.used <= p.breakdown.budget


def test_always_pinned_counts_in_minimum():
    blocks = layer_blocks(2) + [("globals", 20 * MiB)]
    with pytest.raises(BudgetError) as e:
        plan(blocks, 30 * MiB, always_pinned=["globals"])
    assert min_budget_in(str(e.value)) == 8 * MiB + 20 * MiB + 7 * MiB
    p = plan(blocks, 8 * MiB + 20 * MiB + 10 * MiB, always_pinned=["globals"])
    assert p.pinned == ("globals",) and p.window == 2


def test_window_bytes_wraps_around_the_token():
    assert window_bytes([9, 1, 1, 8], 2) == 17  # last block then the next token's first
    assert window_bytes([5], 1) == 5 and window_bytes([], 0) == 0


def test_spread_order_is_a_permutation_with_spread_prefixes():
    for n in range(1, 70):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    assert spread_order(8)[:4] == [0, 4, 2, 6]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=24),
    budget=st.integers(0, 600),
    fixed=st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20)),
    preferred=st.integers(1, 4),
)
def test_plan_invariants(sizes, budget, fixed, preferred):
    blocks = [(f"b{i}", s) for i, s in enumerate(sizes)]
    kv, act, over = fixed
    minimum = kv + act + over + max(sizes)
    if budget < minimum:
        with pytest.raises(BudgetError) as e:
            plan(blocks, budget, fixed, preferred_window=preferred)
        assert min_budget_in(str(e.value)) == minimum
        return
    p = plan(blocks, budget, fixed, preferred_window=preferred)
    keys = [k for k, _ in blocks]
    assert sorted(p.pinned + p.streamed) == sorted(keys)
    assert list(p.streamed) == [k for k in keys if k in p.streamed]  # execution order kept
    size = dict(blocks)
    streamed_sizes = [size[k] for k in p.streamed]
    assert p.breakdown.window == brute_window_bytes(streamed_sizes, p.window)
    assert p.breakdown.pinned == sum(size[k] for k in p.pinned)
    assert p.breakdown.used <= budget
    if kv + act + over + sum(sizes) <= budget:
        assert p.streamed == ()
    else:
        assert 1 <= p.window <= min(preferred, len(p.streamed))
