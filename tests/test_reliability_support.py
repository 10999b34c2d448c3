"""Helpers for the reliability, security and soak tests: real `tpi serve` / `tpi join` processes.

No tests live here; the module only shares process plumbing (free ports, log files, waiting
for /health) between tests/test_reliability_*.py, test_security_*.py and test_soak_*.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tpi.devices.profile import DeviceProfile
from tpi.transport.keeper import free_port_pair  # noqa: F401 (re-exported: the tests' one port pair)

TPI = [sys.executable, "-m", "tpi"]
API_LINE = re.compile(r"API on (http://[\d.]+:\d+)/v1")


def device_profile(name: str, int4_gflops: float = 50.0) -> dict:
    """A plausible handshake profile, so tests need not measure the machine."""
    return DeviceProfile(name=name, os="Linux x86_64", cores=2, total_memory_bytes=8 << 30,
                         free_memory_bytes=6 << 30, backend="torch", int4_gflops=int4_gflops,
                         bf16_gflops=int4_gflops / 2, prefill_gflops=int4_gflops, memory_gbs=10.0,
                         disk_mb_s=500.0, measured_at=1.7e9, runtime_bytes=400 << 20).to_dict()


def tpi_env() -> dict:
    return os.environ | {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TPI_API_KEY": "", "TPI_TOKEN": "",
                         "COLUMNS": "200"}


class Proc:
    """A tpi subprocess whose stdout and stderr go to one log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.args = args
        with open(log, "w") as out:
            self.popen = subprocess.Popen(TPI + args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=tpi_env() | (env or {}))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> re.Match:
        """The count-th match of pattern in the log; fails with the log's tail."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} (x{count}) not in {self.log.name} within {timeout}s:\n"
                                     f"{self.text()[-4000:]}")
            if not self.alive() and len(list(re.finditer(pattern, self.text()))) < count:
                raise AssertionError(f"{self.log.name} exited ({self.popen.returncode}) before {pattern!r}:\n"
                                     f"{self.text()[-4000:]}")
            time.sleep(0.1)


def serve(model: Path, tmp: Path, name: str, *args: str) -> Proc:
    """`tpi serve MODEL` on loopback with its own config and cache dirs under tmp."""
    return Proc(["serve", str(model), "--host", "127.0.0.1", "--api-port", "0", "--threads", "1",
                 "--config-dir", str(tmp / "master-config"), "--cache-dir", str(tmp / "master-cache"), *args],
                tmp / f"{name}.log")


def join(port: int, token: str, tmp: Path, name: str, *args: str) -> Proc:
    """`tpi join` with a fixed profile and its own cache and key dirs (kept across restarts)."""
    profile = tmp / f"{name}-profile.json"
    profile.write_text(json.dumps(device_profile(name)))
    logs = sorted(tmp.glob(f"{name}-*.log"))
    return Proc(["join", f"127.0.0.1:{port}", "--token", token, "--name", name, "--threads", "1",
                 "--cache-dir", str(tmp / f"{name}-cache"), "--key-dir", str(tmp / f"{name}-keys"),
                 "--profile-file", str(profile), *args], tmp / f"{name}-{len(logs)}.log")


def api_url(master: Proc, timeout: float = 120) -> str:
    return master.wait_for(API_LINE.pattern, timeout).group(1)


def wait_healthy(url: str, master: Proc, timeout: float = 180) -> dict:
    """Poll /health until the group serves; returns the last /health body."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            body = httpx.get(url + "/health", timeout=5).json()
        except httpx.HTTPError:
            body = {}
        if body.get("status") == "ok":
            return body
        if not master.alive():
            break
        time.sleep(0.2)
    raise AssertionError(f"the group did not serve within {timeout}s (last /health {body}):\n{master.text()[-4000:]}")


def complete(url: str, prompt: str, max_tokens: int = 8, timeout: float = 120) -> httpx.Response:
    """A greedy /v1/completions request (end-of-sequence ignored, so the length is fixed)."""
    return httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                     "ignore_eos": True}, timeout=timeout)
