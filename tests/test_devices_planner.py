"""Planner: ratios follow speed within memory, slow links sit out, wire dtype, infeasible plans."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tpi.devices.costmodel import CostParams, LinkProfile
from tpi.devices.planner import (
    PlanDevice, _ratio_within, balance_ratios, choose_wire, device_time_s, plan_group,
)
from tpi.devices.profile import DeviceProfile
from tpi.devices.shapes import model_shape
from tpi.errors import BudgetError

GB = 1e9
FAST_LINK = LinkProfile.from_ms_mbit(0.05, 100_000)  # effectively free: isolates compute
QWEN7 = model_shape("qwen2.5-7b")
LLAMA70 = model_shape("llama-2-70b")


def device(name, gflops, mem_gb=64.0, link=FAST_LINK, disk=500.0):
    prof = DeviceProfile(name=name, os="Linux", cores=8, total_memory_bytes=int(mem_gb * GB),
                         free_memory_bytes=int(mem_gb * GB), backend="torch", int4_gflops=gflops,
                         bf16_gflops=gflops / 2, prefill_gflops=gflops * 2, memory_gbs=20.0,
                         disk_mb_s=disk, measured_at=0.0)
    return PlanDevice(prof, link)


def test_ratios_follow_speed_when_memory_is_plentiful():
    devs = [device("a", 100), device("b", 200), device("c", 50)]
    plan = plan_group(QWEN7, devs, CostParams(layer_overhead_s=0))
    assert plan.names == ("a", "b", "c") and plan.excluded == ()
    assert plan.ratios == pytest.approx((100 / 350, 200 / 350, 50 / 350), rel=1e-6)
    inter = [len(s.inter) for s in plan.shards]
    assert inter[1] > inter[0] > inter[2]
    assert sum(inter) == QWEN7.intermediate
    # rounded shards stay close to the ratios
    for s, r in zip(plan.shards, plan.ratios):
        assert abs(len(s.inter) / QWEN7.intermediate - r) < 32 / QWEN7.intermediate * len(devs)


def test_fast_device_with_little_memory_gets_only_what_fits():
    params = CostParams(layer_overhead_s=0)
    small = device("fast-small", 400, mem_gb=2.0)
    devs = [device("m", 100, mem_gb=16), small, device("c", 100, mem_gb=16)]
    plan = plan_group(QWEN7, devs, params, allow_streaming=False)
    assert plan.names == ("m", "fast-small", "c")
    assert plan.ratios[1] < 400 / 600  # less than its speed share
    for r in plan.prediction.ranks:
        assert r.streamed_bytes == 0
        assert r.peak_memory_bytes <= r.budget_bytes
    # the two equal devices share the rest equally
    assert plan.ratios[0] == pytest.approx(plan.ratios[2], rel=1e-6)


def test_memory_short_device_streams_only_when_allowed_and_stays_in_budget():
    devs = [device("m", 100, mem_gb=2.5), device("w", 100, mem_gb=2.5)]  # 4.8 GB of int4 weights
    plan = plan_group(QWEN7, devs, CostParams(), allow_streaming=True)
    assert plan.names == ("m", "w")
    assert any(r.streamed_bytes > 0 for r in plan.prediction.ranks)
    for r in plan.prediction.ranks:
        assert r.peak_memory_bytes <= r.budget_bytes
    with pytest.raises(BudgetError, match="GB more across the group"):
        plan_group(QWEN7, devs, CostParams(), allow_streaming=False)


def test_slow_link_device_is_left_out_with_a_reason():
    slow = device("wifi-phone", 100, link=LinkProfile.from_ms_mbit(20, 5))
    devs = [device("m", 100), device("b", 100), slow]
    plan = plan_group(QWEN7, devs)
    assert "wifi-phone" not in plan.names and plan.names == ("m", "b")
    ((name, reason),) = plan.excluded
    assert name == "wifi-phone" and "leaving it out predicts" in reason
    with_it = plan_group(QWEN7, devs[:2] + [device("wifi-phone", 100)])
    assert len(with_it.names) == 3  # the same device on a good link is kept


def test_master_is_never_left_out():
    devs = [device("slow-master", 10, link=LinkProfile.from_ms_mbit(5, 50)), device("fast", 1000)]
    plan = plan_group(QWEN7, devs)
    assert plan.names[0] == "slow-master"


def test_wire_dtype_is_bf16_only_when_bytes_matter():
    fast = plan_group(QWEN7, [device("a", 50), device("b", 50)])
    assert fast.wire_dtype == "f32" and len(fast.names) == 2
    lan = LinkProfile.from_ms_mbit(1, 1000)
    pair = plan_group(QWEN7, [device("a", 50, link=lan), device("b", 50, link=lan)])
    preds = dict(pair.wire_options)
    # two ranks on the f32 wire swap partials (one hop): faster decode than bf16's star round trip,
    # although bf16 predicts the shorter TTFT; decode time is the objective, TTFT never buys a slower one
    assert preds["f32"].token_latency_s < preds["bf16"].token_latency_s and preds["bf16"].ttft_s < preds["f32"].ttft_s
    assert pair.wire_dtype == "f32" and len(pair.names) == 2
    assert pair.prediction.comm_per_token_s < preds["bf16"].comm_per_token_s
    trio = [device(n, 50, link=lan) for n in "abc"]
    star = plan_group(QWEN7, trio)
    by_wire = dict(star.wire_options)
    assert star.wire_dtype == "bf16"  # the star: bytes matter
    assert by_wire["f32"].comm_per_token_s > by_wire["bf16"].comm_per_token_s
    assert by_wire["bf16"].token_latency_s < 0.97 * by_wire["f32"].token_latency_s
    assert f"predicts {by_wire['bf16'].token_latency_s * 1e3:.1f} ms/token" in star.wire_reason
    forced = plan_group(QWEN7, trio, wire_dtype="f32")
    assert forced.wire_dtype == "f32" and "fixed by the options" in forced.wire_reason
    assert f"bf16 {by_wire['bf16'].token_latency_s * 1e3:.1f}" in forced.wire_reason


def test_ttft_breaks_a_decode_tie_only():
    """choose_wire: bf16 for its TTFT only where its decode is no slower than f32's."""
    lan = LinkProfile.from_ms_mbit(1, 1000)
    trio = plan_group(QWEN7, [device(n, 50, link=lan) for n in "abc"])
    links, params = [d.link for d in trio.devices], trio.prediction.params
    preds = {w: p for w, p in trio.wire_options if w != "int8"}
    tie = {"f32": 0.2, "bf16": 0.2}
    assert preds["bf16"].ttft_s < 0.97 * preds["f32"].ttft_s
    wire, why = choose_wire(QWEN7, links, params, preds, decode_s=tie)
    assert wire == "bf16" and "TTFT" in why
    slower = {"f32": 0.2, "bf16": 0.2001}
    assert choose_wire(QWEN7, links, params, preds, decode_s=slower)[0] == "f32"


