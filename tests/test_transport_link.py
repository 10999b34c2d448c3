"""Links on loopback: admission, refusal, encryption on the wire, heartbeats, shard transfer."""
from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from netproxy import DelayProxy
from tpi.errors import GroupError
from tpi.transport import security
from tpi.transport.keeper import LinkSettings
from tpi.transport.link import MasterLink
from tpi.transport.worker_link import WorkerLink
from tpi.transport.protocol import Assign, Hello, Refuse, ShardChunk, ShardRequest, Step, decode, encode
from tpi.scheduler.store import verified_content_hash, write_store
from tpi.transport.transfer import ShardServer, fetch_shard

FAST = LinkSettings(heartbeat_s=0.1, timeout_s=0.6, step_timeout_s=10, join_timeout_s=3, chunk_bytes=64 << 10)


@pytest.fixture
def shard(tmp_path) -> Path:
    """A real shard store (~0.9 MB of random blocks): its identity is its content hash."""
    rng = np.random.default_rng(1)
    path = tmp_path / "shard.tpis"
    write_store(path, {"format": "test"},
                ((f"L{i}.attn", {"w": rng.integers(0, 256, 100_000, dtype=np.uint8)}) for i in range(7)))
    return path


def shard_hash(path: Path) -> str:
    identity = verified_content_hash(path)
    assert identity is not None
    return identity


@pytest.fixture
def master(tmp_path):
    link = MasterLink("127.0.0.1:0", tmp_path / "master-keys", settings=FAST)
    yield link
    link.close()


def _admit_next(master: MasterLink, shard: Path | None, world: int = 2, rank: int = 1):
    join = master.next_join(timeout=5)
    assert join is not None, "no join request arrived"
    size = shard.stat().st_size if shard else 0
    sent = master.admit(join, Assign(rank=rank, world=world, shard_hash=shard_hash(shard) if shard else "",
                                     shard_size=size), shard)
    return join, sent


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as e:  # handed to the test thread, which re-raises it
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_device_with_token_joins_fetches_its_shard_then_finds_it_cached(master, shard, tmp_path):
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "w", settings=FAST)
    t, box = _in_thread(lambda: worker.join("laptop", {"gflops": 2.0}, ["abc"]))
    join, sent = _admit_next(master, shard)
    t.join()
    assert box["value"] == sent and join.name == "laptop" and join.cached_hashes == ("abc",)
    assert join.device_key == security.load_or_create_keypair(tmp_path / "w", "device").public
    dest = tmp_path / "cache" / "shard.bin"
    stats = worker.fetch_shard(dest, sent.shard_hash, sent.shard_size, verified_content_hash)
    assert dest.read_bytes() == shard.read_bytes()
    assert stats.bytes_transferred == shard.stat().st_size and not stats.cached
    again = worker.fetch_shard(dest, sent.shard_hash, sent.shard_size, verified_content_hash)
    assert again.cached and again.bytes_transferred == 0
    worker.close()


def test_wrong_token_is_refused_and_receives_no_shard_bytes(master, shard, tmp_path):
    real = security.parse_token(master.token)
    forged = security.make_token(real.master_public, b"\x00" * security.SECRET_BYTES)
    worker = WorkerLink(f"127.0.0.1:{master.port}", forged, tmp_path / "w", settings=FAST)
    with pytest.raises(GroupError, match="wrong join token"):
        worker.join("intruder", {}, [])
    dest = tmp_path / "cache" / "shard.bin"
    with pytest.raises(GroupError, match="refused"):
        worker.fetch_shard(dest, shard_hash(shard), shard.stat().st_size, verified_content_hash)
    assert not dest.exists() and not dest.with_name("shard.bin.part").exists()
    assert master.next_join(timeout=0.2) is None
    assert master.transfer_progress() == {}
    worker.close()


def test_unauthenticated_socket_hears_nothing_but_refusals_and_master_survives(master, shard, tmp_path):
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    keys = security.load_or_create_keypair(tmp_path / "raw", "device")
    security.configure_client(raw, keys, security.parse_token(master.token).master_public)
    raw.connect(f"tcp://127.0.0.1:{master.port}")
    raw.send_multipart(encode(ShardRequest(shard_hash(shard), 0, 1000, False)))
    raw.send_multipart([b"\xc1garbage", b"more"])
    raw.send_multipart([b""])
    heard = []
    while raw.poll(500):
        heard.append(decode(raw.recv_multipart()))
    assert heard and all(isinstance(m, Refuse) for m in heard)
    raw.close()
    ctx.term()
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "w", settings=FAST)
    t, box = _in_thread(lambda: worker.join("good", {}, []))
    _admit_next(master, shard)
    t.join()
    assert isinstance(box.get("value"), Assign)
    worker.close()


