"""Security of a whole group: real `tpi serve` and `tpi join` processes on loopback.

* Devices with a wrong token (another secret, another master's token, no token) cannot join
  while a group forms: they exit non-zero with one clear line, write no shard, and the master
  logs the refusal with the peer's address; the group forms with the legitimate device.
* `tpi token rotate` on a serving group: the admitted device keeps serving and, once the master
  restarts with the rotated secret, rejoins with its old token; newcomers need the new token.
* Nothing in clear: both channels of a worker run through recording proxies; with CURVE no
  prompt, weight or activation bytes appear, with `--insecure` the weight and activation
  bytes do (so the check can fail).
"""
from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from netproxy import DelayProxy
from test_reliability_support import TPI, api_url, complete, free_port_pair, join, serve, tpi_env, wait_healthy

from tpi.scheduler.store import ShardStore
from tpi.transport import security

pytestmark = pytest.mark.slow

PROMPT = "The zanzibar heron counts seventeen violet lanterns"
HEARTBEAT = "2"


def exited_with(proc, timeout: float = 90) -> tuple[int, str]:
    """(exit code, last log line) of a process expected to give up on its own."""
    code = proc.popen.wait(timeout=timeout)
    lines = proc.text().strip().splitlines()
    return code, lines[-1] if lines else ""


def shard_files(tmp: Path, name: str) -> list[Path]:
    """Every file under a worker's shard cache (complete or partial)."""
    root = tmp / f"{name}-cache" / "shards"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture(scope="module")
def token_group(tiny_llama_q4_0, tmp_path_factory):
    """A `tpi serve --devices 2` waiting for its worker; tests add devices and read the logs."""
    tmp = tmp_path_factory.mktemp("token-group")
    port = free_port_pair()
    token = security.master_token(tmp / "master-config")  # the master loads these keys: same token
    group = SimpleNamespace(tmp=tmp, port=port, token=token, model=tiny_llama_q4_0, procs=[])
    group.master = serve(tiny_llama_q4_0, tmp, "master", "--devices", "2", "--port", str(port),
                         "--heartbeat-timeout", HEARTBEAT, "--keep-all")
    group.procs.append(group.master)
    group.url = api_url(group.master)
    group.master.wait_for(r"tpi join", 120)  # the control port listens
    yield group
    for proc in group.procs:
        proc.kill9()


def start_worker(group, token: str, name: str, *args: str):
    proc = join(group.port, token, group.tmp, name, *args)
    group.procs.append(proc)
    return proc


def formed(group) -> str:
    """Let the legitimate worker join (once) and return the group's greedy answer to PROMPT."""
    if getattr(group, "answer", None) is None:
        group.worker = start_worker(group, group.token, "legit", "--reconnect-timeout", "120")
        health = wait_healthy(group.url, group.master)
        assert [d["name"] for d in health["group"]["devices"]] == ["master", "legit"], health
        reply = complete(group.url, PROMPT)
        assert reply.status_code == 200, reply.text
        group.answer = reply.json()["choices"][0]["text"]
    return group.answer


