"""The logits gather sends a worker's slice as bf16 bits when that is exact (half the bytes).

Logits leave the torch output kernels as bf16 values held in float32, so the low 16 bits of
every value are zero and bf16 carries them without loss. Real ZeroMQ sockets, one thread per rank.
"""
from __future__ import annotations

import threading

import numpy as np
import zmq

from tpi.transport.allreduce import StarMaster
from tpi.transport.star_worker import StarWorker
from tpi.transport.protocol import Step, from_bf16, to_bf16


def _gather_once(slice_: np.ndarray) -> tuple[np.ndarray, int]:
    """(what the master receives from the worker, bytes the worker sent) for one gather."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        dealer.setsockopt(zmq.ROUTING_ID, b"w1")
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        # A ROUTER drops messages to peers it has not heard from yet: wait for the worker's hello
        # (the real link's join plays this part) before the master broadcasts.
        dealer.send(b"hello")
        assert router.poll(30_000), "the worker's hello never reached the master"
        assert router.recv_multipart() == [b"w1", b"hello"]
        master = StarMaster(router, ["w1"], ["w1"], "f32", dict, step_timeout_s=10, max_frame=1 << 24)
        worker = StarWorker(dealer, 1, 2, "f32", lambda: None, step_timeout_s=10, max_frame=1 << 24)

        def work() -> None:
            assert isinstance(worker.recv_step(), Step)
            worker.gather(slice_)

        t = threading.Thread(target=work)
        t.start()
        master.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 4), np.float32), request_id=1))
        parts = master.gather(np.zeros(1, np.float32))
        t.join(10)
        return parts[1], worker.stats.bytes_sent
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_bf16_exact_logits_travel_as_bf16_and_arrive_identical():
    rng = np.random.default_rng(0)
    logits = from_bf16(to_bf16(rng.standard_normal(4096).astype(np.float32) * 20))  # bf16 values in f32
    got, sent = _gather_once(logits)
    assert got.dtype == np.float32 and np.array_equal(got, logits)
    assert sent < logits.nbytes * 0.6  # bf16 on the wire (plus a small header)


def test_other_float32_logits_travel_as_float32_untouched():
    logits = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    got, sent = _gather_once(logits)
    assert np.array_equal(got, logits) and sent > logits.nbytes
