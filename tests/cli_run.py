"""The greedy `tpi run` of the embedded SmolLM2 that the CLI and memory-budget tests share.

A process opening SmolLM2 costs seconds, so the unbudgeted run is made once per session
(conftest's `smollm2_cli_run`) and serves both as the CLI test's subject and as the answer a
budgeted run must repeat.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

PROMPT = "What is the capital of France?"


def tpi_run(tmp: Path, *extra: str, wrap=lambda c: c) -> tuple[subprocess.CompletedProcess, dict]:
    """(process, --stats-json contents or {}) of `tpi run` on PROMPT, 12 greedy tokens, 1 thread, context 256."""
    stats = tmp / f"stats-{secrets.token_hex(3)}.json"
    cmd = [sys.executable, "-m", "tpi", "run", "--prompt", PROMPT, "-n", "12", "--temperature", "0",
           "--context", "256", "--threads", "1", "--stats-json", str(stats),
           "--cache-dir", str(tmp / "cache"), "--config-dir", str(tmp / "config"), *extra]
    proc = subprocess.run(wrap(cmd), capture_output=True, text=True, timeout=600)
    return proc, (json.loads(stats.read_text()) if stats.exists() else {})