def test_devices_without_the_right_token_cannot_join_a_forming_group(token_group):
    g = token_group
    master_key = security.parse_token(g.token).master_public
    wrong_secret = security.make_token(master_key, secrets.token_bytes(security.SECRET_BYTES))
    other_master = security.master_token(g.tmp / "other-master")
    impostors = {"wrong-secret": start_worker(g, wrong_secret, "wrong-secret"),
                 "other-master": start_worker(g, other_master, "other-master"),
                 "no-token": start_worker(g, "", "no-token")}
    expected = {
        "wrong-secret": r"error: .*master refused this device: wrong join token: use the token printed by the "
                        r"current tpi serve",
        "other-master": rf"error: .*encrypted handshake with 127\.0\.0\.1:{g.port} failed .*the token belongs to "
                        r"another master",
        "no-token": r"error: no join token; pass the token tpi serve printed with --token, TPI_TOKEN or --token-file",
    }
    for name, proc in impostors.items():
        code, last = exited_with(proc)
        assert code != 0 and re.search(expected[name], last), f"{name}: exit {code}, last line {last!r}\n{proc.text()}"
        assert "Traceback" not in proc.text(), proc.text()
        assert shard_files(g.tmp, name) == [], f"{name} wrote shard bytes"

    log = g.master.text()
    # The master names the refusal and the peer's address; the other master's token never gets
    # past the CURVE handshake (the worker encrypts to a key the master does not hold).
    assert re.search(r"refused device 'wrong-secret' from 127\.0\.0\.1: wrong join token", log), log
    assert "device joined" not in log  # none of them was admitted, so no shard and no step reached them

    assert formed(g)  # the legitimate device still forms the group and it answers
    log = g.master.text()
    assert log.count("device joined") == 1 and "legit" in log
    assert len(shard_files(g.tmp, "legit")) == 1


def test_rotated_token_keeps_the_admitted_device_serving(token_group):
    g = token_group
    before = formed(g)
    rotated = subprocess.run(TPI + ["token", "rotate", "--config-dir", str(g.tmp / "master-config")],
                             capture_output=True, text=True, timeout=60, env=tpi_env())
    assert rotated.returncode == 0, rotated.stderr
    new_token = rotated.stdout.strip()
    assert new_token != g.token
    assert security.parse_token(new_token).master_public == security.parse_token(g.token).master_public
    g.new_token = new_token

    again = complete(g.url, PROMPT)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == before, again.text
    assert g.worker.alive(), g.worker.text()


def test_rotated_token_applies_to_newcomers_of_the_running_master(token_group):
    g = token_group
    formed(g)
    if getattr(g, "new_token", None) is None:
        g.new_token = security.rotate_token(g.tmp / "master-config")
    # The group is full and serving: a newcomer whose token passes is refused as "already full",
    # one whose token fails as "wrong join token". That tells the two checks apart.
    with_old = start_worker(g, g.token, "late-old")
    with_new = start_worker(g, g.new_token, "late-new")
    _, old_last = exited_with(with_old)
    _, new_last = exited_with(with_new)
    assert "wrong join token" in old_last, old_last
    assert "group already full" in new_last, new_last


def test_restarted_master_takes_back_the_admitted_device_and_only_new_tokens(token_group):
    g = token_group
    before = formed(g)
    if getattr(g, "new_token", None) is None:
        g.new_token = security.rotate_token(g.tmp / "master-config")
    g.master.kill9()
    # Restarted at once, often within the heartbeat timeout: the worker then learns of the restart
    # from the new master's refusals of its heartbeats (tests/test_reliability_master_restart.py).
    # Same port, same config dir: the master now holds the rotated secret. The old worker keeps
    # its old token and reconnects on its own; it gets in because its key was admitted before.
    g.master = serve(g.model, g.tmp, "master-rotated", "--devices", "3", "--port", str(g.port),
                     "--heartbeat-timeout", HEARTBEAT, "--keep-all")
    g.procs.append(g.master)
    g.url = api_url(g.master)
    g.master.wait_for(r"tpi join", 120)
    assert g.new_token in g.master.text()  # it prints the rotated token
    stranger = start_worker(g, g.token, "stranger-old-token")
    code, last = exited_with(stranger)
    assert code != 0 and "wrong join token" in last, stranger.text()
    assert shard_files(g.tmp, "stranger-old-token") == []
    assert re.search(r"refused device 'stranger-old-token' from 127\.0\.0\.1: wrong join token", g.master.text())

    start_worker(g, g.new_token, "newcomer")
    health = wait_healthy(g.url, g.master)
    assert sorted(d["name"] for d in health["group"]["devices"]) == ["legit", "master", "newcomer"], health
    assert g.worker.alive() and "joined as rank" in g.worker.text()
    reply = complete(g.url, PROMPT)
    assert reply.status_code == 200, reply.text
    assert g.worker.text().count("joined as rank") == 2


