"""Allreduce latency: tpi's star vs a ring over the same ZeroMQ links vs torch.distributed gloo.

    python bench/allreduce.py [--hidden 576,1536,4096,8192] [--delays-ms 0,1,5] [--worlds 2,3] [--smoke]

Every rank is its own process on TCP loopback, partials are [1, hidden] fp32 (a decode step),
and times are per call on rank 1 (send partial .. hold the sum). A delay d > 0 puts
tests/netproxy.py's DelayProxy (its own process) on every link a rank connects through, so
each hop costs d one way; d = 0 is direct loopback, no proxy. The anchor column is a bare
pyzmq DEALER->ROUTER echo of a frame of the same size over the same path, measured in the
same run, because this machine is shared and its loopback round trip varies 2-3x by the minute.

gloo runs only at d = 0: its ranks publish their listening addresses through the store and
connect to each other directly, so a proxy could only sit between them by rewriting gloo's
address records in the store.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, median, print_table, ratio  # noqa: E402

TESTS = HERE.parent / "tests"
_TIMEOUT_S = 120.0


def partial_for(hidden: int, rank: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_normal((1, hidden)).astype(np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(call, warmup: int, iters: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


# ---- rank processes (spawned); each puts (role, {case index: [seconds]}) on `out` -----------------

def run_proxy(targets: list[int], delay_s: float, ports) -> None:
    """One DelayProxy per target port; report the listening ports, then forward until killed."""
    sys.path.insert(0, str(TESTS))
    from netproxy import DelayProxy

    proxies = [DelayProxy(0, "127.0.0.1", port, delay_s).start() for port in targets]
    ports.put([p.port for p in proxies])
    while True:
        time.sleep(3600)


def star_master(world: int, cases: list, curve: bool, key_dir: str, ports, out) -> None:
    from tpi.transport.keeper import LinkSettings
    from tpi.transport.link import MasterLink
    from tpi.transport.protocol import Assign, Step

    link = MasterLink("127.0.0.1:0", Path(key_dir), insecure=not curve, settings=LinkSettings(join_timeout_s=60))
    ports.put((link.port, link.data_port, link.token))
    joins = {}
    for _ in range(world - 1):
        join = link.next_join(timeout=_TIMEOUT_S)
        joins[join.name] = join
    for rank in range(1, world):
        link.admit(joins[f"w{rank}"], Assign(rank=rank, world=world, shard_hash="", shard_size=0))
    comm = link.communicator("f32", ready_timeout_s=_TIMEOUT_S)
    res = {}
    for i, (hidden, wire, warmup, iters) in enumerate(cases):
        comm.wire_dtype = wire  # both sides switch at the same case boundary
        comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 1), np.float32), request_id=i))
        x = partial_for(hidden, 0)
        res[i] = _timed(lambda: comm.allreduce(x), warmup, iters)
    comm.broadcast_stop("benchmark done")
    out.put(("star-master", res))
    time.sleep(0.5)  # let the Stop leave before the sockets close
    link.close()


def star_worker(rank: int, connect: str, data_endpoint: str | None, token: str, key_dir: str, curve: bool,
                cases: list, out) -> None:
    from tpi.transport.keeper import LinkSettings
    from tpi.transport.worker_link import WorkerLink
    from tpi.transport.protocol import Step

    link = WorkerLink(connect, token, Path(key_dir), insecure=not curve, settings=LinkSettings(join_timeout_s=60),
                      data_endpoint=data_endpoint)
    link.join(f"w{rank}", {}, [])
    comm = link.communicator()
    res = {}
    for i, (hidden, wire, warmup, iters) in enumerate(cases):
        step = comm.recv_step()
        assert isinstance(step, Step) and step.request_id == i, step
        comm.wire_dtype = wire
        x = partial_for(hidden, rank)
        res[i] = _timed(lambda: comm.allreduce(x), warmup, iters)
    comm.recv_step()  # the Stop
    out.put((f"star-{rank}", res))
    link.close()


def ring_rank(rank: int, world: int, endpoints: list[str], cases: list, out) -> None:
    from tpi.transport.allreduce import RingAllreduce

    ring = RingAllreduce(rank, world, endpoints, "f32", timeout_s=_TIMEOUT_S)
    res = {}
    for i, (hidden, wire, warmup, iters) in enumerate(cases):
        ring.wire_dtype = wire
        x = partial_for(hidden, rank)
        res[i] = _timed(lambda: ring.allreduce(x), warmup, iters)
    out.put((f"ring-{rank}", res))
    time.sleep(0.5)  # the last hop to the right neighbour must leave before close
    ring.close()


def gloo_rank(rank: int, world: int, init_file: str, cases: list, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res = {}
    for i, (hidden, wire, warmup, iters) in enumerate(cases):
        x = torch.from_numpy(partial_for(hidden, rank)).to(torch.bfloat16 if wire == "bf16" else torch.float32)
        res[i] = _timed(lambda: dist.all_reduce(x), warmup, iters)  # in place; values grow, time does not
    dist.barrier()
    out.put((f"gloo-{rank}", res))
    dist.destroy_process_group()


def echo_server(ports, stop_after: int) -> None:
    """Bare pyzmq ROUTER that sends every frame straight back: the anchor round trip."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ports.put(port)
    for _ in range(stop_after):
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    ctx.destroy(linger=0)


