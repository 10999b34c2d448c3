"""`tpi join`: a worker joins the group, caches its shard, and computes its share of every step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpi.errors import GroupError, TpiError

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tpis"


@dataclass(frozen=True)
class WorkerOptions:
    master: str  # HOST:PORT of `tpi serve`
    token: str
    name: str
    cache_dir: Path  # shard cache, keyed by content hash
    key_dir: Path  # this device's CURVE keypair
    backend: str = "torch"
    threads: int | None = None
    memory_budget: int | None = None
    insecure: bool = False
    profile: dict = field(default_factory=dict)
    link_settings: object = None  # tpi.transport.link.LinkSettings; None = defaults
    data_endpoint: str | None = None  # HOST:PORT of the master's data channel; None = master port + 1


def cached_hashes(cache_dir: Path) -> list[str]:
    return sorted(p.name[: -len(SHARD_SUFFIX)] for p in cache_dir.glob(f"*{SHARD_SUFFIX}"))


def run_worker(opts: WorkerOptions) -> dict:
    """Join, fetch (or reuse) the shard, serve steps until the master stops us. Returns stats."""
    from tpi.transport.link import LinkSettings, WorkerLink, parse_endpoint

    opts.cache_dir.mkdir(parents=True, exist_ok=True)
    data = "tcp://{}:{}".format(*parse_endpoint(opts.data_endpoint)) if opts.data_endpoint else None
    link = WorkerLink(opts.master, opts.token, opts.key_dir, insecure=opts.insecure,
                      settings=opts.link_settings or LinkSettings(), data_endpoint=data)
    try:
        assign = link.join(opts.name, opts.profile, cached_hashes(opts.cache_dir))
        log.info("joined as rank %d of %d", assign.rank, assign.world)
        dest = opts.cache_dir / f"{assign.shard_hash}{SHARD_SUFFIX}"
        had_file = dest.exists()
        transfer = link.fetch_shard(dest, assign.shard_hash, assign.shard_size, progress=True)
        _log_transfer(transfer, had_file)
        try:
            model, store = _load_model(dest, assign, opts)
        except TpiError as e:  # e.g. an impossible --memory-budget: the master reports why we left
            from tpi.transport.protocol import Stop

            link.send(Stop(f"cannot load its shard: {e}"))
            raise
        comm = link.communicator()
        model.comm = comm
        log.info("ready: rank %d computing", assign.rank)
        steps = _serve_steps(model, comm)
        return {"rank": assign.rank, "steps": steps, "transfer": transfer}
    finally:
        link.close()


def _log_transfer(transfer, had_file: bool) -> None:
    if transfer.cached:
        log.info("shard: 0 bytes transferred (cached)")
        return
    if had_file:
        log.warning("cached shard failed its content hash check; fetched it again")
    log.info("shard: %d bytes transferred (%d resumed) in %.1fs", transfer.bytes_transferred,
             transfer.bytes_resumed, transfer.seconds)


def _load_model(path: Path, assign, opts: WorkerOptions):
    from tpi.config import config_from_dict
    from tpi.engine import make_layers
    from tpi.model import Transformer
    from tpi.scheduler.store import ShardStore
    from tpi.shard import shard_from_dict
    from tpi.weights import open_store_weights

    a = assign.assignment
    cfg = config_from_dict(a.get("config"))
    shard = shard_from_dict(a.get("shard"), cfg)
    context = int(a.get("context", 0))
    if not 0 < context <= 1 << 20:
        raise GroupError(f"the master assigned an invalid context {context}")
    store = ShardStore.open(path)
    t0 = time.perf_counter()
    layers = make_layers(opts.backend, cfg, shard, context, opts.threads)
    weights = open_store_weights(store, layers, cfg, shard, context, opts.memory_budget)
    log.info("loaded shard in %.1fs", time.perf_counter() - t0)
    return Transformer(cfg, layers, weights), store


def _serve_steps(model, comm) -> int:
    steps = 0
    while True:
        header, x = comm.recv_step()
        kind = header["kind"]
        if kind == "stop":
            log.info("master stopped the group: %s", header.get("reason", ""))
            return steps
        if kind == "reset":
            continue  # positions restart at 0: cached keys/values are simply overwritten
        logits = model.forward(x, int(header["start_pos"]), bool(header.get("all", False)))
        comm.gather(logits, header.get("logits_dtype"))
        steps += 1