def test_other_protocol_version_is_refused_with_the_reason(master, tmp_path):
    import msgpack
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    security.configure_client(raw, security.load_or_create_keypair(tmp_path / "raw", "device"),
                              security.parse_token(master.token).master_public)
    raw.connect(f"tcp://127.0.0.1:{master.port}")
    _, t, seq, values, descs = msgpack.unpackb(encode(Hello("old", {}, [], b""))[0])
    raw.send_multipart([msgpack.packb([0, t, seq, values, descs])])
    assert raw.poll(3000)
    reply = decode(raw.recv_multipart())
    raw.close()
    ctx.term()
    assert isinstance(reply, Refuse) and "version" in reply.reason


def test_token_of_another_master_cannot_join(master, tmp_path):
    other = security.master_token(tmp_path / "other-master")
    worker = WorkerLink(f"127.0.0.1:{master.port}", other, tmp_path / "w", settings=FAST)
    with pytest.raises(GroupError, match="handshake.*failed.*another master"):
        worker.join("lost", {}, [])
    assert master.next_join(timeout=0.2) is None
    worker.close()


def test_rotated_token_keeps_admitted_devices_and_locks_out_new_ones(tmp_path, shard):
    keys = tmp_path / "master-keys"
    first = MasterLink("127.0.0.1:0", keys, settings=FAST)
    old_token = first.token
    old = WorkerLink(f"127.0.0.1:{first.port}", old_token, tmp_path / "old", settings=FAST)
    t, _ = _in_thread(lambda: old.join("old", {}, []))
    _admit_next(first, None)
    t.join()
    old.close()
    first.close()
    new_token = security.rotate_token(keys)
    second = MasterLink("127.0.0.1:0", keys, settings=FAST)
    assert second.token == new_token
    again = WorkerLink(f"127.0.0.1:{second.port}", old_token, tmp_path / "old", settings=FAST)
    t, box = _in_thread(lambda: again.join("old", {}, []))
    _admit_next(second, None)
    t.join()
    assert isinstance(box.get("value"), Assign)
    stranger = WorkerLink(f"127.0.0.1:{second.port}", old_token, tmp_path / "new", settings=FAST)
    with pytest.raises(GroupError, match="wrong join token"):
        stranger.join("new", {}, [])
    for link in (again, stranger, second):
        link.close()


PATTERN = b"TPI-CLEARTEXT-CANARY-0123456789!"  # 32 bytes = 8 float32


@pytest.mark.parametrize("insecure", [False, True], ids=["curve", "insecure"])
def test_wire_shows_tensor_bytes_only_when_insecure(tmp_path, insecure):
    master = MasterLink("127.0.0.1:0", tmp_path / "m", insecure=insecure, settings=FAST)
    record: list = []
    with DelayProxy(0, "127.0.0.1", master.port, 0.0, record) as ctl, \
            DelayProxy(0, "127.0.0.1", master.data_port, 0.0, record) as data:
        worker = WorkerLink(f"127.0.0.1:{ctl.port}", master.token, tmp_path / "w", insecure=insecure,
                            settings=FAST, data_endpoint=f"tcp://127.0.0.1:{data.port}")
        t, _ = _in_thread(lambda: worker.join("w", {}, []))
        _admit_next(master, None)
        t.join()
        wt, wbox = _in_thread(lambda: worker.communicator().recv_step())
        comm = master.communicator("f32", ready_timeout_s=5)
        x = np.frombuffer(PATTERN * 4, np.float32).reshape(1, -1)
        comm.broadcast_step(Step.of_sequence(0, 1, x, request_id=1))
        wt.join()
        step = wbox["value"]
        assert isinstance(step, Step) and step.x.tobytes() == x.tobytes()
        time.sleep(0.1)
        wire = ctl.recorded()
        secret = security.parse_token(master.token).secret
        worker.close()
    master.close()
    assert (PATTERN in wire) == insecure
    assert secret not in wire  # the token secret never travels, even insecure (only an HMAC)


def test_master_names_a_closed_worker_and_a_leaving_one(master, tmp_path):
    """A worker whose keeper ends closes its control connection without a goodbye (as a crashed process
    does): lost at once by the socket monitor, not after the heartbeat timeout. (A worker that goes
    silent with its connection open is tests/test_resume_netns.py.)"""
    links = []
    for name in ("silent", "polite"):
        w = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / name, settings=FAST)
        t, _ = _in_thread(lambda w=w, name=name: w.join(name, {}, []))
        _, sent = _admit_next(master, None, world=3, rank=len(links) + 1)
        t.join()
        links.append((w, sent))
    time.sleep(0.3)
    assert master.lost_peers() == {}
    (silent, s_sent), (polite, p_sent) = links
    silent.stop()  # keeper gone, its socket closed, no goodbye: like a crashed device
    polite.close()
    deadline = time.monotonic() + 3
    while len(master.lost_peers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lost = master.lost_peers()
    # the reason says how it was noticed: the closed connection, not the heartbeat timeout
    assert "connection closed" in lost[s_sent.peer_id] and "left" in lost[p_sent.peer_id]
    silent.close()


def test_worker_notices_a_silent_master(tmp_path):
    master = MasterLink("127.0.0.1:0", tmp_path / "m", settings=FAST)
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "w", settings=FAST)
    t, _ = _in_thread(lambda: worker.join("w", {}, []))
    _admit_next(master, None)
    t.join()
    master.stop()  # the keeper dies without a Stop, as in a crash
    deadline = time.monotonic() + 3
    while worker.master_lost() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "silent" in (worker.master_lost() or "")
    worker.close()
    master.close()


