"""`tpi join --token T` finds its master on a LAN by mDNS: real processes on a bridged LAN of namespaces.

Six hosts on one bridge (tests/netns_lan.py): master A with two short-form workers, master B with one,
a worker holding a token of no running group, and a listener that records every mDNS packet on the LAN.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_lan import LanUnavailable, lan
from test_reliability_support import TPI, device_profile, tpi_env

from tpi.master.sampler import SamplingParams
from tpi.transport import security
from tpi.transport.discovery import SERVICE_TYPE, group_id

pytestmark = pytest.mark.slow

PORT = 7610
WRONG_TOKEN_TIMEOUT_S = 8
PROMPT = [1, 17, 42, 99, 5, 250, 300, 7]
CAPTURE = """
import socket, struct, sys, time
out, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("4s4s", socket.inet_aton("224.0.0.251"),
                                                                        socket.inet_aton(sys.argv[3])))
s.settimeout(0.5)
print("ready", flush=True)
with open(out, "wb") as f:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        f.write(struct.pack("<I", len(data)) + data)
        f.flush()
"""
COMPLETE = """
import json, sys, httpx
url, prompt = sys.argv[1], json.loads(sys.argv[2])
r = httpx.post(url + "/v1/completions", json={"model": "any", "prompt": prompt, "max_tokens": 8,
                                             "temperature": 0, "ignore_eos": True}, timeout=120)
print(json.dumps(r.json()))
"""


class LanProc:
    """A tpi (or python) process inside a host namespace, its output in a log file."""

    def __init__(self, host, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        with open(log, "w") as out:
            self.popen = subprocess.Popen(host.argv(*argv), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, env=env or tpi_env())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.popen.poll() is None or needle in self.text(), f"{self.log.name} exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{needle!r} not in {self.log.name} within {timeout}s:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def records(capture: Path) -> list[bytes]:
    data, out = capture.read_bytes(), []
    while len(data) >= 4:
        n = int.from_bytes(data[:4], "little")
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def secret_forms(token: str) -> dict[str, bytes]:
    """Every spelling of the token's secret and of the master key an announcement must not carry."""
    parsed = security.parse_token(token)
    from zmq.utils import z85

    key = z85.decode(parsed.master_public)
    return {"token": token.encode(), "secret": parsed.secret, "secret hex": parsed.secret.hex().encode(),
            "secret b64": base64.urlsafe_b64encode(parsed.secret).rstrip(b"="), "master key": key,
            "master key z85": parsed.master_public, "master key hex": key.hex().encode(),
            "master key b64": base64.urlsafe_b64encode(key).rstrip(b"=")}


@pytest.fixture(scope="module")
def lan_groups(tmp_path_factory, tiny_gguf):
    """Two announced groups and a wrong-token joiner on one LAN, with every mDNS packet recorded."""
    tmp = tmp_path_factory.mktemp("discovery")
    model = tiny_gguf("tiny_qwen2_q8_0", smollm2_tokenizer=True)
    tokens = {g: security.master_token(tmp / f"config-{g}") for g in "AB"}
    wrong = security.master_token(tmp / "config-nobody")  # a master that never runs
    procs: list[LanProc] = []
    try:
        with lan(6) as hosts:
            master_a, master_b, worker_a1, worker_a2, worker_b, stranger = hosts
            capture = tmp / "mdns.bin"
            listener = subprocess.Popen(stranger.argv(sys.executable, "-c", CAPTURE, str(capture), "600", stranger.ip),
                                        stdout=subprocess.PIPE, text=True)
            assert listener.stdout.readline().strip() == "ready"

            def start(host, name: str, *args: str) -> LanProc:
                proc = LanProc(host, [*TPI, *args], tmp / f"{name}.log")
                procs.append(proc)
                return proc

            masters = {}
            for g, host, devices in (("A", master_a, "3"), ("B", master_b, "2")):
                masters[g] = start(host, f"master-{g}", "serve", str(model), "--devices", devices, "--port", str(PORT),
                                   "--api-port", "0", "--threads", "1", "--keep-all", "--config-dir",
                                   str(tmp / f"config-{g}"), "--cache-dir", str(tmp / f"cache-{g}"))
            for m in masters.values():
                m.wait_for("short form", 120)
            workers = {}
            for g, host, name in (("A", worker_a1, "a1"), ("A", worker_a2, "a2"), ("B", worker_b, "b1")):
                profile = tmp / f"{name}-profile.json"
                profile.write_text(json.dumps(device_profile(name)))
                workers[name] = start(host, name, "join", "--token", tokens[g], "--name", name, "--threads", "1",
                                      "--cache-dir", str(tmp / f"{name}-cache"), "--key-dir", str(tmp / f"{name}-keys"),
                                      "--profile-file", str(profile))
            t0 = time.monotonic()
            lost = subprocess.run(stranger.argv(*TPI, "join", "--token", wrong, "--name", "stranger",
                                                "--discover-timeout", str(WRONG_TOKEN_TIMEOUT_S),
                                                "--cache-dir", str(tmp / "stranger-cache")),
                                  capture_output=True, text=True, timeout=120, env=tpi_env())
            lost_s = time.monotonic() - t0
            for m in masters.values():
                m.wait_for("group of", 240)
            answers = {}
            for g, host in (("A", master_a), ("B", master_b)):
                url = _api_url(masters[g].text())
                out = subprocess.run(host.argv(sys.executable, "-c", COMPLETE, url, json.dumps(PROMPT)),
                                     capture_output=True, text=True, timeout=180)
                assert out.returncode == 0, out.stderr
                answers[g] = (json.loads(out.stdout), _status(host, url))
            for p in procs:
                p.stop()
            listener.terminate()
            listener.wait(20)
            yield {"tmp": tmp, "model": model, "tokens": tokens, "wrong": wrong, "lost": lost, "lost_s": lost_s,
                   "answers": answers, "masters": masters, "workers": workers, "capture": capture,
                   "hosts": hosts}
    except LanUnavailable as e:
        pytest.skip(str(e))
    finally:
        for p in procs:
            p.stop()


