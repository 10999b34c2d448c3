"""Planning a mixture of experts: the two placements' cuts, the cost model's choice, expert bytes held
against bytes read per token, and the streamed-expert cache's bookkeeping.

References are computed here independently: the busiest rank's expected share by brute-force
enumeration of every routing, byte counts from the model's published dimensions.
"""
from __future__ import annotations

import itertools
import mmap

import numpy as np
import pytest

from tpi.devices.costmodel import CostParams, rank_load
from tpi.devices.experts import SPLIT, WHOLE, imbalance, place_experts, split_experts
from tpi.devices.shapes import model_shape, parameter_count
from tpi.devices.slicing import plan_cuts
from tpi.errors import ShapeError
from tpi.model.config import ModelConfig


def tiny_moe(experts: int = 8, used: int = 2, ff: int = 256) -> ModelConfig:
    return ModelConfig(arch="qwen3moe", hidden=256, intermediate=512, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                       vocab=384, context=256, rms_eps=1e-6, rope_theta=1e6, n_experts=experts, n_experts_used=used,
                       expert_ff=ff)


@pytest.mark.parametrize("n_experts,k,ranks", [(8, 2, 2), (12, 3, 3), (10, 4, 2)])
def test_imbalance_is_the_expected_busiest_share_over_every_routing(n_experts, k, ranks):
    owner = np.repeat(np.arange(ranks), n_experts // ranks)
    busiest = [np.bincount(owner[list(c)], minlength=ranks).max() for c in itertools.combinations(range(n_experts), k)]
    assert imbalance(n_experts, k, ranks) == pytest.approx(np.mean(busiest) / (k / ranks), rel=1e-12)


def test_the_two_placements_cover_every_expert_column_once():
    cfg = tiny_moe()
    for placement, ratios in itertools.product((SPLIT, WHOLE), ((0.5, 0.5), (0.5, 0.25, 0.25))):
        shards = plan_cuts(cfg, ratios, placement=placement).shards
        area = sum(len(s.experts) * len(s.expert_ff) for s in shards)
        assert area == cfg.n_experts * cfg.expert_ff
        want = [round(r * 8) for r in ratios] if placement == WHOLE else [8] * len(ratios)
        assert [len(s.experts) for s in shards] == want
        if placement == SPLIT:  # F32 down_exps: cut on 32 columns, by the ratios
            assert [len(s.expert_ff) for s in shards] == [round(r * 256) for r in ratios]
        else:
            assert all(s.expert_ff == range(256) for s in shards)
    with pytest.raises(ShapeError, match="only 8 experts"):
        split_experts(cfg, [1 / 9] * 9, WHOLE)


def test_the_cost_model_splits_resident_experts_and_keeps_streamed_ones_whole():
    cfg = model_shape("qwen3-30b-a3b")
    cuts, why = place_experts(cfg, (1 / 3,) * 3)
    assert cuts.placement == SPLIT and "shorter MoE layer" in why  # balanced; whole: 1.51x on the busiest rank
    cuts, why = place_experts(cfg, (1 / 3,) * 3, streaming=True)
    assert cuts.placement == WHOLE and "stream" in why
    # Q6_K down_exps (256-column blocks): 768 columns split 512 / 256, within the 10% margin of whole
    cuts, why = place_experts(cfg, (0.5, 0.5), down_block=256)
    assert cuts.placement == WHOLE and "less than 10% shorter" in why
    cuts, why = place_experts(cfg, (0.5, 0.5), "whole")
    assert cuts.placement == WHOLE and "--experts whole" in why


def test_expert_bytes_held_and_read_per_token_are_counted_apart():
    cfg = model_shape("qwen3-30b-a3b")
    h, ff, e, k, layers = 2048, 768, 128, 8, 48
    assert parameter_count(cfg) - parameter_count(cfg, active=True) == layers * 3 * h * ff * (e - k) + 151936 * h
    params = CostParams(weight_format="int4")
    bpw = 0.5 + 4 / 32
    for placement, ratios in ((SPLIT, (0.5, 0.5)), (WHOLE, (0.5, 0.5))):
        shards = plan_cuts(cfg, ratios, placement=placement).shards
        loads = [rank_load(cfg, s, params) for s in shards]
        assert sum(l.expert_bytes for l in loads) == pytest.approx(e * 3 * h * ff * bpw, rel=1e-6)
        for s, l in zip(shards, loads):
            one = 3 * h * len(s.expert_ff) * bpw
            want = k if placement == SPLIT else k / 2 * imbalance(e, k, 2)
            assert l.active_expert_bytes == pytest.approx(want * one, rel=1e-6)
            assert l.mlp_active_bytes == l.mlp_block_bytes - l.expert_bytes + l.active_expert_bytes


def test_the_expert_cache_maps_in_chosen_experts_and_keeps_the_hot_ones(tmp_path):
    from tpi.quant.ggml_graph import array_address
    from tpi.scheduler.experts import ExpertCache

    page = mmap.PAGESIZE
    path = tmp_path / "experts.bin"
    path.write_bytes(bytes(4 * 3 * page))  # 4 experts x 3 tensors of one page each
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        data = np.frombuffer(m, np.uint8)
        blk = object()
        cache = ExpertCache(hot=1)
        cache.add_block(blk, [(array_address(data) + t * 4 * page, 4 * page, t * 4 * page) for t in range(3)], 4,
                        f.fileno())
        cache.use(blk, [2, 0])
        cache.use(blk, [2])  # still mapped in the same pass: a hit
        cache.release(blk)  # expert 2 is the most used: it stays mapped
        cache.use(blk, [2, 1])
        st = cache.stats()
        assert (st.uses, st.hits, st.bytes_read) == (5, 2, 3 * 3 * page)
        assert cache.stats().uses == 0  # counters reset per call
        del data
        m.close()