# ---- shard transfer logic without sockets ----

class FakeMaster:
    """Answers requests with a real ShardServer; can drop the link or corrupt chunks."""

    def __init__(self, path: Path, fail_after: int | None = None, corrupt_chunk: int | None = None,
                 claimed_hash: str | None = None):
        self.server = ShardServer()
        self.server.register(b"p", path, claimed_hash or shard_hash(path))
        self.replies: collections.deque = collections.deque()
        self.fail_after, self.corrupt_chunk, self.received = fail_after, corrupt_chunk, 0

    def send(self, req):
        self.replies.append(self.server.answer(b"p", req))

    def recv(self):
        self.received += 1
        if self.fail_after is not None and self.received > self.fail_after:
            raise GroupError("link dropped")
        msg = self.replies.popleft()
        if self.received == self.corrupt_chunk and isinstance(msg, ShardChunk) and msg.data.size:
            data = msg.data.copy()
            data[0] ^= 0xFF
            msg = ShardChunk(msg.shard_hash, msg.offset, msg.length, msg.crc32, data)
        return msg


def test_interrupted_transfer_resumes_from_its_partial_file(shard, tmp_path):
    h, size, dest = shard_hash(shard), shard.stat().st_size, tmp_path / "d" / "s.bin"
    cut = FakeMaster(shard, fail_after=5)
    with pytest.raises(GroupError, match="dropped"):
        fetch_shard(dest, h, size, cut.send, cut.recv, verified_content_hash, chunk_bytes=50_000)
    assert not dest.exists() and dest.with_name("s.bin.part").stat().st_size > 0
    fake = FakeMaster(shard)
    stats = fetch_shard(dest, h, size, fake.send, fake.recv, verified_content_hash, chunk_bytes=50_000)
    assert dest.read_bytes() == shard.read_bytes()
    assert stats.bytes_resumed >= 5 * 50_000 - 50_000 * 4  # at least what landed before the cut
    assert stats.bytes_resumed + stats.bytes_transferred == size and not stats.refetched


def test_corrupted_partial_file_is_detected_and_refetched(shard, tmp_path):
    h, size, dest = shard_hash(shard), shard.stat().st_size, tmp_path / "s.bin"
    part = tmp_path / "s.bin.part"
    good = bytearray(shard.read_bytes()[:600_000])
    good[300_000] ^= 0x55
    part.write_bytes(bytes(good))
    fake = FakeMaster(shard)
    stats = fetch_shard(dest, h, size, fake.send, fake.recv, verified_content_hash, chunk_bytes=50_000)
    assert dest.read_bytes() == shard.read_bytes()
    assert stats.bytes_resumed <= 300_000 and stats.bytes_transferred == size - stats.bytes_resumed


def test_chunk_corrupted_in_transit_is_fetched_again(shard, tmp_path):
    fake = FakeMaster(shard, corrupt_chunk=2)
    dest = tmp_path / "s.bin"
    fetch_shard(dest, shard_hash(shard), shard.stat().st_size, fake.send, fake.recv, verified_content_hash,
                chunk_bytes=50_000)
    assert dest.read_bytes() == shard.read_bytes()


def test_shard_that_never_matches_its_hash_is_an_error(shard, tmp_path):
    fake = FakeMaster(shard, claimed_hash="0" * 64)  # the file changed after the plan hashed it
    with pytest.raises(GroupError, match="fails its identity check after a full refetch"):
        fetch_shard(tmp_path / "s.bin", "0" * 64, shard.stat().st_size, fake.send,
                    lambda: fake.recv(), verified_content_hash, chunk_bytes=100_000)


def test_delay_proxy_delays_each_direction_and_stops_cleanly():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo():
        conn, _ = server.accept()
        while data := conn.recv(1024):
            conn.sendall(data)
        conn.close()

    t = threading.Thread(target=echo)
    t.start()
    record: list = []
    proxy = DelayProxy(0, "127.0.0.1", server.getsockname()[1], 0.05, record).start()
    client = socket.create_connection(("127.0.0.1", proxy.port))
    t0 = time.monotonic()
    client.sendall(b"ping")
    assert client.recv(16) == b"ping"
    assert time.monotonic() - t0 >= 0.1  # 50 ms each way is a floor, whatever the load
    client.close()
    proxy.stop()
    t.join(timeout=5)
    server.close()
    assert proxy.recorded() == b"pingping" and not t.is_alive()
