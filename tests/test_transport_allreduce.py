"""Star allreduce with real worker processes: exact sums, identical bits, loss detection; ring."""
from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tpi.errors import GroupError
from tpi.transport.comm import NullCommunicator
from tpi.transport.keeper import LinkSettings
from tpi.transport.link import MasterLink
from tpi.transport.protocol import Assign, Step, Stop
from tpi.transport.ring import RingAllreduce
from tpi.transport.star_frames import exchange, star_only_from_env
from tpi.transport.worker_link import WorkerLink

STALL = 1000  # a step whose request id is STALL + rank hangs that rank (a stuck device)

FAST = LinkSettings(heartbeat_s=0.1, timeout_s=0.8, step_timeout_s=20, join_timeout_s=20)
SHAPE = (2, 96)


def partial_for(step: int, rank: int) -> np.ndarray:
    """Every rank's partial for a step, reproducible in any process (wide range to stress rounding)."""
    rng = np.random.default_rng(1000 * step + rank)
    return (rng.standard_normal(SHAPE) * 10.0 ** rng.integers(-3, 4, SHAPE)).astype(np.float32)


def worker_main(port: int, token: str, key_dir: str, name: str, results) -> None:
    """A worker process: join, then per step allreduce its partial and gather its rank."""
    link = WorkerLink(f"127.0.0.1:{port}", token, Path(key_dir), settings=FAST)
    assign = link.join(name, {}, [])
    comm = link.communicator()
    sums = []
    while True:
        step = comm.recv_step()
        if isinstance(step, Stop):
            break
        if step.request_id == STALL + assign.rank:
            time.sleep(600)  # a hung device; the test kills it here
        sums.append(comm.allreduce(partial_for(step.request_id, assign.rank)).tobytes())
        comm.gather(np.full(3, assign.rank, np.float32))
    results.put((assign.rank, sums))
    link.close()


def start_group(tmp_path: Path, n_workers: int, wire: str):
    """A master link plus n worker processes, admitted as ranks 1..n, and the master comm."""
    master = MasterLink("127.0.0.1:0", tmp_path / "m", settings=FAST)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker_main, args=(master.port, master.token, str(tmp_path / f"w{i}"),
                                                    f"w{i}", results), daemon=True)
             for i in range(1, n_workers + 1)]
    for p in procs:
        p.start()
    by_name = {}
    for _ in procs:
        join = master.next_join(timeout=30)
        assert join is not None, "a worker process never joined"
        by_name[join.name] = join
    world = n_workers + 1
    for rank in range(1, world):
        master.admit(by_name[f"w{rank}"], Assign(rank=rank, world=world, shard_hash="", shard_size=0,
                                                 wire_dtype=wire))
    return master, master.communicator(wire, ready_timeout_s=30), procs, results


