"""Forming a group, top down: open the model, gather devices, plan, cut shards, admit workers, build rank 0.

A group of one takes the same path minus the network, so `tpi run` and `tpi serve` share it.
Every step reports progress as typed events (tpi.master.events) through `on_event`.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field, replace

from tpi.devices.group_plan import device_status, plan_summary, weight_profile_of
from tpi.devices.slicing import RankShard, plan_cuts, shard_to_dict
from tpi.errors import GroupError
from tpi.formats import open_model
from tpi.devices.profile import memory_bytes
from tpi.master.batch import default_slots
from tpi.master.engine import Engine, resolve_context
from tpi.master.events import (CuttingShards, ExpertsPlaced, GroupEvent, GroupPlanned, GroupReady, SendingShards,
                               ShardsReady, ShardsRequantized, WaitingForDevices)
from tpi.master.gather import (collect_joins, idle_cores, join_command, measured_profiles, plan_joined,
                               spawn_local_workers)
from tpi.master.group import Admission, DeviceInfo, Group, Members
from tpi.master.options import EngineOptions, GroupOptions
from tpi.master.recovery import GroupSupervisor
from tpi.master.resume import Resumer, replay_chunk
from tpi.master.speculation import build_speculator
from tpi.master.shard import store_key, write_stores
from tpi.model.backends import backend_choice_note, check_runs, make_layers, resolve_backend
from tpi.model.blocks import EMBED, GLOBALS
from tpi.model.config import config_to_dict
from tpi.model.transformer import ResidentWeights, Transformer
from tpi.model.weights import open_store_weights
from tpi.scheduler.overhead import rss_bytes
from tpi.scheduler.store import ShardStore
from tpi.transport.discovery import Announcer
from tpi.transport.keeper import LinkSettings
from tpi.transport.link import MasterLink
from tpi.transport.protocol import Assign
from tpi.transport.star_frames import star_only_from_env

log = logging.getLogger(__name__)


def log_event(event: GroupEvent) -> None:
    log.info("%s", event)


def start_group(opts: GroupOptions, on_event=log_event, link: MasterLink | None = None) -> Group:
    """Open the model, gather the devices, ship shards, and return the serving group.

    The planner picks ratios and wire dtype when opts.ratios is None and there are workers, or
    whenever opts.always_plan. A given link (re-forming a running group, tpi.master.recovery) is used
    as it is, left open on failure, and the group it returns is not supervised: the caller is.
    """
    reforming = link is not None
    opts = _with_backends(opts, report=not reforming)
    model = _open(opts)
    if opts.slots == 0 and opts.draft is not None:  # a draft model runs one sequence (GroupOptions refuses more)
        opts = replace(opts, slots=1)
    chunk = replay_chunk(model.source)  # before rank 0 lets go of the source (under a budget)
    net = _Network(link, own=not reforming)
    try:
        joins, master_profile = _gather(opts, model, net, on_event)
        if opts.slots == 0:  # --parallel's default (a re-formed group keeps its number)
            opts = replace(opts, slots=group_default_slots(opts, model.cfg, model.context, joins, master_profile))
            log.info("serving %d sequence(s) at once (--parallel)", opts.slots)
        split = _plan(opts, model, net.link, joins, master_profile, on_event)
        layers = make_layers(opts.backend, model.cfg, split.shards[0], model.context, model.threads, opts.slots)
        cut = _cut(opts, model, split, layers, on_event)
        members = _admit(net.link, model, split, cut.stores, master_profile, opts.slots)
        engine = _rank0(opts, model, split, layers, cut, net.link, on_event)
        if not reforming:  # a re-formed group's rank 0 is adopted by the running engine, speculator and all
            # with --parallel > 1 the batched loop (tpi.master.batch_spec) drafts per slot with it
            engine.speculator = build_speculator(opts.speculation, engine, model.threads, opts.backend)
        on_event(GroupReady(tuple(d.name for d in members.devices)))
    except BaseException:
        net.release()
        raise
    group = Group(engine, members, net.link, net.procs, opts, net.announcer)
    if net.link is not None and not reforming:  # formed: late joins are refused, lost devices recovered
        reform = lambda o: start_group(o, on_event, net.link)  # noqa: E731
        supervisor = GroupSupervisor(group, on_event, reform)
        engine.resume = Resumer(group, supervisor.report, chunk)
        group.supervise(supervisor)
    return group


def build_local_engine(opts: EngineOptions) -> Engine:
    """A group of one: every block of the model on this device (streamed under a budget)."""
    return start_group(GroupOptions(model=opts.model, context=opts.context, threads=opts.threads,
                                    backend=opts.backend, memory_budget=opts.memory_budget,
                                    slots=opts.slots)).engine


# ---- step 0: what runs where ----

def _with_backends(opts: GroupOptions, report: bool) -> GroupOptions:
    backend, worker_backend = resolve_backend(opts.backend), resolve_backend(opts.worker_backend)
    if report:  # a re-formed group keeps the choice reported at start
        log.info(backend_choice_note(opts.backend, backend))
    return replace(opts, backend=backend, worker_backend=worker_backend)


@dataclass
class _Model:
    """The opened model and what follows from it: context, tokenizer, group size, rank 0's threads."""

    source: object  # tpi.formats.ModelSource; dropped once cut under a budget
    cfg: object
    context: int
    tokenizer: object
    world: int
    threads: int
    cores: int