# -- nothing in clear --------------------------------------------------------------------------

def weight_witness(shard: Path) -> bytes:
    """32 bytes from the middle of the largest weight array in a worker's shard."""
    with ShardStore.open(shard) as store:
        arrays = [a for key in store.keys() for t in store.load(key).values()
                  for a in (t.arrays.values() if hasattr(t, "arrays") else [t])]
    raw = max(arrays, key=lambda a: a.nbytes).tobytes()
    return raw[len(raw) // 2: len(raw) // 2 + 32]


def activation_witnesses(model: Path, prompt: str) -> list[bytes]:
    """The f32 embedding row of each prompt token: what the master broadcasts to start the prefill step.

    Computed here from the model file by tpi's own loader (its q4g32 embedding, not llama.cpp's
    Q4_0 values), tokenized by llama.cpp as the master does; nothing is taken from the wire.
    """
    import llama_cpp

    from tpi.formats import open_model
    from tpi.quant.formats import dequantize, take_rows

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    ids = vocab.tokenize(prompt.encode(), add_bos=True, special=True)[1:]  # BOS starts every request
    rows = dequantize(take_rows(open_model(model).load("embed"), np.asarray(ids, dtype=np.int64)))
    return [np.ascontiguousarray(r, dtype=np.float32).tobytes() for r in rows]


@pytest.mark.parametrize("insecure", [False, True], ids=["curve", "insecure"])
def test_nothing_in_clear_on_the_wire_unless_insecure(tiny_llama_q4_0, tmp_path, insecure):
    flag = ("--insecure",) if insecure else ()
    port = free_port_pair()
    control_bytes: list = []
    data_bytes: list = []
    procs = []
    with DelayProxy(0, "127.0.0.1", port, 0.0, control_bytes) as control, \
            DelayProxy(0, "127.0.0.1", port + 1, 0.0, data_bytes) as data:
        try:
            master = serve(tiny_llama_q4_0, tmp_path, "master", "--devices", "2", "--port", str(port),
                           "--wire-dtype", "f32", "--keep-all", *flag)
            procs.append(master)
            url = api_url(master)
            master.wait_for(r"tpi join", 120)
            token = security.master_token(tmp_path / "master-config")  # written by serve before it prints
            procs.append(join(control.port, token, tmp_path, "proxied", "--data-endpoint", f"127.0.0.1:{data.port}",
                              *flag))
            wait_healthy(url, master)
            reply = complete(url, PROMPT, max_tokens=4)
            assert reply.status_code == 200, reply.text
        finally:
            for proc in procs:
                proc.kill9()
        wires = {"control": control.recorded(), "data": data.recorded()}

    assert all(len(w) > 0 for w in wires.values())  # both channels went through the proxies
    (shard,) = shard_files(tmp_path, "proxied")
    weight = weight_witness(shard)
    activations = activation_witnesses(tiny_llama_q4_0, PROMPT)
    seen = {name: {"prompt": PROMPT.encode() in w or b"zanzibar" in w,
                   "weight": weight in w,
                   "activations": sum(a in w for a in activations)} for name, w in wires.items()}
    print(f"{'insecure' if insecure else 'curve'}: recorded control {len(wires['control'])} B, "
          f"data {len(wires['data'])} B; found {seen}")
    assert not any(s["prompt"] for s in seen.values())  # the master tokenizes: text never travels
    assert not any(security.parse_token(token).secret in w for w in wires.values())  # only its HMAC travels
    if insecure:
        assert seen["control"]["weight"]  # the shard went over the control channel in clear
        assert seen["data"]["activations"] == len(activations)  # the prefill step's embeddings
    else:
        assert not any(s["weight"] or s["activations"] for s in seen.values())