def bf16_round(x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def int8_round(x: np.ndarray) -> np.ndarray:
    """x through the int8 block code in float64, written apart from tpi's: scale = max|x| of 32
    rounded up to bf16, code = rint(127 sqrt(|x| / scale)) with x's sign, value = (code/127)^2 scale."""
    v = np.asarray(x, np.float64).reshape(-1, 32)
    bits = np.abs(v).max(axis=1).astype(np.float32).view(np.uint32).astype(np.uint64)
    scale = (((bits + 0xFFFF) >> 16) << 16).astype(np.uint32).view(np.float32).astype(np.float64)[:, None]
    code = np.sign(v) * np.round(127 * np.sqrt(np.abs(v) / np.where(scale > 0, scale, 1)))
    return (np.sign(code) * (code / 127) ** 2 * scale).reshape(np.shape(x))


def code_steps(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> float:
    """|a - b| in int8 code steps of ref's blocks (the step at the largest value: 2 * 127 + 1 over 127^2)."""
    step = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True) * 255 / 127 ** 2
    return float((np.abs(a - b).reshape(-1, 32) / np.maximum(step, 1e-30)).max())


def reference_sum(step: int, world: int, wire: str) -> np.ndarray:
    """Independent reference: fp32 sum in rank order; bf16/int8 round each sent partial and the sum."""
    rounded = {"f32": lambda a: a, "bf16": bf16_round, "int8": int8_round}[wire]
    acc = partial_for(step, 0).copy()
    for rank in range(1, world):
        acc += rounded(partial_for(step, rank)).astype(np.float32)
    return rounded(acc).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("n_workers,wire", [(1, "f32"), (2, "f32"), (1, "bf16"), (2, "bf16"), (2, "int8")])
def test_star_allreduce_is_exact_and_identical_on_every_rank(tmp_path, n_workers, wire):
    world = n_workers + 1
    # References first: the bf16 one imports torch, which holds the GIL for seconds on a loaded
    # machine; inside the group that starves the master's heartbeats past FAST's 0.8 s timeout.
    refs = {step: reference_sum(step, world, wire) for step in range(1, 6)}
    master, comm, procs, results = start_group(tmp_path, n_workers, wire)
    mine = []
    try:
        for step in range(1, 6):
            comm.broadcast_step(Step.of_sequence(step, 1, np.zeros((1, 4), np.float32), request_id=step))
            out = comm.allreduce(partial_for(step, 0))
            assert out.dtype == np.float32 and out.shape == SHAPE
            ref = refs[step]
            if wire == "int8":  # float64 reference: a code may land on the other side of a .5
                assert code_steps(out, ref, ref) <= 2, f"step {step} differs from reference"
            else:
                assert np.array_equal(out, ref), f"step {step} differs from reference"
            mine.append(out.tobytes())
            gathered = comm.gather(np.zeros(3, np.float32))
            assert [int(g[0]) for g in gathered] == list(range(world))
        comm.broadcast_stop("test done")
        got = dict(results.get(timeout=30) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
        master.close()
    assert sorted(got) == list(range(1, world))
    for rank, sums in got.items():
        assert sums == mine, f"rank {rank} holds different bits than the master"
    assert comm.stats.allreduce_count == 5 and comm.stats.bytes_received > 0


@pytest.mark.slow
def test_killed_worker_makes_allreduce_fail_naming_it(tmp_path):
    master, comm, procs, results = start_group(tmp_path, 2, "f32")
    try:
        comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 4), np.float32), request_id=1))
        comm.allreduce(partial_for(1, 0))
        comm.gather(np.zeros(3, np.float32))
        comm.broadcast_step(Step.of_sequence(1, 1, np.zeros((1, 4), np.float32), request_id=STALL + 2))
        procs[1].kill()  # rank 2, "w2", dies mid-step: its partial never comes
        procs[1].join()
        t0 = time.monotonic()
        with pytest.raises(GroupError, match=r"device w2 \(rank 2\) was lost") as err:
            comm.allreduce(partial_for(2, 0))
        assert time.monotonic() - t0 < FAST.timeout_s + 3, err.value
        assert len(master.lost_peers()) == 1
    finally:
        for p in procs:
            p.kill()
            p.join()
        master.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,wire", [(2, "f32"), (3, "f32"), (3, "bf16")])
def test_ring_allreduce_agrees_with_numpy_and_across_ranks(world, wire):
    endpoints = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(world)]
    xs = [partial_for(7, r) for r in range(world)]
    out: list = [None] * world

    def run(rank: int) -> None:
        ring = RingAllreduce(rank, world, endpoints, wire, timeout_s=10)
        out[rank] = ring.allreduce(xs[rank])
        ring.close()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exact = np.sum(np.stack(xs).astype(np.float64), axis=0)
    scale = np.abs(np.stack(xs)).sum(axis=0)
    tol = 1e-6 if wire == "f32" else 2 ** -7 * world
    assert np.all(np.abs(out[0] - exact) <= tol * scale + 1e-30)
    assert all(o.tobytes() == out[0].tobytes() for o in out)


def test_null_communicator_is_the_identity():
    comm = NullCommunicator()
    x = np.arange(4, dtype=np.float32)
    assert comm.allreduce(x) is x and comm.gather(x) == [x] and (comm.rank, comm.world) == (0, 1)


