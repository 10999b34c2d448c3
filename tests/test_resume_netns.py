"""A remote worker in its own network namespace vanishes without a FIN (its veth link goes down): the
answer pauses and then goes on, identical to the undisturbed run.

The master runs in this process, in the root namespace, on one end of a veth pair; the worker (a real
`tpi join` process) runs in namespace resume-w-TAG on the other end. Mid-answer the worker's link is
taken down: no FIN, no RST, the connection just goes silent, so only the heartbeat timeout (2 s here)
can notice it. The link comes back after HOLD_S (a device that dropped off Wi-Fi and returned): the
worker notices its master went silent, reconnects, rejoins its rank from its shard cache, and the
request resumes. Pause <= heartbeat timeout + the rejoin; the text equals the undisturbed run's.
Needs root for `ip netns`; skipped otherwise (with the reason).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest
from netns_lan import ip
from test_reliability_support import device_profile, tpi_env
from test_resume_local import Stream, timeline

from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
from tpi.serve.service import GenerationService
from tpi.transport.keeper import LinkSettings
from tpi.transport.security import master_token

pytestmark = pytest.mark.slow

PORT = 7741
TIMEOUT_S = 2.0  # heartbeat timeout of the group
HOLD_S = 3.0  # how long the worker's link stays down: past the heartbeat timeout
HANG_S = 60.0


@pytest.fixture
def far_host():
    """(namespace, its veth end, master ip, worker ip): a namespace on a /30 veth link from the root one."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); run the suite as root to cover a vanishing host")
    tag = secrets.token_hex(3)
    ns, here, there = f"resume-w-{tag}", f"rsm{tag}m", f"rsm{tag}w"
    base = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    last = 4 * secrets.randbelow(60)
    master_ip, worker_ip = f"{base}.{last + 1}", f"{base}.{last + 2}"
    try:
        ip("netns", "add", ns)
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{master_ip}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("-n", ns, "addr", "add", f"{worker_ip}/30", "dev", there)
        ip("-n", ns, "link", "set", there, "up")
        ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.SubprocessError, OSError) as e:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        pytest.skip(f"cannot build a network namespace on a veth link here: {getattr(e, 'stderr', '') or e}")
    try:
        yield ns, there, master_ip, worker_ip
    finally:  # deleting the namespace destroys its veth end, and so the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


def test_a_remote_worker_vanishing_without_a_fin_costs_a_pause(far_host, smollm2, tmp_path):
    ns, dev, master_ip, _ = far_host
    port = PORT + secrets.randbelow(200) * 2
    token = master_token(tmp_path / "master-config")
    opts = GroupOptions(model=str(smollm2), devices=2, ratios=(0.5, 0.5), host=master_ip, port=port, threads=1,
                        config_dir=tmp_path / "master-config", cache_dir=tmp_path / "cache", join_timeout_s=120,
                        profile=device_profile("master"), wire_dtype="f32",
                        link_settings=LinkSettings(heartbeat_s=0.5, timeout_s=TIMEOUT_S), rejoin_timeout_s=30)
    box: dict = {}
    former = threading.Thread(target=lambda: box.update(group=start_group(opts, on_event=lambda e: None)))
    former.start()
    profile = tmp_path / "far-profile.json"
    profile.write_text(json.dumps(device_profile("far")))
    with open(tmp_path / "far.log", "w") as log:
        worker = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tpi", "join", f"{master_ip}:{port}", "--name", "far",
             "--cache-dir", str(tmp_path / "far-cache"), "--key-dir", str(tmp_path / "far-keys"), "--threads", "1",
             "--profile-file", str(profile)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=tpi_env() | {"TPI_TOKEN": token})
    former.join(timeout=180)
    group = box["group"]
    service = GenerationService(group.engine, status=group.status, queue_size=4)
    try:
        ids = group.engine.tokenizer.encode("Write a long story about a lighthouse keeper and the sea.",
                                            add_bos=True, special=True)
        greedy = SamplingParams(temperature=0.0)
        reference = Stream(service, ids, greedy).wait()

        def vanish() -> None:  # link down now, up again HOLD_S later (from another thread)
            ip("-n", ns, "link", "set", dev, "down")
            threading.Timer(HOLD_S, ip, ("-n", ns, "link", "set", dev, "up")).start()

        stream = Stream(service, ids, greedy, kill_at=[60], kill=vanish)
        gen = stream.wait(HANG_S * 3)
        (pause,) = stream.pauses()
        print(f"\nworker link down (no FIN) for {HOLD_S:.0f}s at token 60: stream paused {pause:.2f}s "
              f"(heartbeat timeout {TIMEOUT_S:.0f}s); {timeline(group, stream.killed_at[0])}")
        assert gen.text == reference.text and len(gen.pauses) == 1
        assert "silent" in gen.pauses[0]["cause"] or "connection closed" in gen.pauses[0]["cause"]
        assert pause < HANG_S
    finally:
        service.close()
        group.close()
        worker.kill()
        worker.wait(timeout=30)
