"""Hostile input against a running group: more than 10,000 malformed, truncated, oversized and
wrongly typed messages, then the group still answers the same greedy tokens.

The group (CURVE on, 1 MiB maximum frame): the master in this process, a `tpi join` worker
process, and an in-process worker that is admitted but hostile: before each of its partial sums
it sends garbage on its data channel, which is how hostile bytes reach the master's data decoder
(an unadmitted socket never completes the data channel's handshake, checked here too).

Where each batch goes, and what reaches a decoder:
* master control ROUTER: a CURVE socket that knows the master's public key but holds no token
  (anyone may handshake there; the token decides admission) -> every message decoded and dropped
  or answered with Refuse; plus raw TCP junk that never gets past the ZMTP greeting,
* master data ROUTER: the hostile admitted worker -> decoded and dropped; an unadmitted CURVE
  socket -> refused at the handshake, nothing delivered,
* the worker process, both channels: sent through the master's own sockets (the worker listens on
  nothing, and only the master it is paired with can reach it) -> decoded and dropped.
"""
from __future__ import annotations

import socket
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message
from test_reliability_support import device_profile, free_port_pair, join

from tpi.errors import ProtocolError
from tpi.master import GroupOptions, start_group
from tpi.master.sampler import SamplingParams
from tpi.scheduler.store import verified_content_hash
from tpi.transport import protocol as p
from tpi.transport import security
from tpi.transport.keeper import LinkSettings
from tpi.transport.worker_link import WorkerLink
from tpi.worker import SHARD_SUFFIX, WorkerOptions, _load_model, _serve_steps

pytestmark = pytest.mark.slow

MAX_FRAME = 1 << 20
PROMPT = "Once upon a time"
VALID = [
    p.Hello("fuzz", {"cores": 2}, ["ab" * 32], b"\x01" * 32),
    p.ShardRequest("f" * 64, 0, 4096, False),
    p.ShardChunk("f" * 64, 8, 5, 1234, np.frombuffer(b"hello", np.uint8)),
    p.Ready(),
    p.Partial(4, np.ones((1, 128), np.float32), seq=9),
    p.Reduced(4, np.ones((1, 128), np.float32), seq=9),
    p.Logits(5, np.arange(10, dtype=np.uint16), seq=9),
    p.Step(7, 0, [0], [12], [1], [1], np.ones((1, 128), np.float32), seq=9),
    p.Heartbeat(),
    p.Stop("bye"),
]


def garbage(rng: np.random.Generator, oversize: bool):
    """Endless multipart messages that protocol.decode must refuse (checked before they are sent)."""
    while True:
        kind = rng.integers(6 if oversize else 5)
        base = [bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in p.encode(VALID[rng.integers(len(VALID))])]
        if kind == 0:  # random bytes
            frames = [rng.bytes(int(rng.integers(0, 300))) for _ in range(int(rng.integers(1, 4)))]
        elif kind == 1:  # truncated header or buffer
            i = int(rng.integers(len(base)))
            frames = base[:i] + [base[i][: int(rng.integers(0, max(1, len(base[i]))))]] + base[i + 1:]
        elif kind == 2:  # one flipped byte in the header
            head = bytearray(base[0])
            head[int(rng.integers(len(head)))] ^= int(rng.integers(1, 256))
            frames = [bytes(head), *base[1:]]
        elif kind == 3:  # well-formed msgpack, wrongly typed: fields, type code, version, dtype, shape
            version, code, seq, values, descs = msgpack.unpackb(base[0])
            choice = rng.integers(5)
            if choice == 0:
                values = [[v] if not isinstance(v, list) else "x" for v in values] or [1]
            elif choice == 1:
                code = int(rng.choice([0, 99, -1, 2**40]))
            elif choice == 2:
                version = int(rng.choice([0, 2, 255]))
            elif choice == 3:
                descs = [["c64", [3]]] if not descs else [[d[0], [d[1][0] + 1] if d[1] else [7]] for d in descs]
            else:
                seq = "seq"
            frames = [msgpack.packb([version, code, seq, values, descs]), *base[1:]]
        elif kind == 4:  # extra or missing buffer frames
            frames = base + [rng.bytes(16)] if rng.integers(2) else base[:1] + [b""] * 3
        else:  # oversized: past the maximum frame, still under libzmq's MAXMSGSIZE: dropped by decode
            frames = [base[0], bytes(MAX_FRAME + int(rng.integers(1, 60_000)))]
        try:
            p.decode(frames, MAX_FRAME)
        except ProtocolError:
            yield frames