def test_worker_follows_the_master_when_it_abandons_a_step(tmp_path):
    master = MasterLink("127.0.0.1:0", tmp_path / "m", settings=FAST)
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "w", settings=FAST)
    box: dict = {}

    def run_worker():
        worker.join("w1", {}, [])
        comm = worker.communicator()
        comm.recv_step()
        try:
            comm.allreduce(np.ones(4, np.float32))
        except GroupError as e:
            box["error"] = str(e)
        box["next"] = comm.recv_step()
        box["sum"] = comm.allreduce(np.ones(4, np.float32))

    t = threading.Thread(target=run_worker)
    t.start()
    join = master.next_join(timeout=10)
    master.admit(join, Assign(rank=1, world=2, shard_hash="", shard_size=0))
    comm = master.communicator("f32", ready_timeout_s=10)
    comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 4), np.float32), request_id=1))
    time.sleep(0.2)  # the worker is now waiting for a sum the master will never send
    comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 4), np.float32), request_id=2))
    out = comm.allreduce(np.full(4, 2.0, np.float32))
    t.join(timeout=10)
    worker.close()
    master.close()
    assert "abandoned step 1" in box["error"] and isinstance(box["next"], Step) and box["next"].request_id == 2
    assert np.array_equal(out, np.full(4, 3.0, np.float32)) and np.array_equal(box["sum"], out)


def test_two_ranks_on_f32_swap_partials_so_the_worker_never_waits_for_the_master(tmp_path):
    """The master posts its partial before it looks for the worker's: the worker's allreduce ends while
    the master is held before collecting (through the star this would deadlock), with the star's sum."""
    master = MasterLink("127.0.0.1:0", tmp_path / "m", settings=FAST)
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "w", settings=FAST)
    x0, x1 = partial_for(1, 0), partial_for(1, 1)
    worker_done, box = threading.Event(), {}

    def run_worker():
        worker.join("w1", {}, [])
        comm = worker.communicator()
        comm.recv_step()
        box["sum"] = comm.allreduce(x1)
        worker_done.set()

    t = threading.Thread(target=run_worker)
    t.start()
    master.admit(master.next_join(timeout=10), Assign(rank=1, world=2, shard_hash="", shard_size=0))
    comm = master.communicator("f32", ready_timeout_s=10)
    collect = comm._collect_partials

    def held(*args):
        assert worker_done.wait(timeout=20), "the worker waited for the master to collect"
        return collect(*args)

    comm._collect_partials = held
    comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 4), np.float32), request_id=1))
    out = comm.allreduce(x0)
    t.join(timeout=10)
    worker.close()
    master.close()
    assert np.array_equal(out, x0 + x1) and box["sum"].tobytes() == out.tobytes()