def test_int8_wire_is_suggested_only_where_the_link_is_bandwidth_bound_and_chosen_only_when_asked():
    slow = LinkProfile.from_ms_mbit(1, 300)
    laptops = [device(f"l{i}", 100, mem_gb=8, link=slow) for i in range(8)]
    params = CostParams(weight_format="int4")
    plan = plan_group(LLAMA70, laptops, params)
    preds = dict(plan.wire_options)
    assert set(preds) == {"f32", "bf16", "int8"} and plan.wire_dtype == "bf16"  # int8 is opt-in (AUTO_INT8)
    assert preds["int8"].token_latency_s < 0.97 * min(preds["f32"].token_latency_s, preds["bf16"].token_latency_s)
    assert "bandwidth-bound" in plan.wire_reason and "opt in with --wire-dtype int8" in plan.wire_reason
    assert f"int8 would predict {preds['int8'].token_latency_s * 1e3:.1f}" in plan.wire_reason
    links = [d.link for d in plan.devices]
    wire, why = choose_wire(LLAMA70, links, params, preds, auto_int8=True)  # the rule, were int8 automatic
    assert wire == "int8" and why.startswith("int8 on the wire: the link is bandwidth-bound")
    asked = plan_group(LLAMA70, laptops, params, wire_dtype="int8")
    assert asked.wire_dtype == "int8" and asked.prediction.token_latency_s < plan.prediction.token_latency_s
    # a fast link: the same group keeps exact sums, and says it is not bandwidth-bound
    lan = [device(f"l{i}", 100, mem_gb=8, link=LinkProfile.from_ms_mbit(1, 100_000)) for i in range(8)]
    fast = plan_group(LLAMA70, lan, CostParams(weight_format="int4"))
    assert fast.wire_dtype == "f32" and "not bandwidth-bound" in fast.wire_reason and "int8" not in fast.wire_reason
    # 1 ms at 1 Gbit for a 7B on three ranks: bf16 saves >= 3%, but the bytes do not dominate, so no int8
    one_gbit = LinkProfile.from_ms_mbit(1, 1000)
    mid = plan_group(QWEN7, [device(n, 50, link=one_gbit) for n in "abc"])
    assert mid.wire_dtype == "bf16" and "int8" in dict(mid.wire_options) and "int8 would" not in mid.wire_reason


