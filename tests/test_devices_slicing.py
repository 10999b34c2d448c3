"""Shard maths: coverage, alignment, GQA replication, rounding and error cases."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.model.config import ModelConfig
from tpi.devices.slicing import (
    RankShard, check_partition, largest_remainder, plan_cuts, plan_shards, split_aligned, split_heads,
)
from tpi.errors import ShapeError


def make_cfg(hidden, inter, heads, kv, head_dim, vocab=49152, name="m"):
    return ModelConfig(arch="llama", hidden=hidden, intermediate=inter, n_layers=2, n_heads=heads,
                       n_kv_heads=kv, head_dim=head_dim, vocab=vocab, context=256, rms_eps=1e-5,
                       rope_theta=10000.0, name=name)


SMOL = make_cfg(576, 1536, 9, 3, 64, name="smollm2")
TINY = make_cfg(128, 256, 4, 2, 32, name="tiny")
UNEVEN = (0.5, 0.3, 0.2)


def skewed_ratios(n):
    """Deterministic uneven ratios 1:2:...:n, normalised."""
    w = [i + 1 for i in range(n)]
    return [x / sum(w) for x in w]


def assert_valid(cfg: ModelConfig, shards: tuple[RankShard, ...]):
    """Independent checks: every head once, exact partitions, alignment, GQA mapping."""
    q_owner = [s.rank for s in shards for _ in s.q_heads]
    assert sorted(h for s in shards for h in s.q_heads) == list(range(cfg.n_heads))
    assert len(q_owner) == cfg.n_heads
    inter_cols = [c for s in shards for c in s.inter]
    assert inter_cols == list(range(cfg.intermediate))
    vocab_rows = [v for s in shards for v in s.vocab]
    assert vocab_rows == list(range(cfg.vocab))
    group = cfg.n_heads // cfg.n_kv_heads
    for s in shards:
        assert len(s.q_heads) >= 1 and len(s.inter) >= 1 and len(s.vocab) >= 1
        assert s.inter.start % 32 == 0 and s.inter.stop % 32 == 0
        assert len(s.inter) % 16 == 0  # int4 packing needs N % 16 for gate/up
        assert s.vocab.start % 32 == 0
        if s.rank < len(shards) - 1:
            assert s.vocab.stop % 32 == 0
        assert s.wo_cols.start % 32 == 0 and s.wo_cols.stop % 32 == 0
        # KV heads needed = set of groups of the rank's query heads (brute force)
        need = sorted({h // group for h in s.q_heads})
        assert list(s.kv_heads) == need
        assert list(s.q_rows) == [h * cfg.head_dim + d for h in s.q_heads for d in range(cfg.head_dim)]
        assert list(s.kv_rows) == [k * cfg.head_dim + d for k in s.kv_heads for d in range(cfg.head_dim)]
        for local_q, h in enumerate(s.q_heads):
            assert s.kv_heads[s.q_to_local_kv[local_q]] == h // group


@pytest.mark.parametrize("cfg", [SMOL, TINY], ids=["smollm2", "tiny"])
def test_every_world_size_up_to_n_heads_partitions_exactly(cfg):
    for n in range(1, cfg.n_heads + 1):
        for ratios in ([1 / n] * n, skewed_ratios(n)):
            assert_valid(cfg, plan_shards(cfg, ratios))


def test_single_rank_takes_everything():
    (s,) = plan_shards(SMOL, [1.0])
    assert s.q_heads == range(9) and s.kv_heads == (0, 1, 2)
    assert s.inter == range(1536) and s.vocab == range(49152)
    assert s.q_to_local_kv == (0, 0, 0, 1, 1, 1, 2, 2, 2)


def test_uneven_ratios_follow_largest_remainder_by_hand():
    shards = plan_shards(SMOL, UNEVEN)
    # heads: owed 4.5, 2.7, 1.8 -> floors 4,2,1; two left over go to rank 2 (.8) then rank 1 (.7)
    assert [len(s.q_heads) for s in shards] == [4, 3, 2]
    # inter: 48 blocks of 32, owed 24, 14.4, 9.6 -> 24, 14, 10
    assert [s.inter for s in shards] == [range(0, 768), range(768, 1216), range(1216, 1536)]
    # vocab: 1536 blocks, owed 768, 460.8, 307.2 -> 768, 461, 307
    assert [len(s.vocab) for s in shards] == [768 * 32, 461 * 32, 307 * 32]
    # rank 0 holds heads 0-3 -> groups 0 and 1; rank 1 heads 4-6 -> groups 1, 2
    assert shards[0].kv_heads == (0, 1) and shards[1].kv_heads == (1, 2) and shards[2].kv_heads == (2,)
    assert shards[1].q_to_local_kv == (0, 0, 1)  # heads 4, 5 -> group 1; head 6 -> group 2


def test_more_ranks_than_kv_heads_replicates_kv_heads():
    shards = plan_shards(SMOL, [1 / 9] * 9)
    assert [s.kv_heads for s in shards] == [(r // 3,) for r in range(9)]
    holders = {k: [s.rank for s in shards if k in s.kv_heads] for k in range(3)}
    assert holders == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8]}
    tiny = plan_shards(TINY, [0.25] * 4)
    assert [s.kv_heads for s in tiny] == [(0,), (0,), (1,), (1,)]


def test_counts_within_one_unit_of_owed_when_no_rank_is_starved():
    ratios = [0.37, 0.11, 0.29, 0.23]
    counts = largest_remainder(48, ratios)
    assert sum(counts) == 48
    for c, r in zip(counts, ratios):
        assert abs(c - 48 * r) < 1


def test_tiny_ratio_still_gets_one_unit_taken_from_the_most_overfed():
    counts = largest_remainder(9, [0.9, 0.09, 0.01])
    assert counts == (7, 1, 1)  # owed 8.1, 0.81, 0.09 -> 8,1,0 -> rank 0 gives one to rank 2


def test_vocab_tail_goes_to_last_rank():
    cfg = make_cfg(128, 256, 4, 2, 32, vocab=32000 + 7)
    shards = plan_shards(cfg, [0.5, 0.5])
    assert shards[0].vocab == range(0, 16000) and shards[1].vocab == range(16000, 32007)


def test_head_dim_not_multiple_of_32_groups_heads():
    heads = split_heads(8, 16, [0.5, 0.25, 0.25])  # 2-head blocks keep wo columns 32-aligned
    assert [len(h) for h in heads] == [4, 2, 2]
    assert all((h.start * 16) % 32 == 0 for h in heads)


@pytest.mark.parametrize("ratios, needle", [
    ([], "empty"),
    ([0.5, 0.0, 0.5], "positive"),
    ([1.2, -0.2], "positive"),
    ([float("nan"), 1.0], "positive"),
    ([0.5, 0.6], "sum"),
])
def test_bad_ratios_raise_shape_error(ratios, needle):
    with pytest.raises(ShapeError, match=needle):
        plan_shards(SMOL, ratios)


def test_more_devices_than_heads_is_refused():
    with pytest.raises(ShapeError, match="at most 9 devices"):
        plan_shards(SMOL, [0.1] * 10)


def test_head_dim_that_cannot_align_is_refused():
    with pytest.raises(ShapeError, match="head_dim 48"):
        split_heads(3, 48, [0.5, 0.5])
    with pytest.raises(ShapeError, match="at most 2 devices"):
        split_heads(4, 16, [1 / 3] * 3)


def test_intermediate_not_multiple_of_group_is_refused():
    with pytest.raises(ShapeError, match="not a multiple of 32"):
        plan_shards(make_cfg(128, 250, 4, 2, 32), [0.5, 0.5])
    with pytest.raises(ShapeError, match="at most 2 devices"):
        split_aligned(64, [0.25] * 4)


def test_check_partition_rejects_a_gap():
    good = plan_shards(TINY, [0.5, 0.5])
    bad = (good[0], RankShard(1, 32, 2, range(3, 4), (1,), good[1].inter, good[1].vocab))
    with pytest.raises(ShapeError, match="query-head"):
        check_partition(TINY, bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=1, max_size=9))
def test_random_ratios_always_partition_smollm2(weights):
    ratios = [w / sum(weights) for w in weights]
    shards = plan_shards(SMOL, ratios)
    assert_valid(SMOL, shards)
    assert math.isclose(sum(len(s.inter) for s in shards), SMOL.intermediate)


# ---- column cuts on a tensor's block (K-quants: 256) ----------------------------------------------

QWEN15 = make_cfg(1536, 8960, 12, 2, 128, vocab=151936, name="qwen2.5-1.5b")  # q_dim 1536: 6 blocks of 256


def test_cuts_fall_on_256_element_blocks_where_the_split_has_room():
    cuts = plan_cuts(QWEN15, [0.4, 0.35, 0.25], wo_block=256, down_block=256)
    assert cuts.requantized == () and (cuts.wo_align, cuts.down_align) == (256, 256)
    assert_valid(QWEN15, cuts.shards)
    for s in cuts.shards:
        assert s.wo_cols.start % 256 == 0 and s.wo_cols.stop % 256 == 0
        assert s.inter.start % 256 == 0 and s.inter.stop % 256 == 0
    # wo: 6 units of 2 heads (256 columns) owed 2.4 / 2.1 / 1.5: floors 2 / 2 / 1, the leftover unit
    # to the largest remainder (rank 2's .5)
    assert [len(s.q_heads) for s in cuts.shards] == [4, 4, 4]


def test_a_matrix_whose_blocks_cannot_split_n_ways_is_cut_on_32_and_requantized():
    cfg = make_cfg(512, 1024, 8, 2, 64)  # wo: 2 blocks of 256; w_down: 4
    two = plan_cuts(cfg, [0.5, 0.5], 256, 256)
    assert two.requantized == () and two.wo_align == 256
    four = plan_cuts(cfg, [0.25] * 4, 256, 256)
    assert four.requantized == ("wo",) and (four.wo_align, four.down_align) == (32, 256)
    assert_valid(cfg, four.shards)
    assert [len(s.inter) for s in four.shards] == [256] * 4
    eight = plan_cuts(cfg, [0.125] * 8, 256, 256)
    assert eight.requantized == ("wo", "w_down") and eight.down_align == 32


def test_32_element_blocks_cut_as_before():
    assert plan_cuts(SMOL, UNEVEN).shards == plan_shards(SMOL, UNEVEN)
    assert plan_cuts(SMOL, UNEVEN, 32, 1).requantized == ()
