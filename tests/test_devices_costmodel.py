"""Cost model against hand-computed formulas: allreduce, token latency, memory and streaming."""
from __future__ import annotations

import pytest

from tpi.devices.costmodel import (
    WIRE_CONVERT_S, CostParams, LinkProfile, allreduce_ring_s, allreduce_star_s, compare_allreduce, predict,
    rank_load, star_terms, wire_convert_s,
)
from tpi.devices.profile import DeviceProfile
from tpi.devices.shapes import model_shape, parameter_count
from tpi.devices.slicing import plan_shards

SMOL = model_shape("smollm2-135m")
NO_OVERHEAD = CostParams(message_overhead_s=0.0)


def profile(name="d", g4=100.0, bf=50.0, disk=500.0, mem_gbs=20.0):
    return DeviceProfile(name=name, os="Linux", cores=4, total_memory_bytes=8 << 30, free_memory_bytes=8 << 30,
                         backend="torch", int4_gflops=g4, bf16_gflops=bf, prefill_gflops=200.0,
                         memory_gbs=mem_gbs, disk_mb_s=disk, measured_at=0.0)


def test_star_allreduce_matches_hand_formula():
    links = [LinkProfile(0.0, 12.5e6), LinkProfile(2e-3, 1.25e6), LinkProfile(4e-3, 12.5e6)]
    b = 10_000
    # latency: slowest worker RTT; bytes: master carries 4 messages, slow worker 2 -> max of both
    expected = 4e-3 + max(4 * b / 12.5e6, 2 * b / 1.25e6)
    assert allreduce_star_s(b, links, NO_OVERHEAD) == pytest.approx(expected)
    assert allreduce_star_s(b, links[:1], NO_OVERHEAD) == 0.0


def test_ring_allreduce_matches_hand_formula():
    links = [LinkProfile(1e-3, 1e8)] * 4
    b = 1_000_000
    assert allreduce_ring_s(b, links, NO_OVERHEAD) == pytest.approx(6 * (0.5e-3 + b / 4 / 1e8))


def test_star_wins_small_messages_ring_wins_huge_ones():
    links = [LinkProfile(1e-3, 125e6)] * 8
    assert compare_allreduce(16 * 1024, links, NO_OVERHEAD).faster == "star"
    assert compare_allreduce(64 << 20, links, NO_OVERHEAD).faster == "ring"


def test_rank_loads_add_up_to_the_model():
    params = CostParams()
    shards = plan_shards(SMOL, [0.5, 0.3, 0.2])
    loads = [rank_load(SMOL, s, params) for s in shards]
    h = SMOL.hidden
    assert sum(l.mlp_block_bytes for l in loads) == pytest.approx(3 * h * SMOL.intermediate * 0.625, abs=3)
    assert sum(l.head_bytes for l in loads) == pytest.approx(SMOL.vocab * h * 0.625, abs=3)
    # q and o are partitioned; k and v are replicated where ranks share a KV head
    kv_rows = sum(len(s.kv_rows) for s in shards)
    assert sum(l.attn_block_bytes for l in loads) == pytest.approx(
        (2 * SMOL.q_dim * h + 2 * kv_rows * h) * 0.625, abs=3)


def test_single_device_token_latency_is_compute_plus_kv_read_plus_overhead():
    params = CostParams(kv_position=100)
    (shard,) = plan_shards(SMOL, [1.0])
    p = predict(SMOL, [shard], [profile()], [LinkProfile(0, 1e9)], [8 << 30], params)
    embed = SMOL.vocab * SMOL.hidden
    weights = parameter_count(SMOL) - 2 * SMOL.hidden * SMOL.n_layers - SMOL.hidden  # minus norms
    kv_read = 2 * SMOL.n_layers * SMOL.kv_dim * 100 * 4  # fp32 KV cache
    expected = 2 * weights / 100e9 + kv_read / 20e9 + SMOL.n_layers * 150e-6
    assert weights - embed > 0  # tied: the embedding is the lm_head
    assert p.token_latency_s == pytest.approx(expected, rel=1e-6)
    assert p.comm_per_token_s == 0.0
    r = p.ranks[0]
    assert r.streamed_bytes == 0
    kv_cache = 2 * SMOL.n_layers * SMOL.kv_dim * params.context * 4
    assert r.peak_memory_bytes == r.pinned_bytes + kv_cache + r.window.breakdown.activations + (400 << 20)


def test_small_budget_streams_and_disk_bounds_latency():
    params = CostParams()
    (shard,) = plan_shards(SMOL, [1.0])
    load = rank_load(SMOL, shard, params)  # the KV cache and activations, as the rank's own budget counts them
    budget = (400 << 20) + load.kv_cache_bytes + load.activation_bytes + 80 * 2**20  # + about 80 MiB of weights
    p = predict(SMOL, [shard], [profile(disk=50.0)], [LinkProfile(0, 1e9)], [budget], params)
    r = p.ranks[0]
    assert r.streamed_bytes > 0 and r.peak_memory_bytes <= budget
    assert r.stream_s == pytest.approx(r.streamed_bytes / 50e6)
    assert p.token_latency_s == pytest.approx(max(r.compute_s, r.stream_s))
    assert p.bottleneck.startswith("disk")


@pytest.mark.parametrize("wire,bytes_per_value", [("bf16", 2), ("int8", 34 / 32)])
def test_narrow_wires_cut_allreduce_bytes_and_add_their_conversions(wire, bytes_per_value):
    shards = plan_shards(SMOL, [0.5, 0.5])
    links = [LinkProfile(0.0, 1e6)] * 2  # bandwidth-bound, zero latency
    f32 = predict(SMOL, shards, [profile()] * 2, links, [8 << 30] * 2, CostParams(message_overhead_s=0))
    narrow = predict(SMOL, shards, [profile()] * 2, links, [8 << 30] * 2,
                     CostParams(message_overhead_s=0, wire_dtype=wire))
    assert f32.allreduce_s == pytest.approx(2 * SMOL.hidden * 4 / 1e6)
    fixed, per_value = WIRE_CONVERT_S[wire]
    convert = 4 * (fixed + SMOL.hidden * per_value)  # N + 2 conversions on the critical path, N = 2
    assert convert > 0 and wire_convert_s(SMOL.hidden, 2, wire) == pytest.approx(convert)
    assert narrow.allreduce_s == pytest.approx(f32.allreduce_s * bytes_per_value / 4 + convert)
    assert narrow.token_latency_s < f32.token_latency_s


def test_star_terms_say_when_the_bytes_dominate():
    slow = [LinkProfile.from_ms_mbit(1, 300)] * 8
    fast = [LinkProfile.from_ms_mbit(1, 10_000)] * 8
    params = CostParams(message_overhead_s=30e-6)
    assert star_terms(8192 * 4, slow, params).bandwidth_bound
    assert not star_terms(8192 * 4, fast, params).bandwidth_bound
    t = star_terms(8192 * 4, slow, params)
    assert t.total_s == pytest.approx(allreduce_star_s(8192 * 4, slow, params))
    assert t.bytes_s == pytest.approx(2 * 7 * 8192 * 4 / 37.5e6)
