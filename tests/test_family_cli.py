"""Each issue-19 family end to end, on its tiny F32 fixture: `tpi run` (the chat template from the GGUF),
`tpi run --memory-budget` (blocks streamed from the shard store) and `tpi serve` with local worker
processes (a real group on loopback) all give the same greedy answer.

F32 weights: ggml rounds no activations for them, so a group's partial sums differ from one device's only
in float summation order (tests/test_family_engines.py) and greedy text is the same. Budgets are found,
not guessed (as tests/test_budget_memory.py): a 1-byte budget is refused with the minimum feasible one,
and the real run gets that minimum plus one block: most of the model streams.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest
from typer.testing import CliRunner

from test_reliability_support import api_url, free_port_pair, serve
from tpi.cli import app

PROMPT = "Name three colours of the sea at dawn."
TOKENS = 24
# variant -> local workers of the served group: N = 2 and N = 3 both run as real processes
SERVED = {"qwen3": 1, "gemma3": 2, "mistral_swa": 2, "phi3": 1}
MINIMUM = re.compile(r"minimum feasible budget is [\d.]+ \S+ \((\d+) bytes.*largest block '[^']+' ([\d.]+) (KiB|MiB)")


def tpi_run(path, tmp, *extra: str):
    """(exit code, stdout, stderr, --stats-json) of an in-process `tpi run`: greedy, 1 thread, context 256."""
    stats = tmp / "stats.json"
    stats.unlink(missing_ok=True)
    result = CliRunner().invoke(app, [
        "run", str(path), "--prompt", PROMPT, "-n", str(TOKENS), "--temperature", "0", "--context", "256",
        "--threads", "1", "--cache-dir", str(tmp / "cache"), "--config-dir", str(tmp / "config"),
        "--stats-json", str(stats), *extra])
    return result.exit_code, result.stdout, result.stderr, json.loads(stats.read_text()) if stats.exists() else {}


@pytest.fixture(scope="module")
def answers(family_gguf, tmp_path_factory):
    """variant -> what `tpi run` answers on one device, with every block resident."""
    made = {}

    def get(name: str) -> str:
        if name not in made:
            code, out, err, stats = tpi_run(family_gguf(name), tmp_path_factory.mktemp(name))
            assert code == 0, err
            assert stats["prompt_tokens"] > 20 and stats["world"] == 1 and "streamed_blocks" not in stats
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(SERVED))
def test_tpi_run_streams_under_a_memory_budget_and_answers_the_same(name, family_gguf, answers, tmp_path):
    path = family_gguf(name)
    code, _, err, _ = tpi_run(path, tmp_path, "--memory-budget", "1")
    found = MINIMUM.search(err.replace("\n", " "))
    assert code == 1 and found, err
    block = float(found.group(2)) * {"KiB": 1 << 10, "MiB": 1 << 20}[found.group(3)]
    budget = int(found.group(1)) + int(block)  # room for one more block
    code, out, err, stats = tpi_run(path, tmp_path, "--memory-budget", str(budget))
    assert code == 0, err
    assert stats["streamed_blocks"] > 0 and stats["pinned_blocks"] >= 1, stats  # GLOBALS always stays
    assert out == answers(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SERVED))
def test_tpi_serve_with_local_workers_answers_as_one_device(name, family_gguf, answers, tmp_path):
    workers = SERVED[name]
    ratios = ",".join(["2"] + ["1"] * workers)  # uneven: rank 0 takes half
    master = serve(family_gguf(name), tmp_path, "master", "--local-workers", str(workers), "--ratios", ratios,
                   "--port", str(free_port_pair()), "--context", "256")
    try:
        url = api_url(master)
        master.wait_for(rf"group of {workers + 1} ready", 300)
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS, "temperature": 0}).json()
    finally:
        master.stop()
    assert reply["choices"][0]["message"]["content"] + "\n" == answers(name)
