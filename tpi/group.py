"""The master side of a group: wait for devices, cut and ship shards, and build rank 0's engine.

A group of one (no workers) takes the same path minus the network, so `tpi run` and
`tpi serve` share it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpi.errors import GroupError, TpiError

log = logging.getLogger(__name__)
STORE_FORMAT = 1  # bump when the block layout in tpi/shard.py changes: old cached stores go stale


@dataclass(frozen=True)
class GroupOptions:
    model: str | None = None
    devices: int = 1  # total group size the master waits for, itself included
    local_workers: int = 0  # worker processes started on this machine (loopback)
    host: str = "0.0.0.0"
    port: int = 0  # 0 = any free port
    context: int | None = None
    threads: int | None = None
    backend: str = "torch"
    worker_backend: str = "torch"  # backend of the local workers
    memory_budget: int | None = None  # rank 0's budget in bytes
    worker_memory_budget: int | None = None  # each local worker's budget
    ratios: tuple[float, ...] | None = None  # split ratios by rank; None = equal
    wire_dtype: str = "f32"
    insecure: bool = False
    config_dir: Path = Path.home() / ".config" / "tpi"
    cache_dir: Path = Path.home() / ".cache" / "tpi"
    join_timeout_s: float = 600.0
    link_settings: object = None  # tpi.transport.link.LinkSettings


@dataclass
class DeviceInfo:
    rank: int
    name: str
    address: str
    share: dict
    profile: dict = field(default_factory=dict)
    state: str = "ready"


class Group:
    """A running group: rank 0's engine plus what is needed to stop it cleanly."""

    def __init__(self, engine, devices: list[DeviceInfo], link=None, procs=(), token: str | None = None):
        self.engine = engine
        self.devices = devices
        self.link = link
        self.procs = list(procs)
        self.token = token
        self.state = "serving"
        self._closed = False
        self._closing = threading.Event()
        self._refuser = None
        if link is not None:  # the group is formed: anyone joining now is turned away, not left waiting
            self._refuser = threading.Thread(target=self._refuse_late_joins, name="tpi-refuser", daemon=True)
            self._refuser.start()

    def _refuse_late_joins(self) -> None:
        world = len(self.devices)
        reason = (f"group already full: all {world} devices joined and it is serving; "
                  f"restart tpi serve with --devices {world + 1} to include this device")
        while not self._closing.is_set():
            join = self.link.next_join(timeout=0.2)
            if join is None:
                continue
            try:
                self.link.refuse(join, reason)
            except TpiError as e:  # the link is going down; nothing left to refuse with
                log.debug("could not refuse %s: %s", join.name, e)
                return

    def status(self) -> dict:
        return {
            "state": self.state,
            "world": len(self.devices),
            "model": self.engine.cfg.name,
            "context": self.engine.context,
            "devices": [vars(d) for d in self.devices],
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._refuser is not None:
            self._refuser.join(timeout=2)
        comm = self.engine.comm
        if comm.world > 1:
            try:
                comm.broadcast_stop("master is shutting down")
            except TpiError as e:
                log.debug("stop broadcast failed: %s", e)
        if self.link is not None:
            self.link.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.engine.model.weights.close()


def lan_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def join_command(host: str, port: int, token: str, insecure: bool) -> str:
    shown = lan_address() if host in ("0.0.0.0", "") else host
    return f"tpi join {shown}:{port} --token {token}" + (" --insecure" if insecure else "")


def _store_key(source, shard_dict: dict, with_embed: bool) -> str:
    st = Path(source.path).stat()
    ident = {"v": STORE_FORMAT, "model": str(Path(source.path).resolve()), "size": st.st_size,
             "mtime": st.st_mtime_ns, "shard": shard_dict, "embed": with_embed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _write_stores(source, cfg, shards, paths: dict[int, Path], rank0_sink) -> None:
    """One pass over the model: rank 0's blocks go to rank0_sink, ranks in `paths` to store files.

    Each store is written by its own thread from a small queue, so every source tensor is
    read and imported once however many ranks there are.
    """
    from tpi.config import config_to_dict
    from tpi.scheduler.store import write_store
    from tpi.shard import iter_rank_blocks, shard_to_dict

    queues = {r: queue.Queue(maxsize=2) for r in paths}
    errors: dict[int, BaseException] = {}

    def feed(q: queue.Queue):
        while (item := q.get()) is not None:
            yield item

    def write(rank: int) -> None:
        meta = {"format": STORE_FORMAT, "config": config_to_dict(cfg), "shard": shard_to_dict(shards[rank])}
        try:
            write_store(paths[rank], meta, feed(queues[rank]))
        except BaseException as e:  # reported after the pass; keep draining so the producer never blocks
            errors[rank] = e
            for _ in feed(queues[rank]):
                pass

    threads = [threading.Thread(target=write, args=(r,), daemon=True) for r in paths]
    for t in threads:
        t.start()
    try:
        for key, per_rank in iter_rank_blocks(source, cfg, shards):
            rank0_sink(key, per_rank[0])
            for r, q in queues.items():
                q.put((key, per_rank[r]))
    finally:
        for q in queues.values():
            q.put(None)
        for t in threads:
            t.join()
    if errors:
        rank, e = next(iter(errors.items()))
        raise GroupError(f"writing the shard for rank {rank} failed: {e}") from e


def _spawn_local_workers(opts: GroupOptions, port: int, token: str, threads: int) -> list[subprocess.Popen]:
    procs = []
    for i in range(opts.local_workers):
        cmd = [sys.executable, "-m", "tpi", "join", f"127.0.0.1:{port}", "--token", token,
               "--name", f"local-{i + 1}", "--cache-dir", str(opts.cache_dir / f"local-{i + 1}"),
               "--key-dir", str(opts.config_dir / f"local-{i + 1}"), "--threads", str(threads),
               "--backend", opts.worker_backend]
        if opts.worker_memory_budget:
            cmd += ["--memory-budget", str(opts.worker_memory_budget)]
        if opts.insecure:
            cmd.append("--insecure")
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
    return procs


def _collect_joins(link, needed: int, procs, timeout_s: float, say) -> list:
    joins, deadline = [], time.monotonic() + timeout_s
    while len(joins) < needed:
        j = link.next_join(timeout=0.5)
        if j is not None:
            joins.append(j)
            say(f"device joined: {j.name} ({j.address}) [{len(joins)}/{needed}]")
            continue
        for p in procs:
            if p.poll() is not None:
                raise GroupError(f"a local worker exited with code {p.returncode} before joining; see its log above")
        if time.monotonic() > deadline:
            raise GroupError(f"only {len(joins)} of {needed} devices joined within {timeout_s:.0f}s; "
                             "run the printed `tpi join` command on each device or lower --devices")
    return joins


def start_group(opts: GroupOptions, say=log.info) -> Group:
    """Open the model, gather the devices, ship shards, and return the serving group."""
    from tpi.config import config_to_dict
    from tpi.devices.slicing import plan_shards
    from tpi.engine import make_layers, resolve_context
    from tpi.formats import open_model
    from tpi.generate import Engine
    from tpi.model import ResidentWeights, Transformer
    from tpi.scheduler.store import ShardStore
    from tpi.shard import shard_to_dict
    from tpi.transport.protocol import Assign
    from tpi.transport.transfer import shard_hash
    from tpi.weights import open_store_weights

    source = open_model(opts.model)
    cfg = source.config
    context = resolve_context(cfg, opts.context)
    world = max(opts.devices, 1 + opts.local_workers)
    if world > cfg.n_heads:
        raise GroupError(f"{world} devices but the model has {cfg.n_heads} query heads; use at most {cfg.n_heads}")
    tokenizer = source.tokenizer()
    cores = os.cpu_count() or 1
    threads = opts.threads or max(1, cores // (1 + opts.local_workers))
    link, procs, joins = None, [], []
    try:
        if world > 1:
            from tpi.transport.link import LinkSettings, MasterLink

            opts.config_dir.mkdir(parents=True, exist_ok=True)
            link = MasterLink(f"tcp://{opts.host}:{opts.port}", opts.config_dir, insecure=opts.insecure,
                              settings=opts.link_settings or LinkSettings())
            say(f"waiting for {world - 1} device(s); on each one run:\n  {join_command(opts.host, link.port, link.token, opts.insecure)}")
            procs = _spawn_local_workers(opts, link.port, link.token, max(1, cores // world))
            joins = _collect_joins(link, world - 1, procs, opts.join_timeout_s, say)
        ratios = opts.ratios or tuple([1.0 / world] * world)
        if len(ratios) != world:
            raise GroupError(f"{len(ratios)} split ratios for {world} devices; give one per device")
        shards = plan_shards(cfg, ratios)
        layers = make_layers(opts.backend, cfg, shards[0], context, threads)

        shard_dir = opts.cache_dir / "master"
        shard_dir.mkdir(parents=True, exist_ok=True)
        ranks_to_store = list(range(1, world)) + ([0] if opts.memory_budget else [])
        paths = {r: shard_dir / f"{_store_key(source, shard_to_dict(shards[r]), r == 0)}.tpis" for r in ranks_to_store}
        missing = {r: p for r, p in paths.items() if not p.exists()}
        resident: dict = {}

        def keep_rank0(key: str, blk: dict) -> None:
            if not opts.memory_budget:
                resident[key] = layers.to_runtime(blk)

        t0 = time.perf_counter()
        if missing or not opts.memory_budget:
            say(f"cutting {cfg.name} into {world} shard(s)…")
            _write_stores(source, cfg, shards, missing, keep_rank0)
        say(f"shards ready in {time.perf_counter() - t0:.1f}s")
        stores = {r: ShardStore.open(p) for r, p in paths.items()}
        devices = [DeviceInfo(0, "master", "local", shard_to_dict(shards[0]))]
        for rank, j in enumerate(joins, start=1):
            st = stores[rank]
            assignment = {"config": config_to_dict(cfg), "shard": shard_to_dict(shards[rank]), "context": context}
            link.admit(j, Assign(rank, world, shard_hash(st.path), st.nbytes, opts.wire_dtype, assignment=assignment),
                       st.path)
            devices.append(DeviceInfo(rank, j.name, j.address, shard_to_dict(shards[rank]), dict(j.profile)))
        if opts.memory_budget:
            weights = open_store_weights(stores[0], layers, cfg, shards[0], context, opts.memory_budget)
        else:
            weights = ResidentWeights(resident)
        embed = weights.get("globals")["embed"]
        weights.release("globals")
        comm = None
        if world > 1:
            say("sending shards and waiting for every device to load…")
            comm = link.communicator(opts.wire_dtype)
        model = Transformer(cfg, layers, weights, comm)
        engine = Engine(cfg, tokenizer, model, embed, context)
        say(f"group of {world} ready: {', '.join(d.name for d in devices)}")
        return Group(engine, devices, link, procs, link.token if link else None)
    except BaseException:
        if link is not None:
            link.close()
        for p in procs:
            p.kill()
        raise

