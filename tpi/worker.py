"""`tpi join`: a worker joins the group, caches its shard, and computes its share of every step."""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tpi.devices.slicing import shard_from_dict
from tpi.errors import GroupError, NoAnswerError, TpiError
from tpi.model.backends import make_layers
from tpi.model.config import config_from_dict
from tpi.model.transformer import Transformer
from tpi.model.weights import open_store_weights
from tpi.scheduler.store import ShardStore, verified_content_hash
from tpi.transport.keeper import LinkSettings, parse_endpoint
from tpi.transport.worker_link import WorkerLink
from tpi.model.rows import Rows
from tpi.transport.protocol import Step, Stop, Truncate

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tpis"


@dataclass(frozen=True)
class WorkerOptions:
    master: str  # HOST:PORT of `tpi serve`
    token: str
    name: str
    cache_dir: Path  # shard cache, keyed by content hash
    key_dir: Path  # this device's CURVE keypair
    backend: str = "auto"  # tpi.model.backends.resolve_backend picks: ggml, else numpy
    threads: int | None = None
    memory_budget: int | None = None
    insecure: bool = False
    profile: dict = field(default_factory=dict)
    link_settings: object = None  # tpi.transport.link.LinkSettings; None = defaults
    data_endpoint: str | None = None  # HOST:PORT of the master's data channel; None = master port + 1
    heartbeat_timeout_s: float | None = None  # a master silent this long is lost; None = the master's setting
    reconnect_s: float = 60.0  # how long to keep trying to reach a lost master before giving up


def cached_hashes(cache_dir: Path) -> list[str]:
    return sorted(p.name[: -len(SHARD_SUFFIX)] for p in cache_dir.glob(f"*{SHARD_SUFFIX}"))


def run_worker(opts: WorkerOptions) -> dict:
    """Join, fetch (or reuse) the shard, serve steps until the master stops us. Returns stats.

    A master that goes silent is waited for (reconnecting with backoff for opts.reconnect_s)
    and joined again; a master that asks its devices to rejoin (a re-planned group) is joined
    again at once. Only a master that stops the group, refuses us, or never comes back ends this.
    """
    opts.cache_dir.mkdir(parents=True, exist_ok=True)
    _import_backend(opts.backend)
    loaded: dict = {}  # what the previous round loaded: {"key": what the Assign asked for, "model": ...}
    total = {"rank": None, "steps": 0, "transfer": None, "rounds": 0}
    give_up_at = None  # while the master is lost: when to stop trying
    while True:
        total["rounds"] += 1
        outcome = _serve_round(opts, loaded, total, reconnecting=give_up_at is not None)
        if outcome.kind == "stopped":
            return total
        if outcome.kind == "rejoin":
            log.info("the master re-plans the group (%s); joining again", outcome.reason)
            give_up_at = None
            continue
        if outcome.kind == "joined" or give_up_at is None:  # lost while serving: a fresh window
            give_up_at = time.monotonic() + opts.reconnect_s
        _wait_for_master(opts, outcome.reason, give_up_at)


def _import_backend(backend: str) -> None:
    """Import the kernel backend before joining: loading torch's libraries holds the GIL for
    seconds on a busy machine, which would starve the heartbeat thread once admitted."""
    if backend == "torch":
        try:
            import tpi.model.layers_torch  # noqa: F401
        except ImportError:
            pass  # make_layers reports the missing torch with the fix once the shard is assigned


@dataclass(frozen=True)
class RoundOutcome:
    kind: str  # "stopped" | "rejoin" | "lost" (never joined this round) | "joined" (joined, then lost)
    reason: str = ""


def _settings(opts: WorkerOptions) -> LinkSettings:
    settings = opts.link_settings or LinkSettings()
    if opts.heartbeat_timeout_s is not None:
        settings = replace(settings, timeout_s=opts.heartbeat_timeout_s,
                           heartbeat_s=min(settings.heartbeat_s, opts.heartbeat_timeout_s / 4))
    return settings


def _serve_round(opts: WorkerOptions, loaded: dict, total: dict, reconnecting: bool) -> RoundOutcome:
    """One membership: join, get the shard and model ready, serve steps until stopped or lost."""
    data = "tcp://{}:{}".format(*parse_endpoint(opts.data_endpoint)) if opts.data_endpoint else None
    link = WorkerLink(opts.master, opts.token, opts.key_dir, insecure=opts.insecure, settings=_settings(opts),
                      data_endpoint=data, timeout_from_master=opts.heartbeat_timeout_s is None)
    try:
        try:
            assign = link.join(opts.name, opts.profile, cached_hashes(opts.cache_dir))
        except NoAnswerError as e:
            if reconnecting:  # its port is open but it does not answer yet: keep trying
                return RoundOutcome("lost", str(e))
            raise
        log.info("joined as rank %d of %d", assign.rank, assign.world)
        total["rank"] = assign.rank
        try:
            model = _ready_model(link, assign, opts, loaded, total)
            comm = link.communicator()
            model.comm = comm
            log.info("ready: rank %d computing", assign.rank)
            steps, stop = _serve_steps(model, comm, link.master_lost)
            total["steps"] += steps
        except GroupError:
            lost, stop = link.master_lost(), link.master_stopped()
            if lost is None:
                raise
            if stop is None:
                return RoundOutcome("joined", lost)
        if stop.rejoin:
            return RoundOutcome("rejoin", stop.reason)
        log.info("master stopped the group: %s", stop.reason)
        return RoundOutcome("stopped", stop.reason)
    finally:
        link.close()


