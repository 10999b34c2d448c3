"""What bounds the star allreduce on one host: libzmq's round trip, or Python? A measured prototype.

    python bench/star_floor.py [--hidden 576,4096] [--rounds 30] [--block 40]

From one process (the worker side), in alternating blocks so every variant sees the same
minutes of this shared machine, per call of a [1, hidden] f32 partial on TCP loopback:
- pyzmq echo: a bare DEALER -> ROUTER echo of the partial's bytes (bench/allreduce.py's anchor);
- tpi star: StarWorker.allreduce against a StarMaster (MasterLink/WorkerLink, insecure);
- TCP echo: the same bytes echoed over a plain blocking socket (no libzmq I/O threads);
- TCP star: a prototype star over a plain socket: a 16-byte header (magic, step, op, bytes) is
  checked, the partial is received in place, the master adds its own partial and sends the sum;
- TLS star: the TCP star inside TLS 1.3 (Python's ssl, a throwaway self-signed certificate), the
  cost of encryption that would replace CURVE on such a channel.
The prototypes are not tpi's transport: they show what a data channel without libzmq's I/O
threads would gain (docs/benchmarks.md, "What bounds the star").
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, median, print_table  # noqa: E402

HEADER = struct.Struct("<4sIII")  # magic, step, op, payload bytes
MAGIC = b"tpi1"


def recv_exact(sock, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed")
        got += n


def make_certificate(tmp: Path) -> None:
    """A throwaway self-signed certificate (openssl CLI) in tmp, for tls_contexts."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"), "-days", "1",
                    "-subj", "/CN=tpi-bench"], check=True, capture_output=True)


def tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS 1.3 contexts around the certificate in tmp."""
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    client.check_hostname = False
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client


# ---- servers (spawned processes) ------------------------------------------------------------------

def zmq_echo(ports) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    ports.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def tcp_server(ports, hidden: int, star: bool, tls_dir: str | None) -> None:
    """Echo, or a prototype star master: check the header, add my partial, send header + sum."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    ports.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls_dir:
        conn = tls_contexts(Path(tls_dir))[0].wrap_socket(conn, server_side=True)
    nbytes = hidden * 4
    frame = bytearray(HEADER.size + nbytes)
    view = memoryview(frame)
    mine = np.ones(hidden, np.float32)
    part = np.frombuffer(frame, np.float32, hidden, HEADER.size)
    while True:
        recv_exact(conn, view)
        if star:
            magic, step, op, size = HEADER.unpack_from(frame)
            if magic != MAGIC or size != nbytes:
                raise ValueError("malformed partial")
            conn.sendall(frame[:HEADER.size] + np.add(mine, part).tobytes())
        else:
            conn.sendall(frame)


def tpi_master(hidden: int, calls: int, key_dir: str, ports) -> None:
    from tpi.transport.link import MasterLink
    from tpi.transport.protocol import Assign, Step

    link = MasterLink("127.0.0.1:0", Path(key_dir), insecure=True)
    ports.put((link.port, link.token))
    link.admit(link.next_join(timeout=60), Assign(rank=1, world=2, shard_hash="", shard_size=0))
    comm = link.communicator("f32", ready_timeout_s=60)
    comm.broadcast_step(Step.of_sequence(0, 1, np.zeros((1, 1), np.float32)))
    x = np.ones((1, hidden), np.float32)
    for _ in range(calls):
        comm.allreduce(x)
    time.sleep(1)
    link.close()


# ---- the measuring side -----------------------------------------------------------------------------

def measure(hidden: int, rounds: int, block: int, warmup: int, tmp: Path) -> dict[str, list[list[float]]]:
    import zmq

    from tpi.transport.worker_link import WorkerLink

    ctx = mp.get_context("spawn")
    procs, ports = [], ctx.Queue()

    def start(target, *args):
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        procs.append(p)
        return ports.get(timeout=60)

    make_certificate(tmp)
    try:
        zport = start(zmq_echo, ports)
        tcp_ports = {k: start(tcp_server, ports, hidden, k != "TCP echo", str(tmp) if k == "TLS star" else None)
                     for k in ("TCP echo", "TCP star", "TLS star")}
        port, token = start(tpi_master, hidden, warmup + rounds * block, str(tmp / "master"), ports)
        link = WorkerLink(f"127.0.0.1:{port}", token, tmp / "worker", insecure=True)
        link.join("w1", {}, [])
        comm = link.communicator()
        comm.recv_step()
        zsock = zmq.Context.instance().socket(zmq.DEALER)
        zsock.connect(f"tcp://127.0.0.1:{zport}")
        x = np.ones((1, hidden), np.float32)
        conns = {}
        for name, p in tcp_ports.items():
            conn = socket.create_connection(("127.0.0.1", p))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[name] = tls_contexts(tmp)[1].wrap_socket(conn) if name == "TLS star" else conn
        nbytes = hidden * 4
        reply = bytearray(HEADER.size + nbytes)
        view = memoryview(reply)
        state = {"op": 0}

        def tcp_call(conn) -> np.ndarray:
            state["op"] += 1
            conn.sendall(HEADER.pack(MAGIC, 1, state["op"], nbytes) + x.tobytes())
            recv_exact(conn, view)
            if HEADER.unpack_from(reply)[:3] != (MAGIC, 1, state["op"]):
                raise ValueError("malformed sum")
            return np.frombuffer(reply, np.float32, hidden, HEADER.size).copy()

        calls = {
            "pyzmq echo": lambda: (zsock.send(x, copy=False), zsock.recv(copy=False)),
            "tpi star": lambda: comm.allreduce(x),
            **{name: (lambda c=c: tcp_call(c)) for name, c in conns.items()},
        }
        for call in calls.values():
            for _ in range(warmup):
                call()
        times: dict[str, list[list[float]]] = {k: [] for k in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                block_times = []
                for _ in range(block):
                    t = time.perf_counter()
                    call()
                    block_times.append(time.perf_counter() - t)
                times[name].append(block_times)
        link.close()
        return times
    finally:
        for p in procs:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="576,4096")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    rounds, block, warmup = (2, 5, 3) if args.smoke else (args.rounds, args.block, 100)
    load = machine_info().get("load_avg_1m", "?")
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        with tempfile.TemporaryDirectory(prefix="tpi-star-floor-") as tmp:
            times = measure(hidden, rounds, block, warmup, Path(tmp))
        anchor = times["pyzmq echo"]
        for name, blocks in times.items():
            per_block = median([median(b) / median(a) for b, a in zip(blocks, anchor)])
            flat = [t for b in blocks for t in b]
            rows.append([hidden, name, median(flat) * 1e6, float(np.percentile(flat, 90)) * 1e6, f"{per_block:.2f}x"])
    print_table("What bounds the star: per call (µs), [1, hidden] f32 on TCP loopback, one worker",
                ["hidden", "variant", "median", "p90", "vs pyzmq echo (paired)"], rows,
                notes=[f"{rounds} alternating blocks of {block} calls per variant after {warmup} warm-up calls; "
                       "ratio = median over blocks of (block median / the pyzmq echo's block median).",
                       "TCP/TLS star are prototypes in this file (Python, blocking sockets, one thread per side), "
                       "not tpi's transport; tpi star is StarWorker/StarMaster over MasterLink/WorkerLink, insecure.",
                       f"machine: {machine_info()}; load average (1 min) {load} at the start",
                       "command: python bench/star_floor.py " + " ".join(sys.argv[1:])])


if __name__ == "__main__":
    main()