def hostile_worker(port: int, token: str, tmp, rng, counts: dict, box: dict) -> None:
    """An admitted worker that computes its share correctly but sends garbage before every partial."""
    opts = WorkerOptions(master=f"127.0.0.1:{port}", token=token, name="hostile", cache_dir=tmp / "hostile-cache",
                         key_dir=tmp / "hostile-keys", threads=1)
    link = WorkerLink(opts.master, token, opts.key_dir, settings=LinkSettings(max_frame=MAX_FRAME))
    try:
        assign = link.join(opts.name, device_profile("hostile"), [])
        dest = opts.cache_dir / f"{assign.shard_hash}{SHARD_SUFFIX}"
        link.fetch_shard(dest, assign.shard_hash, assign.shard_size, verified_content_hash)
        model, _ = _load_model(dest, assign, opts)
        comm = link.communicator()
        junk = garbage(rng, oversize=False)
        sock = link.data_socket()
        real_allreduce = comm.allreduce

        def allreduce(x):
            for _ in range(40):
                sock.send_multipart(next(junk))
                counts["master data (admitted peer)"] += 1
            return real_allreduce(x)

        comm.allreduce = allreduce
        model.comm = comm
        box["steps"] = _serve_steps(model, comm, link.master_lost)
    except Exception as e:  # reported on the test thread
        box["error"] = e
    finally:
        link.close()


