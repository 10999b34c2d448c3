"""The master side of a group: wait for devices, cut and ship shards, and build rank 0's engine.

A group of one (no workers) takes the same path minus the network, so `tpi run` and
`tpi serve` share it.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tpi.errors import GroupError, TpiError

log = logging.getLogger(__name__)
STORE_FORMAT = 2  # bump when the block layout in tpi/shard.py changes: old cached stores go stale (2: GGUF types)


@dataclass(frozen=True)
class GroupOptions:
    model: str | None = None
    devices: int = 1  # total group size the master waits for, itself included
    local_workers: int = 0  # worker processes started on this machine (loopback)
    host: str = "0.0.0.0"
    port: int = 0  # 0 = any free port
    context: int | None = None
    slots: int = 1  # KV slots of `context` positions on every rank: sequences served at once (--parallel)
    threads: int | None = None
    backend: str = "auto"  # kernel backend of rank 0: auto (tpi.model.backends.resolve_backend), ggml, numpy or torch
    worker_backend: str = "auto"  # backend of the local workers
    memory_budget: int | None = None  # rank 0's budget in bytes
    worker_memory_budget: int | None = None  # each local worker's budget
    ratios: tuple[float, ...] | None = None  # split ratios by rank; None = the planner's (equal without one)
    wire_dtype: str | None = None  # allreduce wire dtype; None = the planner's choice (f32 without a plan)
    leave_out: bool = False  # let the planner refuse remote devices that would slow the group (tpi serve)
    profile: dict | None = None  # test-only: rank 0's device profile instead of measuring it
    worker_profile: dict | None = None  # test-only: the profile every local worker reports
    insecure: bool = False
    config_dir: Path = Path.home() / ".config" / "tpi"
    cache_dir: Path = Path.home() / ".cache" / "tpi"
    join_timeout_s: float = 600.0
    link_settings: object = None  # tpi.transport.link.LinkSettings
    rejoin_timeout_s: float = 30.0  # how long a lost device has to rejoin before the group re-plans
    replan: bool = True  # re-plan over the remaining devices when a lost one does not rejoin
    announce: bool = False  # announce the group on the LAN (mDNS) so `tpi join --token T` finds it (tpi serve)


    def __post_init__(self) -> None:
        check_wire_dtype(self.wire_dtype)


def check_wire_dtype(wire_dtype: str | None) -> None:
    """TpiError unless wire_dtype is None (the planner's choice) or a wire the allreduce carries."""
    from tpi.transport.wire import REDUCE_DTYPES

    if wire_dtype is not None and wire_dtype not in REDUCE_DTYPES:
        raise TpiError(f"--wire-dtype {wire_dtype!r} is not a wire dtype; use one of {', '.join(REDUCE_DTYPES)}")


@dataclass
class DeviceInfo:
    rank: int
    name: str
    address: str
    share: dict
    profile: dict = field(default_factory=dict)
    state: str = "ready"  # ready | lost
    plan: dict = field(default_factory=dict)  # share, predicted memory and link figures (planned groups)
    reason: str = ""  # why it was lost, or when it came back


class Group:
    """A running group: rank 0's engine plus what is needed to stop it cleanly."""

    def __init__(self, engine, devices: list[DeviceInfo], link=None, procs=(), token: str | None = None,
                 plan: dict | None = None, assigns: dict | None = None, opts: GroupOptions | None = None):
        self.engine = engine
        self.plan = plan or {}
        self.devices = devices
        self.link = link
        self.procs = list(procs)
        self.token = token
        self.assigns = assigns or {}  # rank -> (Assign as sent, shard path): what a rejoining device gets
        self.opts = opts or GroupOptions()
        self.state = "serving"  # serving | recovering | re-planning | degraded (tpi.master.recovery)
        self.supervisor = None
        self.announcer = None  # tpi.transport.discovery.Announcer while the group is announced on the LAN
        self._closed = False

    def supervise(self, say=log.info) -> None:
        """From a thread: refuse late joins, take a lost device back, or re-plan without it."""
        from tpi.master.recovery import GroupSupervisor

        self.supervisor = GroupSupervisor(self, say)
        self.supervisor.start()

    def status(self) -> dict:
        return {
            "state": self.state,
            "world": len(self.devices),
            "model": self.engine.cfg.name,
            "context": self.engine.context,
            "devices": [vars(d) for d in self.devices],
            "plan": self.plan,
            **(self.supervisor.status() if self.supervisor else {}),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.announcer is not None:
            self.announcer.close()
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
    """This machine's first non-loopback IPv4 address (what devices on the LAN reach), else loopback."""
    from tpi.transport.discovery import lan_addresses

    return next(iter(lan_addresses("0.0.0.0")), "127.0.0.1")


def join_command(host: str, port: int, token: str, insecure: bool, announced: bool = False) -> str:
    """What to run on each device: the explicit form, the short form (when announced), and one without
    the token on any command line (so it stays out of shell history and ps)."""
    shown = lan_address() if host in ("0.0.0.0", "") else host
    flag = " --insecure" if insecure else ""
    lines = [f"tpi join {shown}:{port} --token {token}{flag}"]
    if announced:
        lines.append(f"tpi join --token {token}{flag}    (short form: finds this master on the LAN)")
    lines.append(f"keeping the token out of shell history and ps: read -rs TPI_TOKEN && export TPI_TOKEN "
                 f"(paste the token), then: tpi join {shown}:{port}{flag}")
    return "\n  ".join(lines)


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
    from tpi.model.config import config_to_dict
    from tpi.scheduler.store import write_store
    from tpi.master.shard import iter_rank_blocks, shard_to_dict

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


def _spawn_local_workers(opts: GroupOptions, port: int, token: str, threads: int,
                         profile: dict | None = None) -> list[subprocess.Popen]:
    procs = []
    env = dict(os.environ, TPI_TOKEN=token)  # never in argv: any local user can read a command line (ps)
    for i in range(opts.local_workers):
        cmd = [sys.executable, "-m", "tpi", "join", f"127.0.0.1:{port}",
               "--name", f"local-{i + 1}", "--cache-dir", str(opts.cache_dir / f"local-{i + 1}"),
               "--key-dir", str(opts.config_dir / f"local-{i + 1}"), "--threads", str(threads),
               "--backend", opts.worker_backend]
        # Same machine: the master's measurement (or the test's override) stands in for the worker's.
        path = opts.cache_dir / f"local-{i + 1}" / "offered_profile.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(profile, name=f"local-{i + 1}") if profile else {}))
        cmd += ["--profile-file", str(path)]
        if opts.worker_memory_budget:
            cmd += ["--memory-budget", str(opts.worker_memory_budget)]
        if opts.insecure:
            cmd.append("--insecure")
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env))
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


