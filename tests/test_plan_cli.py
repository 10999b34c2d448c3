"""`tpi plan`, `tpi devices` and `tpi devices profile` through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from tpi.cli import app
from tpi.devices.profile import DeviceProfile

RUNNER = CliRunner()
DEVICES = """
[[device]]
name = "desk"
memory_gb = 16
int4_gflops = 200
bf16_gflops = 60
disk_mb_s = 1500
link_rtt_ms = 1
link_mbit = 1000

[[device]]
name = "phone"
memory_gb = 4
int4_gflops = 30
bf16_gflops = 5
disk_mb_s = 200
link_rtt_ms = 20
link_mbit = 40
"""


@pytest.fixture
def devices_file(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text(DEVICES)
    return path


def test_plan_named_shape_prints_the_table_and_who_sits_out(devices_file):
    result = RUNNER.invoke(app, ["plan", "llama-3-8b", "--devices", str(devices_file)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "llama-3-8b" in result.output and "token latency" in result.output
    assert "left out phone" in result.output  # 20 ms per allreduce x 64 allreduces cannot pay off


def test_plan_with_the_int8_wire_prints_every_wire_and_keeps_the_choice(devices_file):
    result = RUNNER.invoke(app, ["plan", "llama-3-8b", "--devices", str(devices_file), "--wire-dtype", "int8"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "int8 on the wire (model prediction)" in result.output and "fixed by the options" in result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    for wire in ("f32", "bf16", "int8"):
        assert wire in rows  # a row of the wire table (plain text: the runner's output is not a terminal)


def test_plan_reads_only_the_metadata_of_a_gguf_file(devices_file, tiny_llama_q4_0):
    result = RUNNER.invoke(app, ["plan", str(tiny_llama_q4_0), "--devices", str(devices_file), "--context", "256"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "Q4_0 100% weights" in result.output and "desk" in result.output  # the file's own types
    assert "column shards cut on 32 (wo) and 32 (w_down)" in result.output


def test_plan_of_a_converted_int4_model_uses_its_real_types(devices_file, tiny_llama_q4_0, tmp_path):
    """A converted .tpis is planned as the int4 model it is (a getattr probe once planned it as bf16):
    the same format, types and predictions as the GGUF it came from."""
    from tpi.formats import open_model
    from tpi.master.convert import convert

    convert(open_model(tiny_llama_q4_0), tmp_path / "m.tpis")
    plans = []
    for model in (tiny_llama_q4_0, tmp_path / "m.tpis"):
        result = RUNNER.invoke(app, ["plan", str(model), "--devices", str(devices_file), "--context", "256", "--json"])
        assert result.exit_code == 0, result.output
        plans.append(json.loads(result.output))
    gguf, native = plans
    assert native["weight_format"] == gguf["weight_format"] == "int4"
    assert native["predicted_token_ms"] == gguf["predicted_token_ms"]
    peaks = [[d["predicted_peak_bytes"] for d in p["devices"]] for p in plans]
    assert peaks[0] and peaks[0] == peaks[1]


def test_plan_into_a_pipe_is_plain_wide_text_with_every_cell_whole(devices_file):
    """Through a real pipe (not a terminal, COLUMNS unset): no cell is cut to fit 80 columns."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "tpi", "plan", "llama-3-8b", "--devices", str(devices_file)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "…" not in out and not any(ch in out for ch in "┃│━─")  # plain text, no rich box or ellipsis
    header = next(line for line in out.splitlines() if line.startswith("rank"))
    assert len(header) > 80 and "peak / budget GB" in header and "compute ms" in header
    plan = json.loads(subprocess.run([sys.executable, "-m", "tpi", "plan", "llama-3-8b", "--devices", str(devices_file),
                                      "--json"], capture_output=True, text=True, timeout=120, env=env).stdout)
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["0", "desk"])
    assert row[2] == f"{plan['devices'][0]['ratio']:.3f}"
    assert f"token latency {plan['predicted_token_ms']:.1f} ms" in out