def curve_socket(ctx: zmq.Context, token: str, keys, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 100_000
    security.configure_client(sock, security.load_or_create_keypair(keys, "device"),
                              security.parse_token(token).master_public)
    sock.connect(endpoint)
    return sock


def test_ten_thousand_hostile_messages_leave_master_and_workers_serving_the_same_tokens(
        tiny_llama_q4_0, tmp_path, caplog):
    rng = np.random.default_rng(7)
    port = free_port_pair()
    token = security.master_token(tmp_path / "master-config")
    opts = GroupOptions(model=str(tiny_llama_q4_0), devices=3, ratios=(0.34, 0.33, 0.33), host="127.0.0.1",
                        port=port, threads=1, wire_dtype="f32", config_dir=tmp_path / "master-config",
                        cache_dir=tmp_path / "master-cache", join_timeout_s=120, profile=device_profile("master"),
                        link_settings=LinkSettings(max_frame=MAX_FRAME))
    counts = {k: 0 for k in ("master control (CURVE, no token)", "master data (admitted peer)",
                             "master data (unadmitted, refused at handshake)", "worker control", "worker data",
                             "raw TCP connections of junk", "master control past MAXMSGSIZE (disconnected)")}
    box, hostile_box = {}, {}
    former = threading.Thread(target=lambda: box.update(group=start_group(opts, on_event=lambda e: None)))
    former.start()
    worker = join(port, token, tmp_path, "honest")
    hostile = threading.Thread(target=hostile_worker, args=(port, token, tmp_path, rng, counts, hostile_box))
    hostile.start()
    former.join(timeout=180)
    assert "group" in box, f"the group did not form: {hostile_box} {worker.text()[-2000:]}"
    group = box["group"]
    engine = group.engine
    ctx = zmq.Context()
    try:
        ids = engine.tokenizer.encode(PROMPT, add_bos=True, special=True)
        params = SamplingParams(temperature=0.0)
        before = engine.generate(ids, params, 16, ignore_eos=True).tokens  # the hostile worker fuzzes during it

        # master control: decoded, dropped or refused
        control = curve_socket(ctx, token, tmp_path / "fuzz-keys", f"tcp://127.0.0.1:{port}")
        junk = garbage(rng, oversize=True)
        for _ in range(5000):
            control.send_multipart(next(junk))
            counts["master control (CURVE, no token)"] += 1
        # past MAXMSGSIZE (max frame + 64 KiB): libzmq drops the connection before anything is decoded
        huge = curve_socket(ctx, token, tmp_path / "huge-keys", f"tcp://127.0.0.1:{port}")
        for _ in range(10):
            huge.send_multipart([p.encode(p.Heartbeat())[0], bytes(MAX_FRAME + 70_000)])
            counts["master control past MAXMSGSIZE (disconnected)"] += 1
        # master data: an unadmitted key never completes the handshake
        data = curve_socket(ctx, token, tmp_path / "fuzz-keys", f"tcp://127.0.0.1:{port + 1}")
        monitor = data.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        junk = garbage(rng, oversize=False)
        for _ in range(1000):  # queued until the handshake fails, then refused by the socket itself
            try:
                data.send_multipart(next(junk), zmq.NOBLOCK)
            except zmq.Again:
                break
            counts["master data (unadmitted, refused at handshake)"] += 1
        assert monitor.poll(10_000), "no handshake event on the data channel"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert not data.poll(500), "the data channel answered an unadmitted socket"
        # raw TCP junk on both ports
        for i in range(40):
            with socket.create_connection(("127.0.0.1", port + i % 2), timeout=5) as raw:
                raw.sendall(rng.bytes(int(rng.integers(1, 5000))))
            counts["raw TCP connections of junk"] += 1

        # the worker process, through the master's own sockets (between requests: data is ours)
        link = group.link
        rid = next(r for r, peer in link.peers.admitted() if peer.name == "honest")
        peer_id = group.peer_id(next(d.rank for d in group.devices if d.name == "honest")).encode()
        junk = garbage(rng, oversize=False)
        for _ in range(2000):
            frames = next(junk)
            link.call(lambda frames=frames: link._control.send_multipart([rid, *frames]))
            counts["worker control"] += 1
        with engine.lock:
            for _ in range(2000):
                link.data.sock.send_multipart([peer_id, *next(junk)])
                counts["worker data"] += 1
        time.sleep(1.0)  # let the worker chew through its queue before the next step
        deadline = time.monotonic() + 30  # and the master's keeper through the control batch
        while (sum(r.getMessage().startswith(("dropped malformed message from 127", "refused 127"))
                   for r in caplog.records) < counts["master control (CURVE, no token)"]
               and time.monotonic() < deadline):
            time.sleep(0.2)

        after = engine.generate(ids, params, 16, ignore_eos=True).tokens
        assert after == before
        assert worker.alive() and hostile.is_alive(), (worker.text()[-2000:], hostile_box)
        assert link.lost_peers() == {} and group.state == "serving"
        assert "dropped malformed message" in worker.text()
        master_log = [r.getMessage() for r in caplog.records]
        # every control message was decoded and named in the log: dropped, or refused (other version)
        assert sum(m.startswith(("dropped malformed message from 127.0.0.1", "refused 127.0.0.1"))
                   for m in master_log) == counts["master control (CURVE, no token)"]
        assert sum(m.startswith("dropped malformed data message from hostile")
                   for m in master_log) == counts["master data (admitted peer)"]
        decoded = sum(v for k, v in counts.items() if not any(w in k for w in ("handshake", "raw", "MAXMSGSIZE")))
        print(f"\n{decoded} hostile messages reached a decoder; all batches: {counts}")
        assert decoded >= 10_000
    finally:
        ctx.destroy(linger=0)
        group.close()
        hostile.join(timeout=30)
        worker.stop()
    assert "error" not in hostile_box, hostile_box.get("error")
