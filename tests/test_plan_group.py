"""Planning a real group from join handshakes: validated profiles, uneven ratios, leave-out, refusals."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.devices.costmodel import LinkProfile
from tpi.devices.group_plan import (
    ASSUMED_LINK, Candidate, cost_params, device_status, master_link, plan_real_group, plan_summary,
)
from tpi.devices.profile import DeviceProfile, offered_profile
from tpi.devices.shapes import model_shape
from tpi.errors import BudgetError, GroupError

GB = 10**9
QWEN7 = model_shape("qwen2.5-7b")
LAN = LinkProfile.from_ms_mbit(0.05, 100_000)  # effectively free: isolates compute


def profile(name: str, gflops: float, mem_gb: float = 64.0) -> DeviceProfile:
    return DeviceProfile(name=name, os="Linux", cores=8, total_memory_bytes=int(mem_gb * GB),
                         free_memory_bytes=int(mem_gb * GB), backend="torch", int4_gflops=gflops,
                         bf16_gflops=gflops / 2, prefill_gflops=gflops, memory_gbs=20.0, disk_mb_s=500.0,
                         measured_at=0.0, runtime_bytes=300 << 20)


PARAMS = cost_params("int4", 2048, layer_overhead_s=0.0, message_overhead_s=0.0)


def test_half_speed_worker_gets_a_third_and_status_reports_it():
    master = profile("master", 100)
    real = plan_real_group(QWEN7, master, None, [Candidate("w", profile("w", 50).to_dict(), LAN)], PARAMS)
    assert real.ranks == (0,) and real.refused == ()
    assert real.plan.ratios == pytest.approx((2 / 3, 1 / 3), rel=1e-6)
    heads = [s.n_q_heads for s in real.plan.shards]
    assert heads[0] > heads[1] and sum(heads) == QWEN7.n_heads
    st1 = device_status(real.plan, 1, LAN)
    assert st1["ratio"] == pytest.approx(1 / 3, abs=1e-3)
    assert st1["link"] == {"rtt_ms": 0.05, "mbit_s": 100_000.0}
    assert 0 < st1["predicted_peak_bytes"] <= st1["budget_bytes"]
    assert plan_summary(real.plan)["left_out"] == []


def test_memory_budget_sent_in_the_handshake_limits_the_share():
    master = profile("master", 100)
    small = offered_profile(profile("fast-small", 400), memory_budget=2 * GB)  # a fast device with --memory-budget 2GB
    real = plan_real_group(QWEN7, master, None, [Candidate("fast-small", small.to_dict(), LAN)], PARAMS)
    assert real.plan.ratios[1] < 0.5  # it is 4x faster but only 2 GB fit
    r = real.plan.prediction.ranks[1]
    assert r.budget_bytes == 2 * GB and r.peak_memory_bytes <= 2 * GB


def test_device_on_a_slow_link_is_refused_with_the_reason():
    slow = LinkProfile.from_ms_mbit(40.0, 5.0)
    cands = [Candidate("desk", profile("desk", 100).to_dict(), LAN),
             Candidate("phone", profile("phone", 20, mem_gb=4).to_dict(), slow)]
    real = plan_real_group(QWEN7, profile("master", 100), None, cands, PARAMS)
    assert real.ranks == (0,)
    (index, reason), = real.refused
    assert index == 1 and "left this device out" in reason and "ms/token" in reason


def test_kept_devices_are_never_left_out_even_when_slow():
    slow = LinkProfile.from_ms_mbit(40.0, 5.0)
    cands = [Candidate("local-1", profile("local-1", 20).to_dict(), slow, keep=True)]
    real = plan_real_group(QWEN7, profile("master", 100), None, cands, PARAMS)
    assert real.ranks == (0,) and real.refused == ()
    not_allowed = plan_real_group(QWEN7, profile("master", 100), None,
                                  [Candidate("w", profile("w", 20).to_dict(), slow)], PARAMS, leave_out=False)
    assert not_allowed.ranks == (0,)


def test_invalid_profile_is_refused_and_the_rest_still_plan():
    bad = dict(profile("w", 50).to_dict(), int4_gflops=float("nan"))
    cands = [Candidate("bad", bad, LAN), Candidate("empty", {}, LAN), Candidate("ok", profile("ok", 50).to_dict(), LAN)]
    real = plan_real_group(QWEN7, profile("master", 100), None, cands, PARAMS)
    assert real.ranks == (2,)
    reasons = dict(real.refused)
    assert set(reasons) == {0, 1}
    assert "int4_gflops" in reasons[0] and "tpi devices profile" in reasons[0]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(list(profile("x", 1).to_dict()) + ["gpu"]),
                       st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12), max_size=14))
def test_fuzzed_handshake_profiles_are_refused_or_planned_never_crash(raw):
    real = plan_real_group(QWEN7, profile("master", 100), None, [Candidate("fuzz", raw, LAN)], PARAMS)
    if real.refused:
        assert real.refused[0][0] == 0 and real.ranks == ()
    else:
        assert DeviceProfile.from_dict(raw)  # only a valid profile is planned with


def test_duplicate_names_are_made_unique():
    cands = [Candidate("master", profile("x", 100).to_dict(), LAN), Candidate("w", profile("w", 100).to_dict(), LAN),
             Candidate("w", profile("w", 100).to_dict(), LAN)]
    real = plan_real_group(QWEN7, profile("master", 100), None, cands, PARAMS)
    assert len(set(real.plan.names)) == len(real.plan.names) == 4


def test_no_link_figure_plans_with_the_assumed_link():
    real = plan_real_group(QWEN7, profile("master", 100), None, [Candidate("w", profile("w", 100).to_dict(), None)],
                           PARAMS, leave_out=False)
    assert real.plan.devices[1].link == ASSUMED_LINK


def test_master_link_is_the_fastest_measured_path():
    a, b = LinkProfile(0.002, 1e7), LinkProfile(0.001, 5e6)
    assert master_link([a, b]) == LinkProfile(0.001, 1e7)


def test_fixed_ratios_are_predicted_as_given():
    real = plan_real_group(QWEN7, profile("master", 100), None, [Candidate("w", profile("w", 100).to_dict(), LAN)],
                           PARAMS, ratios=(3, 1))
    assert real.plan.ratios == pytest.approx((0.75, 0.25))
    with pytest.raises(GroupError, match="--ratios needs every device"):
        plan_real_group(QWEN7, profile("master", 100), None, [Candidate("bad", {}, LAN)], PARAMS, ratios=(1, 1))


def test_infeasible_group_raises_the_shortfall_and_the_smallest_fix():
    llama70 = model_shape("llama-2-70b")
    tiny = [Candidate(f"w{i}", profile(f"w{i}", 100, mem_gb=1).to_dict(), LAN) for i in range(2)]
    with pytest.raises(BudgetError) as info:
        plan_real_group(llama70, profile("master", 100, mem_gb=1), None, tiny,
                        cost_params("bf16", 4096), leave_out=False)
    text = str(info.value)
    assert "GB" in text and ("add a device" in text or "raise" in text or "budget" in text)
