"""Qwen3-MoE through the commands: `tpi run` alone, under a --memory-budget that streams experts, and with
a local worker holding half the experts; `tpi serve` with a worker; `tpi plan qwen3-30b-a3b`.

The model is the tiny qwen3moe_8x2 in llama.cpp's Q4_K_M mix. One device's answer is llama.cpp's bit
for bit (tests/test_moe_ggml.py), so each other way of running it must print the same greedy text:
whole experts on 2 ranks cut no block (same bits), and streamed experts are the same bytes read in
place. Under the budget the expert cache says what it mapped in: fewer bytes than the whole streamed
MoE blocks the window counts, with the hot experts' hits counted.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from cli_run import PROMPT, tpi_run
from test_reliability_support import api_url, complete, serve, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]

MIN_BUDGET = re.compile(r"raise --memory-budget to at least ([\d.]+) MiB")


@pytest.fixture(scope="module")
def moe_q4(family_gguf):
    return family_gguf("qwen3moe_8x2", q4_k_m=True)


@pytest.fixture(scope="module")
def alone(moe_q4, tmp_path_factory):
    proc, stats = tpi_run(tmp_path_factory.mktemp("alone"), str(moe_q4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_tpi_run_streams_only_the_chosen_experts_under_a_memory_budget(moe_q4, alone, tmp_path):
    refused, _ = tpi_run(tmp_path, str(moe_q4), "--memory-budget", "1MiB")
    assert refused.returncode != 0 and refused.stderr.count("error:") == 1
    floor = float(MIN_BUDGET.search(refused.stderr).group(1))
    proc, stats = tpi_run(tmp_path, str(moe_q4), "--memory-budget", f"{floor + 0.5:.1f}MiB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == alone
    assert stats["streamed_blocks"] > 0 and stats["expert_uses"] > 0
    # k = 2 of 8 experts per token: what the cache mapped in is well under the whole blocks the window counts
    assert 0 < stats["expert_bytes_read"] < stats["bytes_read"] / 2
    assert 0 <= stats["expert_hits"] <= stats["expert_uses"]


def test_tpi_run_with_a_worker_holding_half_the_experts(moe_q4, alone, tmp_path):
    proc, stats = tpi_run(tmp_path, str(moe_q4), "--local-workers", "1", "--experts", "whole")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # (the local worker's shard progress line shares this stdout, before the answer)
    assert stats["world"] == 2 and proc.stdout.endswith(alone)
    assert "experts: whole experts per rank: asked for (--experts whole)" in proc.stderr


def test_tpi_run_refuses_an_unknown_placement_in_one_line(moe_q4, tmp_path):
    proc, _ = tpi_run(tmp_path, str(moe_q4), "--experts", "half")
    assert proc.returncode != 0
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
        "error: --experts 'half' is not an expert placement; use split (every expert's columns across the "
        "ranks) or whole (whole experts per rank)"]


def test_tpi_serve_with_a_worker_answers_as_one_device(moe_q4, tmp_path):
    prompt = "Name three colours of the sea"
    one, _ = tpi_run(tmp_path, str(moe_q4), "--raw", "--ignore-eos", "-n", "8")  # PROMPT as raw text
    master = serve(moe_q4, tmp_path, "master", "--local-workers", "1", "--keep-all", "--insecure", "--ratios", "1,1",
                   "--no-announce", "--port", "0")
    try:
        url = api_url(master)
        health = wait_healthy(url, master)
        assert health["group"]["world"] == 2
        answer = complete(url, PROMPT, max_tokens=8).json()["choices"][0]["text"]
        assert answer.strip() == one.stdout.strip()
        assert "experts:" in master.text()
        assert complete(url, prompt, max_tokens=4).status_code == 200
    finally:
        master.stop()


def test_tpi_plan_predicts_qwen3_30b_a3b(tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text("".join(
        f'[[device]]\nname = "{n}"\nmemory_gb = 12\nint4_gflops = {g}\nbf16_gflops = 20\ndisk_mb_s = 1500\n'
        f'link_rtt_ms = 0.4\nlink_mbit = 1000\n\n' for n, g in (("desktop", 60), ("laptop", 50))))
    proc = subprocess.run([sys.executable, "-m", "tpi", "plan", "qwen3-30b-a3b", "--devices", str(devices), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    experts = plan["experts"]
    held, read = sum(experts["expert_bytes"]), max(experts["active_expert_bytes_per_token"])
    # 48 layers x 128 experts x 768 x 2048 x 3 matrices = 29.0B expert weights; top 8 of 128 read per token
    assert len(plan["devices"]) == 2 and 15e9 < held < 20e9
    assert held / 128 * 8 / 2 <= read < held / 8
    assert experts["placement"] in ("split", "whole") and "MoE layer" in experts["reason"]


def test_numpy_streams_under_a_budget_and_torch_refuses(moe_q4, tmp_path):
    """The torch-free fallback runs MoE alone and streamed alike; torch says in one line what to use."""
    alone_np, _ = tpi_run(tmp_path, str(moe_q4), "--backend", "numpy")
    refused, _ = tpi_run(tmp_path, str(moe_q4), "--backend", "numpy", "--memory-budget", "1MiB")
    floor = float(MIN_BUDGET.search(refused.stderr).group(1))
    proc, stats = tpi_run(tmp_path, str(moe_q4), "--backend", "numpy", "--memory-budget", f"{floor + 0.5:.1f}MiB")
    assert alone_np.returncode == proc.returncode == 0, proc.stderr[-2000:]
    assert stats["streamed_blocks"] > 0 and proc.stdout == alone_np.stdout
    torch, _ = tpi_run(tmp_path, str(moe_q4), "--backend", "torch")
    assert torch.returncode != 0
    assert [l for l in torch.stderr.splitlines() if l.startswith("error:")] == [
        "error: the torch backend does not run qwen3moe models (it runs llama, mistral, qwen2); "
        "use --backend ggml (the default) or --backend numpy"]
