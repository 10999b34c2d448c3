"""`tpi plan` chooses the group for speculative decoding, prints both figures and its assumptions (issue 18)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tpi.cli import app
from tpi.devices.plan_report import EXAMPLE_DEVICES_TOML, load_devices_file, plan_command, plan_json
from tpi.devices.planner import WIRE_BYTES
from tpi.devices.speculation_cost import GAIN_MARGIN, SpeculationPlan, estimate
from tpi.master import speculation as master_speculation

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def laptops(tmp_path_factory):
    """examples/laptops.toml, which docs/scaling.md and docs/benchmarks.md plan: eight 8 GB laptops at 1 ms
    and 300 Mbit, EXAMPLE_DEVICES_TOML with the docs' faster int4 and prefill and slower bf16."""
    path = Path(__file__).resolve().parents[1] / "examples" / "laptops.toml"
    example_file = tmp_path_factory.mktemp("laptops") / "example.toml"
    example_file.write_text(EXAMPLE_DEVICES_TOML)
    shipped, example = load_devices_file(path), load_devices_file(example_file)
    assert [d.profile.name for d in shipped] == [d.profile.name for d in example]
    assert {d.profile.int4_gflops for d in shipped} == {140.0} and {d.profile.bf16_gflops for d in shipped} == {12.0}
    assert [d.link for d in shipped] == [d.link for d in example]
    return path


@pytest.fixture(scope="module")
def wired_int8(laptops):
    """The plain-decoding plan and the speculation-aware one, int8 on the wire, a wired master."""
    plain = plan_command("llama-2-70b", laptops, wire_dtype="int8", master_full_duplex=True,
                         speculation=SpeculationPlan("off"))
    spec = plan_command("llama-2-70b", laptops, wire_dtype="int8", master_full_duplex=True,
                        speculation=SpeculationPlan())
    return plain, spec


def test_the_group_is_chosen_for_its_speculative_time_where_that_differs(wired_int8):
    plain, spec = wired_int8
    auto = SpeculationPlan()
    # plain decoding keeps a laptop that speculation is better off without: the choices differ
    assert len(spec.devices) < len(plain.devices)
    assert plain.decode_s == plain.prediction.token_latency_s
    assert spec.prediction.token_latency_s > plain.prediction.token_latency_s  # worse plainly ...
    assert spec.decode_s < auto.decode_s(plain)  # ... better with speculation, the objective
    assert spec.decode_s == pytest.approx(estimate(spec, auto.acceptance).token_s)
    assert spec.decode_s <= 0.6  # issue 18's target, in this stated configuration (wired, int8, 70% kept)
    assert any("with speculation" in why for _, why in spec.excluded)


def test_a_group_that_only_speculation_favours_is_not_kept_when_it_slows_open_ended_text(tmp_path):
    """examples/devices.toml at 90 % of drafts kept: the group best for speculation alone is 4 devices,
    which would decode chat and stories about 3x slower than the plain choice; the plan keeps the plain
    choice's group (PLAIN_SLACK), says why, and still reports its speculative figure."""
    devices = Path(__file__).resolve().parents[1] / "examples" / "devices.toml"
    plain = plan_command("llama-2-70b", devices, speculation=SpeculationPlan("off"))
    spec = plan_command("llama-2-70b", devices, speculation=SpeculationPlan(acceptance=0.9))
    assert spec.names == plain.names
    assert spec.prediction.token_latency_s == pytest.approx(plain.prediction.token_latency_s)
    assert spec.decode_s < 0.7 * plain.decode_s  # it still speculates on prompt-grounded tasks
    assert "4 devices" in spec.plain_guard and "open-ended" in spec.plain_guard
    out = plan_json(spec)
    assert out["objective"] == "plain" and out["objective_reason"] == spec.plain_guard
    text = RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(devices), "--acceptance", "0.9"]).output
    assert "the figure the group is chosen for: the group best for speculation alone" in text


def test_auto_stays_plain_where_no_k_gains_its_margin(laptops):
    """Over Wi-Fi with the planner's own wire, verifying rows costs about what it saves: auto's
    10% margin keeps it plain, and the plan says so rather than promising a speculative gain."""
    plan = plan_command("llama-2-70b", laptops, speculation=SpeculationPlan())
    e = SpeculationPlan().estimate(plan)
    assert e.k == 0 and plan.decode_s == plan.prediction.token_latency_s
    best = estimate(plan, 0.7, margin=1.0)
    assert best.k > 0 and best.token_s * GAIN_MARGIN > plan.prediction.token_latency_s


