"""The master measures each joined device's link (MasterLink.probe) before it plans the group."""
from __future__ import annotations

import threading

import pytest

from netproxy import DelayProxy
from tpi.transport.keeper import LinkSettings
from tpi.transport.link import MasterLink
from tpi.transport.worker_link import WorkerLink
from tpi.transport.protocol import Assign

FAST = LinkSettings(heartbeat_s=0.1, timeout_s=2.0, step_timeout_s=10, join_timeout_s=5)


@pytest.fixture
def master(tmp_path):
    link = MasterLink("127.0.0.1:0", tmp_path / "master-keys", settings=FAST)
    yield link
    link.close()


def _join_in_thread(worker: WorkerLink) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["assign"] = worker.join("dev", {"k": 1}, [])
        except Exception as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


@pytest.mark.parametrize("one_way_s", [0.0, 0.004])
def test_probe_sees_the_links_round_trip_and_the_join_still_completes(master, tmp_path, one_way_s):
    with DelayProxy(0, "127.0.0.1", master.port, one_way_s) as proxy:
        worker = WorkerLink(f"127.0.0.1:{proxy.port}", master.token, tmp_path / "dev-keys", settings=FAST)
        try:
            t, box = _join_in_thread(worker)
            join = master.next_join(timeout=5)
            assert join is not None and join.profile == {"k": 1}
            probe = master.probe(join, payload_bytes=256 << 10, rounds=3)
            assert probe is not None
            # The proxy holds every byte one_way_s in each direction: a round trip cannot beat 2x.
            assert probe.rtt_s >= 2 * one_way_s
            assert probe.bandwidth_bytes_s > 0 and probe.payload_bytes == 256 << 10
            # The probe's echoes never reach the joining caller: it still gets its Assign.
            master.admit(join, Assign(rank=1, world=2, shard_hash="", shard_size=0))
            t.join(timeout=10)
            assert "error" not in box, box.get("error")
            assert box["assign"].rank == 1
        finally:
            worker.close()


def test_probe_of_a_device_that_went_away_gives_none(master, tmp_path):
    impatient = LinkSettings(heartbeat_s=0.1, timeout_s=2.0, join_timeout_s=1)
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "dev-keys", settings=impatient)
    t, _ = _join_in_thread(worker)
    join = master.next_join(timeout=5)
    assert join is not None
    worker.close()  # gone before the master probes: no echo will come
    t.join(timeout=10)
    assert master.probe(join, payload_bytes=1024, rounds=1, timeout_s=0.5) is None