def test_int8_wire_needs_whole_blocks_of_the_hidden_size():
    odd = replace(QWEN7, hidden=3580, name="odd")  # not a multiple of 32
    slow = LinkProfile.from_ms_mbit(1, 1000)
    plan = plan_group(odd, [device(n, 50, link=slow) for n in "abc"])  # three: the star, where bytes matter
    assert "int8" not in dict(plan.wire_options) and plan.wire_dtype == "bf16"
    with pytest.raises(BudgetError, match="multiple of 32"):
        plan_group(odd, [device("a", 50, link=slow), device("b", 50, link=slow)], wire_dtype="int8")


def test_single_device_plan_has_no_communication():
    plan = plan_group(QWEN7, [device("solo", 100)])
    assert plan.ratios == (1.0,) and plan.prediction.comm_per_token_s == 0.0
    assert plan.shards[0].q_heads == range(QWEN7.n_heads)


def test_infeasible_group_names_the_shortfall_and_the_fixes():
    devs = [device(f"d{i}", 100, mem_gb=4.0) for i in range(4)]
    with pytest.raises(BudgetError) as err:
        plan_group(LLAMA70, devs, CostParams(weight_format="bf16"), allow_streaming=False)
    msg = str(err.value)
    assert "GB more across the group" in msg and "add a device with >=" in msg and "use int4" in msg
    # need = weights + KV + overhead per device; the stated shortfall must match it
    shortfall = float(msg.split("needs ")[2].split(" GB more")[0])
    offered = 4 * 4.0
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    weights = (80 * per_layer + 32000 * 8192) * 2 / GB
    kv = 2 * 80 * 1024 * 2048 * 4 / GB  # fp32 KV cache
    assert shortfall == pytest.approx(weights + kv + 4 * (400 << 20) / GB - offered, abs=0.06)


def test_budget_too_small_for_even_streaming_is_refused():
    with pytest.raises(BudgetError):
        plan_group(QWEN7, [device("tiny", 100, mem_gb=0.3)])


def test_device_that_cannot_hold_its_minimum_share_is_left_out():
    devs = [device("m", 100, mem_gb=16), device("crumb", 100, mem_gb=0.3)]
    plan = plan_group(QWEN7, devs)
    assert plan.names == ("m",)


def test_ratio_within_matches_a_bisection_of_device_time():
    params = CostParams()
    for dev in (device("a", 100, mem_gb=3), device("b", 40, mem_gb=1.5, disk=200), device("c", 300)):
        for t in (0.01, 0.05, 0.2, 1.0, 5.0):
            r = _ratio_within(QWEN7, dev, t, params)
            assert device_time_s(QWEN7, dev, r, params) <= t * (1 + 1e-9)
            if r < 1.0:
                assert device_time_s(QWEN7, dev, min(1.0, r + 1e-4), params) > t


def test_balanced_ratios_equalise_device_times():
    params = CostParams()
    devs = [device("a", 100, mem_gb=3), device("b", 60, mem_gb=8), device("c", 200, mem_gb=2)]
    ratios = balance_ratios(QWEN7, devs, params)
    assert sum(ratios) == pytest.approx(1.0)
    times = [device_time_s(QWEN7, d, r, params) for d, r in zip(devs, ratios)]
    assert max(times) == pytest.approx(min(times), rel=1e-3)
