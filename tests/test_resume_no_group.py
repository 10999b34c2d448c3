"""When no group can be formed after a loss, the paused request fails cleanly within the stated bound.

Rank 0 (this process) offers too little memory for the whole model (its profile says 56 MB free) and
its one worker (a real `tpi join` process, not a local worker: nobody restarts it) is killed -9
mid-answer. The master waits the rejoin timeout (1 s), tries to re-plan over itself alone, cannot, and
degrades: the request ends with GroupUnavailableError naming why, well within GroupOptions.resume_bound_s,
and the service keeps answering (503) instead of hanging.
"""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from test_reliability_support import device_profile, free_port_pair, join

from tpi.errors import GroupUnavailableError
from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
from tpi.serve.api import create_app
from tpi.serve.service import GenerationRequest, GenerationService
from tpi.transport.keeper import LinkSettings
from tpi.transport.security import master_token

pytestmark = pytest.mark.slow

HANG_S = 60.0  # a hang guard only


def test_no_group_can_be_formed_the_request_fails_cleanly_within_the_bound(smollm2, tmp_path):
    port = free_port_pair()
    token = master_token(tmp_path / "master-config")
    # 56 MB: half of SmolLM2 at a 512-token context fits, the whole does not (the planner needs ~65 MB).
    small = dict(device_profile("master"), free_memory_bytes=56 << 20, total_memory_bytes=56 << 20,
                 runtime_bytes=10 << 20)
    opts = GroupOptions(model=str(smollm2), devices=2, ratios=(0.5, 0.5), always_plan=True, host="127.0.0.1",
                        port=port, threads=1, context=512, config_dir=tmp_path / "master-config", cache_dir=tmp_path / "cache",
                        join_timeout_s=120, profile=small, wire_dtype="f32",
                        link_settings=LinkSettings(heartbeat_s=0.5, timeout_s=2.0), rejoin_timeout_s=1.0)
    box: dict = {}
    former = threading.Thread(target=lambda: box.update(group=start_group(opts, on_event=lambda e: None)))
    former.start()
    worker = join(port, token, tmp_path, "w1")
    former.join(timeout=180)
    group = box["group"]
    service = GenerationService(group.engine, status=group.status, queue_size=4)
    try:
        ids = group.engine.tokenizer.encode("Tell me about the sea.", add_bos=True, special=True)
        ticket = service.submit(GenerationRequest(tuple(ids), SamplingParams(temperature=0.0), 200, ignore_eos=True))
        assert ticket.events.get(timeout=60).kind == "text"
        killed = time.monotonic()
        worker.kill9()
        with pytest.raises(GroupUnavailableError) as failed:
            ticket.result(timeout=HANG_S)
        took = time.monotonic() - killed
        print(f"\nno group can be formed: the request failed {took:.2f}s after the kill (bound "
              f"{opts.resume_bound_s:.0f}s): {failed.value}")
        assert "the group cannot re-form (lost w1" in str(failed.value) and "is too small" in str(failed.value)
        assert group.state == "degraded" and took < opts.resume_bound_s
        api = TestClient(create_app(service))
        refused = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert refused.status_code == 503 and "could not re-plan" in refused.json()["error"]["message"]
        assert api.get("/health").json()["status"] == "degraded"
    finally:
        service.close()
        group.close()
        worker.kill9()