def _measured_profiles(opts: GroupOptions, cfg, world: int, threads: int, worker_threads: int) -> tuple[dict, dict]:
    """(rank 0's profile, the local workers' profile) as dicts: overrides, else measured once and cached."""
    from tpi.devices.profile import cached_or_measured, model_bench_shapes

    shapes = model_bench_shapes(cfg, world)

    def measure(backend: str, n_threads: int, name: str) -> dict:
        return cached_or_measured(opts.cache_dir / "profile", backend=backend, shapes=shapes, threads=n_threads,
                                  name=name).to_dict()

    if opts.profile:
        master = opts.profile
    else:
        from tpi.scheduler.overhead import runtime_overhead_bytes

        master = measure(opts.backend, threads, "master")
        if opts.backend == "torch":
            import torch  # noqa: F401  (count what the engine will hold: torch is loaded before weights)
        master["runtime_bytes"] = runtime_overhead_bytes()  # this process, with the model source open
    if not opts.local_workers:
        return master, {}
    if opts.worker_profile:
        return master, opts.worker_profile
    same = not opts.profile and opts.worker_backend == opts.backend and worker_threads == threads
    worker = dict(master) if same else measure(opts.worker_backend, worker_threads, "local")
    return master, dict(worker, runtime_bytes=0)  # 0: each worker counts its own runtime memory at join


def _plan(opts: GroupOptions, source, cfg, context: int, master_profile: dict, link, joins: list, say):
    """Probe each joined device's link, plan the group, and refuse those the planner leaves out."""
    from tpi.devices.costmodel import LinkProfile
    from tpi.devices.group_plan import (
        Candidate, cost_params, load_transient_bytes, plan_real_group, weight_format_of, weight_profile_of,
    )
    from tpi.devices.profile import DeviceProfile

    links = []
    for j in joins:
        probe = link.probe(j)
        links.append(None if probe is None else LinkProfile(probe.rtt_s, probe.bandwidth_bytes_s))
        if probe is not None:
            say(f"link to {j.name}: round trip {probe.rtt_s * 1e3:.2f} ms, "
                f"{probe.bandwidth_bytes_s * 8 / 1e6:.0f} Mbit/s")
    local = {f"local-{i + 1}" for i in range(opts.local_workers)}
    candidates = [Candidate(j.name, j.profile, l, keep=j.name in local and j.address in ("127.0.0.1", "::1"))
                  for j, l in zip(joins, links)]
    params = cost_params(weight_format_of(source), context, master_load_bytes=load_transient_bytes(source, cfg),
                         weights=weight_profile_of(source))
    try:
        real = plan_real_group(cfg, DeviceProfile.from_dict(master_profile), opts.memory_budget, candidates, params,
                               wire_dtype=opts.wire_dtype, leave_out=opts.leave_out, ratios=opts.ratios)
    except TpiError as e:  # no group fits: tell every waiting device why before giving up
        for j in joins:
            link.refuse(j, f"the master cannot plan this group: {e}")
        raise
    for i, reason in real.refused:
        say(f"left out {joins[i].name}: {reason}")
        link.refuse(joins[i], reason)
    return real, links