@pytest.mark.parametrize("wire", ["f32", "bf16"])
def test_hot_path_drops_partials_and_sums_of_the_wrong_size_or_frame_count(tmp_path, caplog, wire):
    """Messages whose header is exactly the awaited one but whose buffer is wrong: logged, dropped.

    A worker of two awaits the master's Partial with the f32 wire (the exchange), its Reduced otherwise.
    """
    from tpi.transport.protocol import Partial, Reduced, encode_header
    from tpi.transport.wire import to_wire

    master = MasterLink("127.0.0.1:0", tmp_path / "m", settings=FAST)
    worker = WorkerLink(f"127.0.0.1:{master.port}", master.token, tmp_path / "w", settings=FAST)
    x = np.arange(64, dtype=np.float32).reshape(1, 64)  # integers: exact in bf16, and so are their sums
    good = to_wire(x, wire).tobytes()
    n = len(good)
    awaited = Partial if wire == "f32" else Reduced
    bad_bodies = [[good[:-4]], [good + b"\0" * 4], [good, b"extra"], []]  # short, long, extra frame, none
    box: dict = {}

    def run_worker():
        worker.join("w1", {}, [])
        comm = worker.communicator()
        comm.recv_step()
        head = encode_header(Partial.TYPE, 1, [1], [[wire, [1, 64]]])
        for body in bad_bodies:
            worker.data_socket().send_multipart([head, *body])
        box["sum"] = comm.allreduce(x)

    t = threading.Thread(target=run_worker)
    t.start()
    master.admit(master.next_join(timeout=10), Assign(rank=1, world=2, shard_hash="", shard_size=0, wire_dtype=wire))
    comm = master.communicator(wire, ready_timeout_s=10)
    comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 4), np.float32), request_id=1))
    time.sleep(0.3)  # the worker's bad partials are queued before the master looks
    head = encode_header(awaited.TYPE, 1, [1], [[wire, [1, 64]]])
    rid = comm._ids[0]
    for body in bad_bodies:  # the same for the sums the worker awaits (it is waiting by now)
        master.data.sock.send_multipart([rid, head, *body])
    out = comm.allreduce(x)
    t.join(timeout=10)
    worker.close()
    master.close()
    assert np.array_equal(out, 2 * x) and np.array_equal(box["sum"], 2 * x)
    dropped = [r.getMessage().removeprefix("dropped malformed data message from ") for r in caplog.records
               if "dropped malformed" in r.getMessage()]
    whys = [f"buffer of {n - 4} bytes where its header needs {n}", f"buffer of {n + 4} bytes where its header needs {n}",
            "1 buffer frame(s) more than its header lists", "needs 1 buffers, header lists 1, got 0 frames"]
    # Each end logs its own drops in order; the two ends' threads interleave as the scheduler likes.
    assert [d for d in dropped if d.startswith("w1: ")] == [f"w1: Partial {w}" for w in whys]
    assert [d for d in dropped if not d.startswith("w1: ")] == [f"the master: {awaited.__name__} {w}" for w in whys]


def star_only_worker(port: int, token: str, key_dir: str, results) -> None:
    """A worker process whose environment says the opposite of the master: it reports which path it took."""
    link = WorkerLink(f"127.0.0.1:{port}", token, Path(key_dir), settings=FAST)
    link.join("w1", {}, [])
    comm = link.communicator()
    sums = []
    for step in (1, 2):
        comm.recv_step()
        sums.append(comm.allreduce(partial_for(step, 1)).tobytes())
    results.put((comm.star_only, sums))
    link.close()


@pytest.mark.parametrize("master_star_only", [True, False])
def test_two_ranks_take_the_allreduce_path_the_master_assigns_whatever_the_worker_environment(
        tmp_path, monkeypatch, master_star_only):
    """TPI_STAR_ONLY is the master's to decide (tpi.master.setup puts it in Assign): a worker process
    started with the opposite setting follows the master, so the two never wait for each other's
    message (a disagreement stalls until the step timeout)."""
    monkeypatch.setenv("TPI_STAR_ONLY", "0" if master_star_only else "1")  # the worker's environment
    master = MasterLink("127.0.0.1:0", tmp_path / "m", settings=FAST)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=star_only_worker, args=(master.port, master.token, str(tmp_path / "w"), results),
                       daemon=True)
    proc.start()
    monkeypatch.setenv("TPI_STAR_ONLY", "1" if master_star_only else "0")  # the master's
    assert star_only_from_env() is master_star_only
    try:
        join = master.next_join(timeout=30)
        master.admit(join, Assign(rank=1, world=2, shard_hash="", shard_size=0, star_only=star_only_from_env()))
        comm = master.communicator("f32", ready_timeout_s=30)
        assert comm.star_only is master_star_only and exchange(2, "f32", comm.star_only) is not master_star_only
        mine = []
        for step in (1, 2):
            comm.broadcast_step(Step.of_sequence(step, 1, np.zeros((1, 4), np.float32), request_id=step))
            out = comm.allreduce(partial_for(step, 0))  # a disagreement raises GroupError at the step timeout
            assert np.array_equal(out, partial_for(step, 0) + partial_for(step, 1))
            mine.append(out.tobytes())
        worker_star_only, sums = results.get(timeout=30)
    finally:
        proc.join(timeout=10)
        master.close()
    assert worker_star_only is master_star_only and sums == mine