def _open(opts: GroupOptions) -> _Model:
    """Step 1: the model, its context and the group size it can be split into."""
    source = open_model(opts.model)
    cfg = source.config
    for b in {opts.backend, opts.worker_backend} if opts.local_workers else {opts.backend}:
        check_runs(b, cfg.arch)  # before any device waits on this group
    if opts.wire_dtype == "int8" and cfg.hidden % 32:
        raise GroupError(f"the int8 wire needs a hidden size that is a multiple of 32; {cfg.name} has "
                         f"{cfg.hidden}: use --wire-dtype f32 or bf16")
    world = opts.world
    if world > cfg.n_heads:
        raise GroupError(f"{world} devices but the model has {cfg.n_heads} query heads; use at most {cfg.n_heads}")
    cores = os.cpu_count() or 1
    threads = opts.threads or max(1, idle_cores(opts.backend, cores) // (1 + opts.local_workers))
    return _Model(source, cfg, resolve_context(cfg, opts.context), source.tokenizer(), world, threads, cores)


@dataclass
class _Network:
    """The master link, the LAN announcement and local worker processes: released if setup fails."""

    link: MasterLink | None
    own: bool
    announcer: Announcer | None = None
    procs: list = field(default_factory=list)

    def release(self) -> None:
        if self.announcer is not None:
            self.announcer.close()
        if self.link is not None and self.own:
            self.link.close()
        for p in self.procs:
            p.kill()


# ---- step 2: gather devices ----

def _gather(opts: GroupOptions, model: _Model, net: _Network, on_event) -> tuple[list, dict]:
    """Local workers and remote joins (the first world - 1 with the token); rank 0's profile when planning."""
    world = model.world
    if world > 1 and net.own:
        opts.config_dir.mkdir(parents=True, exist_ok=True)
        net.link = MasterLink(f"tcp://{opts.host}:{opts.port}", opts.config_dir, insecure=opts.insecure,
                              settings=opts.link_settings or LinkSettings())
        if opts.announce:
            net.announcer = Announcer(net.link.token, net.link.port, opts.host)
        announced = bool(net.announcer and net.announcer.addresses)
        on_event(WaitingForDevices(world - 1, net.link.port, net.link.token,
                                   join_command(opts.host, net.link.port, net.link.token, opts.insecure, announced)))
    elif world > 1:
        on_event(WaitingForDevices(world - 1, net.link.port, net.link.token))
    profiles = None
    if _planning(opts, world):  # devices already queue their joins while rank 0 measures itself
        profiles = measured_profiles(opts, model.cfg, model.threads, max(1, model.cores // world))
    joins = []
    if world > 1:
        net.procs = spawn_local_workers(opts, net.link.port, net.link.token, max(1, model.cores // world),
                                        (profiles.local_worker if profiles else None) or opts.worker_profile)
        joins = collect_joins(net.link, world - 1, net.procs, opts.join_timeout_s, on_event)
    if opts.ratios is not None and len(opts.ratios) != world:
        raise GroupError(f"{len(opts.ratios)} split ratios for {world} devices; give one per device")
    return joins, profiles.master if profiles else {}


def _streams(opts: GroupOptions) -> bool:
    """Whether weights may stream from disk (a memory budget): MoE experts then go whole per rank."""
    return opts.memory_budget is not None or opts.worker_memory_budget is not None


def _planning(opts: GroupOptions, world: int) -> bool:
    return (world > 1 and opts.ratios is None) or opts.always_plan


def group_default_slots(opts: GroupOptions, cfg, context: int, joins: list, master_profile: dict) -> int:
    """--parallel's default from the smallest room among the ranks: rank 0's (--memory-budget, else the
    free memory its profile or this machine reports) and each joined device's profile. Each slot is
    counted as the whole model's KV cache, which is more than any rank holds of it, and at least what
    the ranks sharing one machine (local workers) hold together, so the smallest room is a safe bound."""
    rooms = [opts.memory_budget or master_profile.get("free_memory_bytes") or memory_bytes()[1]]
    rooms += [j.profile["free_memory_bytes"] for j in joins if (j.profile or {}).get("free_memory_bytes")]
    return default_slots(cfg, context, opts.backend, min(rooms))


# ---- step 3: plan the split ----

@dataclass(frozen=True)
class _Split:
    """Who stays (joins, in rank order 1..), their shards, the wire dtype, and the plan when there is one."""

    joins: list
    links: list  # LinkProfile (or None) per kept join
    shards: tuple[RankShard, ...]
    wire_dtype: str
    plan: object = None  # tpi.devices.planner.GroupPlan

    @property
    def world(self) -> int:
        return len(self.shards)


def _plan(opts: GroupOptions, model: _Model, link, joins: list, master_profile: dict, on_event) -> _Split:
    """Step 3: the planner's split (probing links, leaving slow devices out), or the ratios given."""
    if _planning(opts, model.world):
        real, links = plan_joined(opts, model.source, model.context, master_profile, link, joins, on_event)
        on_event(GroupPlanned(real.plan))
        if real.plan.experts_reason and len(real.plan.shards) > 1:
            on_event(ExpertsPlaced(real.plan.experts_placement, real.plan.experts_reason))
        return _Split([joins[i] for i in real.ranks], [links[i] for i in real.ranks], tuple(real.plan.shards),
                      real.plan.wire_dtype, real.plan)
    world = model.world
    ratios = opts.ratios or tuple([1.0 / world] * world)
    profile = weight_profile_of(model.source)
    cuts = plan_cuts(model.cfg, ratios, profile.wo_block, profile.down_block, placement=opts.experts,
                     streaming=_streams(opts))
    if cuts.requantized:
        on_event(ShardsRequantized(tuple(cuts.requantized), len(ratios)))
    if cuts.experts is not None and world > 1:
        on_event(ExpertsPlaced(cuts.experts.placement, cuts.experts_reason))
    return _Split(joins, [None] * len(joins), tuple(cuts.shards), opts.wire_dtype or "f32")


# ---- step 4: cut shards ----

@dataclass(frozen=True)
class _Cut:
    stores: dict  # rank -> ShardStore
    resident: dict  # rank 0's prepared blocks by key (no budget)
    setup_rss: int  # this process's resident set before the cut (budget: serving must not need less)


def _cut(opts: GroupOptions, model: _Model, split: _Split, layers, on_event) -> _Cut:
    """Step 4: a shard store per worker rank (and rank 0 under a budget), cut once and cached by key;
    without a budget rank 0's blocks are prepared in memory during the same pass."""
    shard_dir = opts.cache_dir / "master"
    shard_dir.mkdir(parents=True, exist_ok=True)
    ranks = list(range(1, split.world)) + ([0] if opts.memory_budget else [])
    paths = {r: shard_dir / f"{store_key(model.source, split.shards[r], r == 0)}.tpis" for r in ranks}
    missing = {r: p for r, p in paths.items() if not p.exists()}
    resident: dict = {}

    def keep_rank0(key: str, blk: dict) -> None:
        if not opts.memory_budget:
            resident[key] = layers.to_runtime(blk)

    # Before cutting: mapped model pages the cut reads are reclaimable and not counted.
    setup_rss = rss_bytes() if opts.memory_budget else 0
    t0 = time.perf_counter()
    if missing or not opts.memory_budget:
        on_event(CuttingShards(model.cfg.name, split.world))
        write_stores(model.source, model.cfg, split.shards, missing, keep_rank0)
    on_event(ShardsReady(time.perf_counter() - t0))
    return _Cut({r: ShardStore.open(p) for r, p in paths.items()}, resident, setup_rss)


# ---- step 5: admit the workers ----

def _admit(link, model: _Model, split: _Split, stores: dict, master_profile: dict, slots: int) -> Members:
    """Step 5: send each kept device its Assign (rank, shard identity, config, context, KV slots) and serve
    its shard."""
    devices = [DeviceInfo(0, "master", "local", shard_to_dict(split.shards[0]), dict(master_profile))]
    admissions = {}
    for rank, j in enumerate(split.joins, start=1):
        store = stores[rank]
        assign = Assign(rank, split.world, store.content_hash, store.nbytes, split.wire_dtype,
                        config=config_to_dict(model.cfg), shard=shard_to_dict(split.shards[rank]),
                        context=model.context, slots=slots, star_only=star_only_from_env())
        admissions[rank] = Admission(link.admit(j, assign, store.path), store.path)
        devices.append(DeviceInfo(rank, j.name, j.address, shard_to_dict(split.shards[rank]), dict(j.profile)))
    if split.plan is None:
        return Members(devices, admissions)
    for d in devices:
        d.plan = device_status(split.plan, d.rank, split.links[d.rank - 1] if d.rank else None)
    return Members(devices, admissions, plan_summary(split.plan))


# ---- step 6: build rank 0 ----

def _rank0(opts: GroupOptions, model: _Model, split: _Split, layers, cut: _Cut, link, on_event) -> Engine:
    """Step 6: rank 0's weights (resident, or a window plan under the budget), model and engine, once
    every worker announced it is loaded."""
    if opts.memory_budget:
        # The model source (its metadata, file pages mapped while cutting: up to the whole model)
        # is not the engine's; free it so the plan measures what serving holds.
        model.source = None
        gc.collect()
        weights = open_store_weights(cut.stores[0], layers, model.cfg, split.shards[0], model.context,
                                     opts.memory_budget, setup_rss=cut.setup_rss)
    else:
        weights = ResidentWeights(cut.resident)
    embed = weights.get(GLOBALS)[EMBED]
    weights.release(GLOBALS)
    comm = None
    if split.world > 1:
        on_event(SendingShards())
        comm = link.communicator(split.wire_dtype)
    return Engine(model.cfg, model.tokenizer, Transformer(model.cfg, layers, weights, comm), embed, model.context)
