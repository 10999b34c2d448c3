"""Master loss: workers notice a killed master within the heartbeat timeout, reconnect with
backoff, rejoin a master that comes back, and exit with one line when it does not.

Real processes on loopback: `tpi serve` (the master, 3 devices) and two `tpi join` workers
with a 2 s heartbeat timeout. The master is killed with SIGKILL. The worker with a 3 s
reconnect window gives up with exit code 1 and a one-line error; the patient one (90 s) joins
a new master started on the same port with the same keys, which then answers a request.
"""
from __future__ import annotations

import re

import pytest
from test_reliability_support import api_url, complete, free_port_pair, join, serve, wait_healthy

from tpi.transport.security import master_token

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


def test_workers_rejoin_a_restarted_master_or_exit_cleanly_when_it_stays_down(tiny_llama_q4_0, tmp_path):
    port = free_port_pair()
    token = master_token(tmp_path / "master-config")  # the master loads the same keys: the same token
    first = serve(tiny_llama_q4_0, tmp_path, "master-first", "--devices", "3", "--port", str(port),
                  "--heartbeat-timeout", "2", "--keep-all")
    patient = join(port, token, tmp_path, "patient", "--reconnect-timeout", "90")
    hasty = join(port, token, tmp_path, "hasty", "--reconnect-timeout", "3")
    second = None
    try:
        url = api_url(first)
        wait_healthy(url, first)
        before = complete(url, PROMPT)
        assert before.status_code == 200, before.text

        first.kill9()
        # The hasty worker notices within the 2 s timeout, retries for 3 s, then leaves with one line.
        assert hasty.popen.wait(timeout=60) == 1
        log = hasty.text()
        assert "Traceback" not in log, log
        last = log.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: lost the master at 127\.0\.0\.1:{port} \(master silent for 2\.\d+s\) and it "
                            r"did not come back within 3s; run tpi join again once tpi serve is running", last), log
        assert patient.alive(), patient.text()

        # Same port, same keys: the patient worker finds the new master and joins it.
        second = serve(tiny_llama_q4_0, tmp_path, "master-second", "--devices", "2", "--port", str(port),
                       "--heartbeat-timeout", "2", "--keep-all")
        url = api_url(second)
        health = wait_healthy(url, second)
        assert [d["name"] for d in health["group"]["devices"]] == ["master", "patient"]
        after = complete(url, PROMPT)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 8, after.text
        text = patient.text()
        assert "lost the master" in text and "trying to reach the master" in text
        assert text.count("joined as rank") == 2 and "joined as rank 1 of 2" in text

        second.stop()
        assert patient.popen.wait(timeout=30) == 0, patient.text()  # a master that stops the group: exit 0
        assert "Traceback" not in patient.text()
    finally:
        for proc in (first, second, patient, hasty):
            if proc is not None:
                proc.kill9()
