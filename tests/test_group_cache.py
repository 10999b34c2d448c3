"""A `tpi join` worker keeps its shard on disk: a second join transfers nothing, a corrupt file is refetched.

Each round serves a 2-device group (master in this process, CURVE on), lets a separate
`tpi join` process join it, runs one forward pass and stops the group. The worker's log line
"shard: N bytes transferred" is the evidence of what went over the wire.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_reliability_support import device_profile

from tpi.master import GroupOptions, start_group
from tpi.master.events import WaitingForDevices

pytestmark = pytest.mark.slow

JOIN_LINE = re.compile(r"tpi join (\S+):(\d+) --token (\S+)")
TRANSFER_LINE = re.compile(r"shard: (\d+) bytes transferred")


def serve_round(model: Path, tmp: Path, worker_cache: Path) -> tuple[np.ndarray, str]:
    """Serve a group of 2 with one `tpi join` process; returns (prompt logits, the worker's log)."""
    said: list = []
    box: dict = {}

    def master() -> None:
        try:
            box["group"] = start_group(GroupOptions(
                model=str(model), devices=2, ratios=(0.5, 0.5), host="127.0.0.1", threads=1,
                config_dir=tmp / "master-config", cache_dir=tmp / "master-cache", join_timeout_s=120),
                on_event=said.append)
        except Exception as e:  # re-raised on the test thread below
            box["error"] = e

    thread = threading.Thread(target=master)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(isinstance(e, WaitingForDevices) for e in said) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    found = next((m for e in said if isinstance(e, WaitingForDevices) and (m := JOIN_LINE.search(str(e)))), None)
    assert found, f"the master printed no join command: {said} {box.get('error')}"
    log_path = worker_cache.parent / f"worker-{time.monotonic_ns()}.log"
    profile = tmp / "cached-profile.json"  # the ratios are fixed: a stated profile spares measuring the machine
    profile.write_text(json.dumps(device_profile("cached")))
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tpi", "join", f"127.0.0.1:{found[2]}", "--token", found[3], "--name", "cached",
             "--cache-dir", str(worker_cache), "--key-dir", str(tmp / "worker-keys"), "--threads", "1",
             "--profile-file", str(profile)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            thread.join(timeout=180)
            if "error" in box:
                raise box["error"]
            group = box["group"]
            try:
                ids = group.engine.tokenizer.encode("Once upon a time", add_bos=True, special=True)
                logits = group.engine.forward(ids, 0, all_positions=True).copy()
            finally:
                group.close()
            assert worker.wait(timeout=60) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return logits, log_path.read_text()


def transferred(log: str) -> int:
    found = TRANSFER_LINE.findall(log)
    assert len(found) == 1, f"expected one transfer line in the worker log:\n{log}"
    return int(found[0])


def test_restarted_worker_reuses_its_cached_shard_and_refetches_a_corrupt_one(tiny_gguf, tmp_path):
    model = tiny_gguf("tiny_llama_q4_0")
    worker_cache = tmp_path / "worker-cache"

    first_logits, log = serve_round(model, tmp_path, worker_cache)
    (shard,) = (worker_cache / "shards").glob("*.tpis")
    size = shard.stat().st_size
    assert transferred(log) == size > 0

    again_logits, log = serve_round(model, tmp_path, worker_cache)
    assert transferred(log) == 0 and "(cached)" in log
    np.testing.assert_array_equal(again_logits, first_logits)

    raw = bytearray(shard.read_bytes())
    raw[size // 2] ^= 0x40  # one flipped bit in the middle of the cached weights
    shard.write_bytes(bytes(raw))
    healed_logits, log = serve_round(model, tmp_path, worker_cache)
    assert "failed its content hash check" in log
    assert transferred(log) == size
    assert shard.read_bytes()[size // 2] == raw[size // 2] ^ 0x40
    np.testing.assert_array_equal(healed_logits, first_logits)