def _idle_cores(backend: str, cores: int) -> int:
    """Cores to share among this machine's ranks: a ggml rank's threads spin at every op's barrier,
    so it takes only the cores idle now (tpi.quant.ggml_graph.idle_cores); other backends all."""
    if backend != "ggml":
        return cores
    from tpi.quant.ggml_runtime import idle_cores

    return idle_cores()


def _fixed_shards(source, cfg, ratios, say):
    """Shards of a split given without planning: column cuts on the model's blocks where they fit."""
    from tpi.devices.group_plan import weight_profile_of
    from tpi.devices.slicing import plan_cuts

    profile = weight_profile_of(source)
    cuts = plan_cuts(cfg, ratios, profile.wo_block, profile.down_block)
    if cuts.requantized:
        say(f"{' and '.join(cuts.requantized)} shards are re-quantized to Q8_0: their blocks cannot be split "
            f"{len(ratios)} ways")
    return cuts.shards


def start_group(opts: GroupOptions, say=log.info, on_plan=None, link=None) -> Group:
    """Open the model, gather the devices, ship shards, and return the serving group.

    The planner picks ratios and wire dtype when opts.ratios is None and there are workers, or
    whenever on_plan (called with the GroupPlan before anything loads) is given. A given link
    (re-planning a running group, tpi.master.recovery) is used as it is, left open on failure, and the
    group it returns is not supervised: the caller is.
    """
    from tpi.model.config import config_to_dict
    from tpi.master.engine import resolve_context
    from tpi.model.backends import backend_choice_note, make_layers, resolve_backend
    from tpi.formats import open_model
    from tpi.master.generate import Engine
    from tpi.model.blocks import EMBED, GLOBALS
    from tpi.model.transformer import ResidentWeights, Transformer
    from tpi.scheduler.store import ShardStore
    from tpi.master.shard import shard_to_dict
    from tpi.transport.protocol import Assign
    from tpi.transport.transfer import shard_hash
    from tpi.scheduler.overhead import rss_bytes
    from tpi.model.weights import open_store_weights

    backend, worker_backend = resolve_backend(opts.backend), resolve_backend(opts.worker_backend)
    if link is None:  # a re-plan (given link) keeps the choice reported at start
        log.info(backend_choice_note(opts.backend, backend))
    opts = replace(opts, backend=backend, worker_backend=worker_backend)
    source = open_model(opts.model)
    cfg = source.config
    if opts.wire_dtype == "int8" and cfg.hidden % 32:
        raise GroupError(f"the int8 wire needs a hidden size that is a multiple of 32; {cfg.name} has "
                         f"{cfg.hidden}: use --wire-dtype f32 or bf16")
    context = resolve_context(cfg, opts.context)
    world = max(opts.devices, 1 + opts.local_workers)
    if world > cfg.n_heads:
        raise GroupError(f"{world} devices but the model has {cfg.n_heads} query heads; use at most {cfg.n_heads}")
    tokenizer = source.tokenizer()
    cores = os.cpu_count() or 1
    threads = opts.threads or max(1, _idle_cores(backend, cores) // (1 + opts.local_workers))
    planning = (world > 1 and opts.ratios is None) or on_plan is not None
    own_link = link is None
    procs, joins, real, links, assigns, announcer = [], [], None, [], {}, None
    try:
        master_profile, worker_profile = {}, {}
        if world > 1 and own_link:
            from tpi.transport.link import LinkSettings, MasterLink

            opts.config_dir.mkdir(parents=True, exist_ok=True)
            link = MasterLink(f"tcp://{opts.host}:{opts.port}", opts.config_dir, insecure=opts.insecure,
                              settings=opts.link_settings or LinkSettings())
            if opts.announce:
                from tpi.transport.discovery import Announcer

                announcer = Announcer(link.token, link.port, opts.host)
            command = join_command(opts.host, link.port, link.token, opts.insecure, bool(announcer and announcer.addresses))
            say(f"waiting for {world - 1} device(s); on each one run:\n  {command}")
        elif world > 1:
            say(f"waiting for {world - 1} device(s) to join again")
        if planning:  # devices already queue their joins while rank 0 measures itself
            master_profile, worker_profile = _measured_profiles(opts, cfg, world, threads, max(1, cores // world))
        if world > 1:
            procs = _spawn_local_workers(opts, link.port, link.token, max(1, cores // world),
                                         worker_profile or opts.worker_profile)
            joins = _collect_joins(link, world - 1, procs, opts.join_timeout_s, say)
        if opts.ratios is not None and len(opts.ratios) != world:
            raise GroupError(f"{len(opts.ratios)} split ratios for {world} devices; give one per device")
        wire_dtype = opts.wire_dtype or "f32"
        if planning:
            real, links = _plan(opts, source, cfg, context, master_profile, link, joins, say)
            joins = [joins[i] for i in real.ranks]
            links = [links[i] for i in real.ranks]
            world = len(joins) + 1
            wire_dtype = real.plan.wire_dtype
            if on_plan is not None:
                on_plan(real.plan)
        ratios = real.plan.ratios if real else (opts.ratios or tuple([1.0 / world] * world))
        shards = real.plan.shards if real else _fixed_shards(source, cfg, ratios, say)
        layers = make_layers(opts.backend, cfg, shards[0], context, threads, slots=opts.slots)

        shard_dir = opts.cache_dir / "master"
        shard_dir.mkdir(parents=True, exist_ok=True)
        ranks_to_store = list(range(1, world)) + ([0] if opts.memory_budget else [])
        paths = {r: shard_dir / f"{_store_key(source, shard_to_dict(shards[r]), r == 0)}.tpis" for r in ranks_to_store}
        missing = {r: p for r, p in paths.items() if not p.exists()}
        resident: dict = {}

        def keep_rank0(key: str, blk: dict) -> None:
            if not opts.memory_budget:
                resident[key] = layers.to_runtime(blk)

        # Before cutting: mapped model pages the cut reads are reclaimable and not counted.
        setup_rss = rss_bytes() if opts.memory_budget else 0
        t0 = time.perf_counter()
        if missing or not opts.memory_budget:
            say(f"cutting {cfg.name} into {world} shard(s)…")
            _write_stores(source, cfg, shards, missing, keep_rank0)
        say(f"shards ready in {time.perf_counter() - t0:.1f}s")
        stores = {r: ShardStore.open(p) for r, p in paths.items()}
        devices = [DeviceInfo(0, "master", "local", shard_to_dict(shards[0]), dict(master_profile))]
        for rank, j in enumerate(joins, start=1):
            st = stores[rank]
            assignment = {"config": config_to_dict(cfg), "shard": shard_to_dict(shards[rank]), "context": context,
                          "slots": opts.slots}
            sent = link.admit(j, Assign(rank, world, shard_hash(st.path), st.nbytes, wire_dtype,
                                        assignment=assignment), st.path)
            assigns[rank] = (sent, st.path)
            devices.append(DeviceInfo(rank, j.name, j.address, shard_to_dict(shards[rank]), dict(j.profile)))
        if real is not None:
            from tpi.devices.group_plan import device_status

            for d in devices:
                d.plan = device_status(real.plan, d.rank, links[d.rank - 1] if d.rank else None)
        if opts.memory_budget:
            # The model source (its metadata, file pages mapped while cutting: up to the whole
            # model) is not the engine's; free it so the plan measures what serving holds.
            del source
            gc.collect()
            weights = open_store_weights(stores[0], layers, cfg, shards[0], context, opts.memory_budget,
                                         setup_rss=setup_rss)
        else:
            weights = ResidentWeights(resident)
        embed = weights.get(GLOBALS)[EMBED]
        weights.release(GLOBALS)
        comm = None
        if world > 1:
            say("sending shards and waiting for every device to load…")
            comm = link.communicator(wire_dtype)
        model = Transformer(cfg, layers, weights, comm)
        engine = Engine(cfg, tokenizer, model, embed, context)
        say(f"group of {world} ready: {', '.join(d.name for d in devices)}")
        summary = None
        if real is not None:
            from tpi.devices.group_plan import plan_summary

            summary = plan_summary(real.plan)
        group = Group(engine, devices, link, procs, link.token if link else None, summary, assigns, opts)
        group.announcer = announcer
        if link is not None and own_link:  # formed: late joins are refused, lost devices recovered
            group.supervise(say)
        return group
    except BaseException:
        if announcer is not None:
            announcer.close()
        if link is not None and own_link:
            link.close()
        for p in procs:
            p.kill()
        raise

