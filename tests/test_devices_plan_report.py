"""`tpi plan` helpers: devices files (good and bad), rendered tables, the plan command."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from tpi.devices.plan_report import EXAMPLE_DEVICES_TOML, load_devices_file, plan_command, plan_tables, render_plan
from tpi.devices.planner import plan_group
from tpi.devices.shapes import model_shape
from tpi.errors import GroupError

TWO = """
[[device]]
name = "master"
memory_gb = 16
int4_gflops = 120
bf16_gflops = 40
disk_mb_s = 800
link_rtt_ms = 0.5
link_mbit = 1000

[[device]]
name = "old-laptop"
memory_gb = 4
int4_gflops = 30.5
bf16_gflops = 10
prefill_gflops = 50
disk_mb_s = 100
link_rtt_ms = 3
link_mbit = 200
"""


def write(tmp_path, text):
    path = tmp_path / "devices.toml"
    path.write_text(text)
    return path


def test_devices_file_builds_profiles_and_links(tmp_path):
    master, laptop = load_devices_file(write(tmp_path, TWO))
    assert master.name == "master" and master.budget == 16_000_000_000
    assert master.profile.prefill_gflops == 80.0  # default: 2 x bf16
    assert laptop.profile.int4_gflops == 30.5 and laptop.profile.prefill_gflops == 50.0
    assert laptop.link.rtt_s == pytest.approx(0.003)
    assert laptop.link.bandwidth_bytes_s == pytest.approx(200e6 / 8)


def test_count_expands_into_numbered_devices(tmp_path):
    devices = load_devices_file(write(tmp_path, EXAMPLE_DEVICES_TOML))
    assert [d.name for d in devices] == [f"laptop-{i}" for i in range(1, 9)]


@pytest.mark.parametrize("text, needle", [
    ("", "has no"),
    ("[[device]]\nname = 'x'\n", "missing fields"),
    (TWO.replace("disk_mb_s = 800", "disk_mb_s = 800\ngpu = true"), "unknown fields"),
    (TWO.replace("memory_gb = 16", "memory_gb = -1"), "memory_gb"),
    (TWO.replace("link_mbit = 1000", "link_mbit = 'fast'"), "link_mbit"),
    (TWO.replace("int4_gflops = 120", "int4_gflops = 0"), "int4_gflops"),
    (TWO.replace('"old-laptop"', '"master"'), "repeats device names"),
    ("[[device]\n", "not valid TOML"),
])
def test_bad_devices_files_raise_group_error_naming_the_problem(tmp_path, text, needle):
    with pytest.raises(GroupError, match=needle):
        load_devices_file(write(tmp_path, text))


def test_missing_devices_file_shows_an_example(tmp_path):
    with pytest.raises(GroupError, match="link_rtt_ms"):
        load_devices_file(tmp_path / "absent.toml")


def test_render_plan_has_a_row_per_rank_and_a_summary(tmp_path):
    devices = load_devices_file(write(tmp_path, TWO))
    plan = plan_group(model_shape("qwen2.5-1.5b"), devices)
    table = render_plan(plan)
    assert table.row_count == len(plan.devices)
    assert "token latency" in table.caption and "model prediction" in table.title


def test_plan_command_plans_what_its_tables_show(tmp_path):
    buf = io.StringIO()
    plan = plan_command("llama-2-70b", write(tmp_path, EXAMPLE_DEVICES_TOML))
    console = Console(file=buf, width=200)
    for table in plan_tables(plan):
        console.print(table)
    out = buf.getvalue()
    assert plan.model == "llama-2-70b" and len(plan.names) > 1
    assert "token latency" in out and "star (used)" in out
    for name in plan.names:
        assert name in out
    # the wire table: every wire's prediction, the chosen one marked, and the reason
    assert "wire dtype of the partial sums" in out and "int8 would predict" in out
    for wire, pred in plan.wire_options:
        assert f"{pred.token_latency_s * 1e3:.1f}" in out
    assert "chosen" in out and "x the chosen token time" in out
