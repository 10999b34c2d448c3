"""Master and worker on two "hosts": network namespaces joined by a veth pair, with link delay.

The master runs in namespace M on 10.x.y.1; the worker and a userspace delay proxy run in
namespace W (10.x.y.2). The worker reaches the master only through the proxy (127.0.0.1 inside
W), which forwards both the control port and the data port (port+1) across the veth with a
fixed one-way delay, as netem would. Needs root for `ip netns`; skipped otherwise.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_reliability_support import device_profile

from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
from tpi.transport import security

pytestmark = pytest.mark.slow

PORT = 7610
ONE_WAY_DELAY_S = 0.002
PROMPT = "Once upon a time"
TESTS_DIR = Path(__file__).parent

MASTER = """
import json, sys
from pathlib import Path
import numpy as np
from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
model, host, port, config_dir, cache_dir, out, prompt = sys.argv[1:]
group = start_group(GroupOptions(model=model, devices=2, ratios=(0.5, 0.5), host=host, port=int(port),
                                 threads=1, config_dir=Path(config_dir), cache_dir=Path(cache_dir), join_timeout_s=120),
                    on_event=lambda e: print(e, file=sys.stderr, flush=True))
try:
    e = group.engine
    ids = e.tokenizer.encode(prompt, add_bos=True, special=True)
    logits = e.forward(ids, 0, all_positions=True)
    e.reset()
    gen = e.generate(ids, SamplingParams(temperature=0.0), 8, ignore_eos=True)
    np.save(out + ".npy", logits)
    Path(out + ".json").write_text(json.dumps({"tokens": gen.tokens, "status": group.status(),
                                               "decode_s_per_token": gen.decode_s / max(1, gen.decode_tokens)}))
finally:
    group.close()
"""

PROXY = """
import sys, time
sys.path.insert(0, sys.argv[1])
from netproxy import DelayProxy
port, target, delay = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
proxies = [DelayProxy(p, target, p, delay).start() for p in (port, port + 1)]  # control, data
print("ready", flush=True)
time.sleep(3600)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """(master_ns, worker_ns, master_ip, worker_ip): two namespaces on a private /30 veth link, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); run the suite as root to cover separate hosts")
    tag = secrets.token_hex(3)
    master_ns, worker_ns = f"tpi-m-{tag}", f"tpi-w-{tag}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.{4 * secrets.randbelow(60)}"
    base = subnet.rpartition(".")
    master_ip, worker_ip = f"{base[0]}.{int(base[2]) + 1}", f"{base[0]}.{int(base[2]) + 2}"
    made: list[str] = []
    try:
        for ns in (master_ns, worker_ns):
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", f"tm{tag}", "type", "veth", "peer", "name", f"tw{tag}")
        ip("link", "set", f"tm{tag}", "netns", master_ns)
        ip("link", "set", f"tw{tag}", "netns", worker_ns)
        for ns, dev, addr in ((master_ns, f"tm{tag}", master_ip), (worker_ns, f"tw{tag}", worker_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.SubprocessError, OSError) as e:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"tm{tag}"], capture_output=True)  # if the move failed
        detail = getattr(e, "stderr", "") or e
        pytest.skip(f"cannot build two network namespaces joined by veth here: {detail}")
    yield master_ns, worker_ns, master_ip, worker_ip
    for ns in made:  # deleting a namespace destroys its end of the veth pair, and so the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_master_and_worker_in_two_namespaces_through_a_delayed_link(two_hosts, tiny_gguf, tmp_path):
    master_ns, worker_ns, master_ip, worker_ip = two_hosts
    model = tiny_gguf("tiny_qwen2_q8_0", smollm2_tokenizer=True)
    config_dir = tmp_path / "master-config"
    token = security.master_token(config_dir)
    out = tmp_path / "result"
    procs: list[subprocess.Popen] = []

    def start(ns: str, *argv: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *argv], stdin=subprocess.DEVNULL, **kw)
        procs.append(p)
        return p

    try:
        proxy = start(worker_ns, "-c", PROXY, str(TESTS_DIR), str(PORT), master_ip, str(ONE_WAY_DELAY_S),
                      stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().strip() == "ready"
        master_log = tmp_path / "master.log"
        with open(master_log, "w") as log_file:
            master = start(master_ns, "-c", MASTER, str(model), master_ip, str(PORT), str(config_dir),
                           str(tmp_path / "master-cache"), str(out), PROMPT, stderr=log_file)
        # Start the worker once the master listens: a connection the proxy cannot forward yet is
        # closed mid-handshake, which the worker takes as a failed CURVE handshake and gives up.
        deadline = time.monotonic() + 120
        while "tpi join" not in master_log.read_text() and master.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        profile = tmp_path / "far-profile.json"  # the ratios are fixed: a stated profile spares measuring
        profile.write_text(json.dumps(device_profile("far")))
        worker = start(worker_ns, "-m", "tpi", "join", f"127.0.0.1:{PORT}", "--token", token, "--name", "far",
                       "--cache-dir", str(tmp_path / "worker-cache"), "--key-dir", str(tmp_path / "worker-keys"),
                       "--threads", "1", "--profile-file", str(profile))
        assert master.wait(timeout=240) == 0, master_log.read_text()
        assert worker.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    result = json.loads(out.with_suffix(".json").read_text())
    far = result["status"]["devices"][1]
    assert far["name"] == "far" and far["address"] == worker_ip  # across the veth, not loopback
    print(f"worker seen at {far['address']}; {result['decode_s_per_token'] * 1e3:.1f} ms/token "
          f"at {ONE_WAY_DELAY_S * 1e3:.0f} ms one-way")

    single = start_group(GroupOptions(model=str(model), config_dir=tmp_path / "single", cache_dir=tmp_path / "single"))
    try:
        ids = single.engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
        ref = single.engine.forward(ids, 0, all_positions=True)
        single.engine.reset()
        ref_tokens = single.engine.generate(ids, SamplingParams(temperature=0.0), 8, ignore_eos=True).tokens
    finally:
        single.close()
    got = np.load(out.with_suffix(".npy"))
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] >= 0.9995
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert result["tokens"] == ref_tokens