def test_gain_margin_and_step_sizes_are_the_policys():
    assert GAIN_MARGIN == master_speculation.GAIN_MARGIN
    assert {master_speculation._step_size(k) for k in range(1, 9)} == {1, 2, 4, 8}


def test_plan_prints_plain_and_speculative_figures_and_its_assumptions(laptops, wired_int8):
    _, spec = wired_int8
    result = RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(laptops), "--wire-dtype", "int8", "--wired"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    plain_ms, spec_ms = spec.prediction.token_latency_s * 1e3, spec.decode_s * 1e3
    assert f"prompt-grounded tasks {spec_ms:.1f} ms/token with speculation" in out
    assert f"open-ended tasks {plain_ms:.1f} ms/token plain" in out
    assert "70% of drafts kept, assumed, not measured" in out
    assert "auto turns itself off" in out and "wired, full duplex" in out
    # the wire table: every wire with and without speculation
    int8 = next(line for line in result.output.splitlines() if line.startswith("int8 "))
    assert "with speculation ms" in result.output and f"{plain_ms:.1f}" in int8 and f"{spec_ms:.1f}" in int8
    # the speculation table's open-ended row is the plain figure
    row = next(line for line in result.output.splitlines() if line.startswith("open-ended"))
    cells = row.split()
    assert cells[cells.index("without") - 1] == f"{plain_ms:.1f}"


def test_default_plan_says_wifi_and_why_int8_is_opt_in(laptops):
    result = RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(laptops), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["master_link"] == "one direction at a time" and "Wi-Fi-like" in plan["link_assumptions"]
    assert plan["wire_dtype"] == "bf16" and "int8 stays opt-in" in plan["wire_reason"]
    assert "greedy tokens part" in plan["wire_reason"]
    spec = plan["speculation"]
    assert spec["acceptance_source"] == "assumed" and spec["mode"] == "auto" and plan["objective"] == "speculative"
    assert spec["open_ended_ms_per_token"] == plan["predicted_token_ms"]  # kept fields still there
    assert spec["predicted_ms_per_token_without"] == plan["predicted_token_ms"]


def test_speculate_off_plans_plain_and_a_given_acceptance_is_named(laptops):
    off = json.loads(RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(laptops), "--json",
                                         "--wire-dtype", "int8", "--wired", "--speculate", "off"]).output)
    assert off["objective"] == "plain" and off["predicted_decode_ms_per_token"] == off["predicted_token_ms"]
    assert len(off["devices"]) == 7
    given = RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(laptops), "--wire-dtype", "int8", "--wired",
                                "--acceptance", "0.9"])
    assert "90% of drafts kept, as given (--acceptance)" in " ".join(given.output.split())
    bad = RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(laptops), "--speculate", "always"])
    assert bad.exit_code == 1 and "error:" in bad.output and "use one of auto, lookup, off" in bad.output


def test_plan_json_at_a_given_acceptance(wired_int8):
    _, spec = wired_int8
    out = plan_json(spec, 0.9)["speculation"]
    assert out["assumed_acceptance"] == 0.9 and out["acceptance_source"] == "given"
    assert out["predicted_ms_per_token"] < plan_json(spec)["speculation"]["predicted_ms_per_token"]


def test_wire_table_compares_wires_by_the_figure_the_wire_was_chosen_by(laptops):
    """With speculation on, the wire is chosen by ms/token with speculation: each other wire's "x the
    chosen" is that column's ratio (it was the plain column's, 1.00x beside 807 against 612 ms)."""
    result = RUNNER.invoke(app, ["plan", "llama-2-70b", "--devices", str(laptops)])
    assert result.exit_code == 0, result.output
    rows = {c[0]: c for c in (line.split() for line in result.output.splitlines())
            if len(c) > 9 and c[0] in WIRE_BYTES and c[1].isdigit()}  # the table's rows, not its caption
    chosen = next(c for c in rows.values() if c[-1] == "chosen")
    others = [c for c in rows.values() if c is not chosen]
    assert others
    for cells in others:  # wire, bytes, network, conversions, allreduce, comm, token, with speculation, TTFT, mark
        assert cells[10:] == ["the", "chosen", "ms/token", "with", "speculation"], cells
        assert float(cells[9].rstrip("x")) == pytest.approx(float(cells[7]) / float(chosen[7]), abs=0.006)