def _api_url(log: str) -> str:
    import re

    return re.search(r"API on (http://[\d.]+:\d+)/v1", log).group(1)


def _status(host, url: str) -> dict:
    code = f"import httpx; print(httpx.get({url + '/health'!r}, timeout=10).text)"
    out = subprocess.run(host.argv(sys.executable, "-c", code), capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def test_serve_prints_the_short_form_beside_the_explicit_one(lan_groups):
    log = lan_groups["masters"]["A"].text()
    token = lan_groups["tokens"]["A"]
    ip = lan_groups["hosts"][0].ip
    assert f"tpi join {ip}:{PORT} --token {token}" in log
    assert f"tpi join --token {token}    (short form" in log
    assert f"then: tpi join {ip}:{PORT}" in log  # the form without the token on a command line


def test_one_master_and_two_workers_discover_each_other_and_answer_as_one_device(lan_groups):
    from tpi.master import GroupOptions, start_group

    answer, status = lan_groups["answers"]["A"]
    names = {d["name"]: d["address"] for d in status["group"]["devices"]}
    hosts = lan_groups["hosts"]
    assert names == {"master": "local", "a1": hosts[2].ip, "a2": hosts[3].ip}  # over the bridge, by mDNS
    for name in ("a1", "a2"):
        assert f"found the master of group {group_id(lan_groups['tokens']['A'])[:12]} at {hosts[0].ip}:{PORT}" \
            in lan_groups["workers"][name].text()
    tmp = lan_groups["tmp"]
    single = start_group(GroupOptions(model=str(lan_groups["model"]), config_dir=tmp / "single", cache_dir=tmp / "single"))
    try:
        tokens = single.engine.generate(PROMPT, SamplingParams(temperature=0.0), 8, ignore_eos=True).tokens
        expected = single.engine.tokenizer.decode(tokens)
    finally:
        single.close()
    assert answer["choices"][0]["text"] == expected


def test_a_second_group_on_the_same_lan_stays_separate(lan_groups):
    _, status_b = lan_groups["answers"]["B"]
    assert [d["name"] for d in status_b["group"]["devices"]] == ["master", "b1"]
    _, status_a = lan_groups["answers"]["A"]
    assert "b1" not in {d["name"] for d in status_a["group"]["devices"]}
    assert "refused" not in lan_groups["masters"]["A"].text() and "refused" not in lan_groups["masters"]["B"].text()


def test_a_worker_with_a_wrong_token_finds_nothing_and_says_so_within_the_timeout(lan_groups):
    lost = lan_groups["lost"]
    assert lost.returncode != 0
    lines = [ln for ln in lost.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lost.stderr
    assert f"no tpi serve for this token answered on the LAN within {WRONG_TOKEN_TIMEOUT_S}s" in lines[0]
    assert "2 other tpi group(s) answered" in lines[0] and "Traceback" not in lost.stderr
    assert lan_groups["lost_s"] < WRONG_TOKEN_TIMEOUT_S + 30  # the timeout plus process start, not a hang


def test_announcements_carry_the_group_id_and_nothing_secret(lan_groups):
    packets = records(lan_groups["capture"])
    blob = b"".join(packets)
    assert SERVICE_TYPE.split(".")[0].encode() in blob  # the capture did record the announcements
    for g, token in lan_groups["tokens"].items():
        assert group_id(token).encode() in blob, f"group {g}'s id was never announced"
        for what, value in secret_forms(token).items():
            assert value not in blob, f"group {g}'s {what} appears in an mDNS packet"
    for what, value in secret_forms(lan_groups["wrong"]).items():
        assert value not in blob, f"the stranger's {what} appears in an mDNS packet"
    print(f"{len(packets)} mDNS packets, {len(blob)} bytes recorded")