def echo_client(endpoint: str, cases: list, out) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = int(_TIMEOUT_S * 1000)
    sock.connect(endpoint)
    res = {}
    for i, (hidden, wire, warmup, iters) in enumerate(cases):
        frame = np.zeros(hidden * (2 if wire == "bf16" else 4), np.uint8).tobytes()

        def round_trip() -> None:
            sock.send(frame, copy=False)
            sock.recv(copy=False)
        res[i] = _timed(round_trip, warmup, iters)
    out.put(("zmq-1", res))
    ctx.destroy(linger=0)


# ---- orchestration -------------------------------------------------------------------------------

class Run:
    """The processes of one method at one delay; collects their results, kills what it started."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.out = self.ctx.Queue()
        self.procs: list = []
        self.helpers: list = []  # proxies: killed, never awaited

    def start(self, target, *args, helper: bool = False):
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        (self.helpers if helper else self.procs).append(p)
        return p

    def proxy(self, targets: list[int], delay_s: float) -> list[int]:
        q = self.ctx.Queue()
        self.start(run_proxy, targets, delay_s, q, helper=True)
        return q.get(timeout=60)

    def collect(self, n: int) -> dict:
        """n results; fails fast when a rank process died instead of waiting out the timeout."""
        got: dict = {}
        deadline = time.monotonic() + _TIMEOUT_S * 4
        while len(got) < n:
            try:
                role, res = self.out.get(timeout=1.0)
                got[role] = res
                continue
            except queue.Empty:
                pass
            dead = [p for p in self.procs + self.helpers if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"benchmark process {dead[0].name if dead else '?'} failed or timed out "
                                   "(its traceback is above)")
        for p in self.procs:
            p.join(timeout=30)
        return got

    def close(self) -> None:
        for p in self.procs + self.helpers:
            if p.is_alive():
                p.kill()
                p.join()


def bench_star(world: int, cases: list, delay_s: float, curve: bool, tmp: Path) -> list[float]:
    run = Run()
    try:
        ports = run.ctx.Queue()
        run.start(star_master, world, cases, curve, str(tmp / "master"), ports, run.out)
        port, data_port, token = ports.get(timeout=60)
        if delay_s > 0:
            port, data_port = run.proxy([port, data_port], delay_s)
        for rank in range(1, world):
            run.start(star_worker, rank, f"127.0.0.1:{port}", f"tcp://127.0.0.1:{data_port}", token,
                      str(tmp / f"w{rank}"), curve, cases, run.out)
        return run.collect(world)["star-1"]
    finally:
        run.close()


def bench_ring(world: int, cases: list, delay_s: float) -> list[float]:
    run = Run()
    try:
        real = [_free_port() for _ in range(world)]
        via = run.proxy(real, delay_s) if delay_s > 0 else real
        for rank in range(world):  # bind my own port, reach the others through their proxy
            endpoints = [f"tcp://127.0.0.1:{real[r] if r == rank else via[r]}" for r in range(world)]
            run.start(ring_rank, rank, world, endpoints, cases, run.out)
        return run.collect(world)["ring-1"]
    finally:
        run.close()


def bench_gloo(world: int, cases: list, tmp: Path) -> list[float]:
    run = Run()
    try:
        init_file = tmp / f"gloo-{world}"
        for rank in range(world):
            run.start(gloo_rank, rank, world, str(init_file), cases, run.out)
        return run.collect(world)["gloo-1"]
    finally:
        run.close()


def bench_echo(cases: list, delay_s: float) -> list[float]:
    run = Run()
    try:
        ports = run.ctx.Queue()
        run.start(echo_server, ports, sum(w + n for _, _, w, n in cases), helper=True)
        port = ports.get(timeout=60)
        if delay_s > 0:
            (port,) = run.proxy([port], delay_s)
        run.start(echo_client, f"tcp://127.0.0.1:{port}", cases, run.out)
        return run.collect(1)["zmq-1"]
    finally:
        run.close()


def iterations(delay_s: float, smoke: bool) -> tuple[int, int]:
    """(warm-up, timed) calls per case: ~0.5 s of hops per case when delayed."""
    if smoke:
        return 3, 10
    if delay_s == 0:
        return 100, 600
    return 5, max(30, int(0.5 / (2 * delay_s)))


def stats(times: list[float]) -> tuple[float, float]:
    return median(times) * 1e6, float(np.percentile(times, 90)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="576,1536,4096,8192", help="hidden sizes at N=2")
    ap.add_argument("--delays-ms", default="0,1,5", help="one-way delays; 0 = direct loopback")
    ap.add_argument("--worlds", default="2,3", help="group sizes; N > 2 runs hidden 4096 f32 only")
    ap.add_argument("--wires", default="f32,bf16")
    ap.add_argument("--curve", action="store_true", help="CURVE-encrypt the star links (default off, as --insecure)")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="N=2, two sizes, 0 and 1 ms, few calls")
    args = ap.parse_args()
    hiddens = [int(h) for h in args.hidden.split(",")]
    delays = [float(d) / 1e3 for d in args.delays_ms.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    wires = args.wires.split(",")
    if args.smoke:
        hiddens, delays, worlds, wires = [576, 4096], [0.0, 0.001], [2], ["f32", "bf16"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tpi-bench-ar-") as tmp_dir:
        tmp = Path(tmp_dir)
        for world in worlds:
            grid = [(h, w) for h in hiddens for w in wires] if world == 2 else [(4096, "f32")]
            for delay in delays:
                warmup, iters = iterations(delay, args.smoke)
                cases = [(h, w, warmup, iters) for h, w in grid]
                label = f"N={world}, {delay * 1e3:g} ms"
                print(f"running {label}: pyzmq echo, star, ring" + (", gloo" if delay == 0 else ""),
                      file=sys.stderr, flush=True)
                echo = bench_echo(cases, delay)
                star = bench_star(world, cases, delay, args.curve, tmp / f"star-{world}-{delay}")
                ring = bench_ring(world, cases, delay)
                gloo = bench_gloo(world, cases, tmp) if delay == 0 and not args.no_gloo else None
                for i, (h, w) in enumerate(grid):
                    rtt, s, r = stats(echo[i]), stats(star[i]), stats(ring[i])
                    g = stats(gloo[i]) if gloo else ("-", "-")
                    rows.append([world, f"{delay * 1e3:g}", h, w, rtt[0], s[0], s[1], ratio(s[0], rtt[0]),
                                 r[0], r[1], ratio(s[0], r[0]), g[0], g[1],
                                 ratio(s[0], g[0]) if gloo else "-"])
    info = machine_info()
    print_table(
        "Allreduce latency per call (µs), rank 1, TCP loopback",
        ["N", "one-way delay ms", "hidden", "wire", "pyzmq RTT", "star median", "star p90", "star/RTT ratio",
         "ring median", "ring p90", "star/ring ratio", "gloo median", "gloo p90", "star/gloo ratio"],
        rows,
        notes=["pyzmq RTT = bare DEALER->ROUTER echo of a frame of the same bytes on the same path, same run "
               "(the floor of any allreduce that needs a round trip). delay 0 = direct loopback; delay > 0 = "
               "DelayProxy (own process) on every link, one way each direction.",
               f"star {'with CURVE' if args.curve else 'insecure (no CURVE)'}, MasterLink/WorkerLink as tpi "
               "serve uses them; ring = tpi.transport.allreduce.RingAllreduce (benchmark-only); gloo = "
               "torch.distributed all_reduce, file:// store, 1 torch thread, only at delay 0 (see the module doc).",
               f"target: star median <= 80 µs at hidden 4096 on loopback. Calls per case: "
               f"{iterations(0.0, args.smoke)[1]} at 0 ms, fewer when delayed.",
               f"machine: {info}",
               "command: python bench/allreduce.py " + " ".join(sys.argv[1:])],
    )


if __name__ == "__main__":
    main()