def test_plan_json_is_the_plan_for_scripts(devices_file):
    result = RUNNER.invoke(app, ["plan", "llama-3-8b", "--devices", str(devices_file), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["model"] == "llama-3-8b" and plan["weight_format"] == "int4"
    assert [d["name"] for d in plan["devices"]] == ["desk"] and plan["left_out"][0][0] == "phone"
    assert abs(sum(d["ratio"] for d in plan["devices"]) - 1) < 1e-3 and plan["predicted_token_ms"] > 0
    assert plan["devices"][0]["q_heads"] == [0, 32]


@pytest.mark.parametrize("args, needle", [
    (["plan", "llama-9-9000b"], "unknown model shape"),
    (["plan", "llama-3-8b", "--weights", "fp8"], "--weights"),
    (["plan", "llama-3-8b", "--wire-dtype", "q8"], "use one of f32, bf16, int8"),
    (["plan", "llama-3-70b", "--no-streaming", "--weights", "bf16"], "GB"),  # 140 GB of bf16 on 20 GB
])
def test_plan_errors_are_one_line_with_the_fix(devices_file, args, needle):
    result = RUNNER.invoke(app, args + ["--devices", str(devices_file)])
    assert result.exit_code == 1
    assert "error:" in result.output and needle in result.output


def _status() -> dict:
    prof = DeviceProfile("laptop", "Linux x86_64", 4, 8 << 30, 6 << 30, "numpy", 12.5, 4.0, 20.0, 9.0,
                         400.0, 1.7e9).to_dict()
    return {"status": "ok", "model": "m", "group": {
        "state": "serving", "world": 2, "model": "m", "plan": {"predicted_token_ms": 31.0, "bound_by": "network",
                                                              "weight_format": "int4", "wire_dtype": "bf16"},
        "devices": [
            {"rank": 0, "name": "master", "address": "local", "share": {"q_heads": [0, 6]}, "profile": {}, "plan": {}},
            {"rank": 1, "name": "laptop", "address": "10.0.0.7", "share": {"q_heads": [6, 9]}, "profile": prof,
             "plan": {"ratio": 0.333, "predicted_peak_bytes": 7 * 10**8, "budget_bytes": 6 * 10**9,
                      "link": {"rtt_ms": 2.5, "mbit_s": 300.0}}},
        ]}}


def test_devices_lists_a_running_groups_profiles_shares_and_links():
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = json.dumps(_status()).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        result = RUNNER.invoke(app, ["devices", "--url", url], env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        for text in ("laptop", "10.0.0.7", "numpy", "12.5", "0.333", "6-8", "0.70 / 6.00", "2.50", "300",
                     "31.0 ms/token"):
            assert text in result.output, text
        raw = RUNNER.invoke(app, ["devices", "--url", url, "--json"])
        assert json.loads(raw.output)["group"]["devices"][1]["profile"]["name"] == "laptop"
        piped = RUNNER.invoke(app, ["devices", "--url", url], env={"COLUMNS": "80"})  # not a terminal: plain
        row = next(line for line in piped.output.splitlines() if "laptop" in line)
        assert "…" not in piped.output and len(row) > 80 and "0.70 / 6.00" in row and "10.0.0.7" in row
    finally:
        server.shutdown()


def test_devices_without_a_server_says_how_to_point_at_one():
    result = RUNNER.invoke(app, ["devices", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "--url" in result.output


def test_devices_profile_measures_caches_and_prints_json(tmp_path):
    result = RUNNER.invoke(app, ["devices", "profile", "--backend", "numpy", "--cache-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    profile = DeviceProfile.from_dict(json.loads(result.output))
    assert profile.backend == "numpy" and profile.int4_gflops > 0 and profile.runtime_bytes > 0
    assert list((tmp_path / "profile").glob("device_profile-numpy-*.json"))
