"""A master restarted quickly: the admitted worker learns from the new master's refusals that
it was forgotten, and rejoins at once instead of waiting for a heartbeat timeout.

Real processes on loopback: `tpi serve --devices 2` and one `tpi join` worker. The heartbeat
timeout is 60 s, far longer than the test may wait, so the worker cannot notice the restart
by silence: a new master on the same port answers the old worker's heartbeats with Refuse,
and only that can send the worker back through its rejoin path.
"""
from __future__ import annotations

import re

import pytest
from test_reliability_support import api_url, complete, free_port_pair, join, serve, wait_healthy

from tpi.transport.security import master_token

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
HEARTBEAT_TIMEOUT = "60"  # never reached here: only the refusals can tell the worker


def test_worker_rejoins_a_master_restarted_within_the_heartbeat_timeout(tiny_llama_q4_0, tmp_path):
    port = free_port_pair()
    token = master_token(tmp_path / "master-config")  # the master loads these keys: the same token
    args = ("--devices", "2", "--port", str(port), "--heartbeat-timeout", HEARTBEAT_TIMEOUT, "--keep-all")
    first = serve(tiny_llama_q4_0, tmp_path, "master-first", *args)
    worker = join(port, token, tmp_path, "steady", "--reconnect-timeout", "60")
    second = None
    try:
        url = api_url(first)
        wait_healthy(url, first, timeout=60)
        before = complete(url, PROMPT)
        assert before.status_code == 200, before.text

        first.kill9()
        second = serve(tiny_llama_q4_0, tmp_path, "master-second", *args)  # at once, same port and keys
        url = api_url(second)
        health = wait_healthy(url, second, timeout=40)
        assert [d["name"] for d in health["group"]["devices"]] == ["master", "steady"], health
        after = complete(url, PROMPT)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]

        text = worker.text()
        assert "master silent" not in text, text  # it did not wait for the timeout
        assert "the master no longer knows this device (it restarted?)" in text, text
        assert text.count("joined as rank 1 of 2") == 2, text
        transfers = re.findall(r"shard: (\d+) bytes transferred", text)
        assert len(transfers) == 2 and transfers[1] == "0", text  # the rejoin refetched nothing
        assert "refused" not in second.text().split("admitted steady")[-1], second.text()  # no refusals after

        second.stop()
        assert worker.popen.wait(timeout=30) == 0, worker.text()
        assert "Traceback" not in worker.text()
    finally:
        for proc in (first, second, worker):
            if proc is not None:
                proc.kill9()
