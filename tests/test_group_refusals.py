"""A device that joins the wrong group is refused with a reason, and the group keeps serving.

One 2-device group (CURVE on) is formed with an in-process worker that first asks for a shard
other than the one assigned (as a device holding another model's shard would). Once the group
serves, a device speaking another protocol version and a third device are both turned away,
and the group still computes the same logits.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from tpi.errors import GroupError
from tpi.master import GroupOptions, start_group
from tpi.master.events import WaitingForDevices
from tpi.scheduler.store import verified_content_hash
from tpi.transport import security
from tpi.transport.keeper import LinkSettings
from tpi.transport.worker_link import WorkerLink
from tpi.transport.protocol import Hello, Refuse, decode, encode
from tpi.worker import SHARD_SUFFIX, WorkerOptions, _load_model, _serve_steps

pytestmark = pytest.mark.slow

QUICK = LinkSettings(join_timeout_s=20)
OTHER_MODEL_HASH = "0" * 64


def worker_asking_for_the_wrong_shard_first(port: int, token: str, tmp: Path, box: dict) -> None:
    """Join, request a shard hash that is not ours (refused), then fetch ours and serve steps."""
    opts = WorkerOptions(master=f"127.0.0.1:{port}", token=token, name="mixed-up", cache_dir=tmp / "w-cache",
                         key_dir=tmp / "w-keys", threads=1)
    link = WorkerLink(opts.master, token, opts.key_dir)
    try:
        assign = link.join(opts.name, {}, [OTHER_MODEL_HASH])
        try:
            # one byte: a single request, so no second refusal is still in flight for the next fetch
            link.fetch_shard(tmp / "other.tpis", OTHER_MODEL_HASH, 1, verified_content_hash)
        except GroupError as e:
            box["hash_refusal"] = str(e)
        dest = opts.cache_dir / f"{assign.shard_hash}{SHARD_SUFFIX}"
        link.fetch_shard(dest, assign.shard_hash, assign.shard_size, verified_content_hash)
        model, _ = _load_model(dest, assign, opts)
        model.comm = link.communicator()
        box["steps"], _ = _serve_steps(model, model.comm)
    except Exception as e:  # reported by the test thread
        box["error"] = e
    finally:
        link.close()


def refusal_for_old_protocol(port: int, token: str, key_dir: Path) -> Refuse:
    """A Hello stamped with protocol version 0 over a proper CURVE connection."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        security.configure_client(sock, security.load_or_create_keypair(key_dir, "device"),
                                  security.parse_token(token).master_public)
        sock.connect(f"tcp://127.0.0.1:{port}")
        _, kind, seq, values, descs = msgpack.unpackb(encode(Hello("old-tpi", {}, [], b""))[0])
        sock.send_multipart([msgpack.packb([0, kind, seq, values, descs])])
        assert sock.poll(10_000), "the master did not answer a Hello of another protocol version"
        return decode(sock.recv_multipart())
    finally:
        sock.close()
        ctx.term()


def test_wrong_shard_old_protocol_and_full_group_are_refused_while_the_group_serves(tiny_gguf, tmp_path):
    model = tiny_gguf("tiny_llama_q4_0")
    config_dir = tmp_path / "master-config"
    token = security.master_token(config_dir)  # the master loads the same keys, so the same token
    said: list = []
    box: dict = {}
    serving: dict = {}

    def master() -> None:
        try:
            serving["group"] = start_group(GroupOptions(
                model=str(model), devices=2, ratios=(0.5, 0.5), host="127.0.0.1", threads=1,
                config_dir=config_dir, cache_dir=tmp_path / "master-cache", join_timeout_s=120),
                on_event=said.append)
        except Exception as e:  # re-raised below
            serving["error"] = e

    master_thread = threading.Thread(target=master)
    master_thread.start()
    deadline = time.monotonic() + 60
    while not any(isinstance(e, WaitingForDevices) for e in said) and master_thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = next(e for e in said if isinstance(e, WaitingForDevices))
    port = waiting.port
    assert f"tpi join 127.0.0.1:{port} --token {waiting.token}" in str(waiting)
    worker = threading.Thread(target=worker_asking_for_the_wrong_shard_first, args=(port, token, tmp_path, box))
    worker.start()
    master_thread.join(timeout=180)
    if "error" in serving:
        worker.join(timeout=30)
        raise AssertionError(f"the group did not form; worker: {box.get('error')!r}") from serving["error"]
    group = serving["group"]
    try:
        assert "error" not in box, box.get("error")
        assert "not the one assigned" in box["hash_refusal"] and OTHER_MODEL_HASH[:12] in box["hash_refusal"]
        ids = group.engine.tokenizer.encode("Once upon a time", add_bos=True, special=True)
        before = group.engine.forward(ids, 0, all_positions=True).copy()

        old = refusal_for_old_protocol(port, token, tmp_path / "old-keys")
        assert isinstance(old, Refuse) and "protocol version" in old.reason

        third = WorkerLink(f"127.0.0.1:{port}", token, tmp_path / "third-keys", settings=QUICK)
        try:
            with pytest.raises(GroupError, match="group already full.*--devices 3"):
                third.join("third", {}, [])
        finally:
            third.close()

        after = group.engine.forward(ids, 0, all_positions=True)
        np.testing.assert_array_equal(after, before)
        assert group.status()["world"] == 2
    finally:
        group.close()
        worker.join(timeout=30)
    assert box.get("steps") == 2  # both forward passes ran on the worker too