def _ready_model(link, assign, opts: WorkerOptions, loaded: dict, total: dict):
    """The model for this assignment: the one already loaded when it is the same, else fetched and loaded."""
    key = (assign.shard_hash, json.dumps([assign.config, assign.shard, assign.context, assign.slots], sort_keys=True))
    dest = opts.cache_dir / f"{assign.shard_hash}{SHARD_SUFFIX}"
    if loaded.get("key") == key and dest.exists():
        log.info("shard: 0 bytes transferred (already loaded)")
        return loaded["model"]
    if loaded.get("model") is not None:  # another shard: free the old weights before loading
        loaded.pop("model").weights.close()
        loaded.clear()
    had_file = dest.exists()
    transfer = link.fetch_shard(dest, assign.shard_hash, assign.shard_size, verified_content_hash, progress=True)
    _log_transfer(transfer, had_file)
    total["transfer"] = transfer
    try:
        model, _ = _load_model(dest, assign, opts)
    except TpiError as e:  # e.g. an impossible --memory-budget: the master reports why we left
        link.send(Stop(f"cannot load its shard: {e}"))
        raise
    loaded.update(key=key, model=model)
    return model


def _wait_for_master(opts: WorkerOptions, reason: str, give_up_at: float) -> None:
    """Back off until the master's port answers again; GroupError once give_up_at has passed."""
    host, port = parse_endpoint(opts.master)
    delay = 0.5
    log.warning("trying to reach the master at %s:%d again (for %.0fs more)", host, port,
                max(0.0, give_up_at - time.monotonic()))
    while True:
        left = give_up_at - time.monotonic()
        if left > 0 and _port_answers(host, port, min(2.0, left)):
            log.info("the master at %s:%d answers again; rejoining", host, port)
            return
        left = give_up_at - time.monotonic()
        if left <= 0:
            raise GroupError(f"lost the master at {host}:{port} ({reason}) and it did not come back within "
                             f"{opts.reconnect_s:.0f}s; run tpi join again once tpi serve is running")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 8.0)


def _port_answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_transfer(transfer, had_file: bool) -> None:
    if transfer.cached:
        log.info("shard: 0 bytes transferred (cached)")
        return
    if had_file:
        log.warning("cached shard failed its content hash check; fetched it again")
    log.info("shard: %d bytes transferred (%d resumed) in %.1fs", transfer.bytes_transferred,
             transfer.bytes_resumed, transfer.seconds)


def _load_model(path: Path, assign, opts: WorkerOptions):
    cfg = config_from_dict(assign.config)
    shard = shard_from_dict(assign.shard, cfg)
    if not 0 < assign.context <= 1 << 20:
        raise GroupError(f"the master assigned an invalid context {assign.context}")
    store = ShardStore.open(path)
    t0 = time.perf_counter()
    layers = make_layers(opts.backend, cfg, shard, assign.context, opts.threads, slots=assign.slots)
    weights = open_store_weights(store, layers, cfg, shard, assign.context, opts.memory_budget)
    log.info("loaded shard in %.1fs", time.perf_counter() - t0)
    return Transformer(cfg, layers, weights), store


def _serve_steps(model, comm, master_lost=lambda: None) -> tuple[int, Stop]:
    """Compute steps until the master sends Stop; returns (steps served, the Stop).

    GroupError if the master is lost.
    """
    steps = 0
    while True:
        msg = comm.recv_step()
        if isinstance(msg, Stop):
            return steps, msg
        if isinstance(msg, Truncate):
            model.truncate(msg.slot, msg.keep)
            continue
        assert isinstance(msg, Step)
        try:
            logits = model.forward(msg.x, Rows(tuple(msg.slots), tuple(msg.starts), tuple(msg.counts), tuple(msg.outputs),
                                                  msg.exact))
            comm.gather(logits)
        except GroupError as e:
            if master_lost():
                raise
            # The master gave up on this step (another device was lost): follow its next control.
            log.warning("step abandoned: %s", e)
            continue
        steps += 1
