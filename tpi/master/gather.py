"""Gathering the devices: local worker processes, joins on the master link, profiles, probed links, the plan.

These are the first steps of tpi.master.setup.start_group; each reports progress as typed events.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace

from tpi.devices.costmodel import LinkProfile
from tpi.devices.group_plan import (Candidate, RealPlan, cost_params, load_transient_bytes, plan_real_group,
                                    weight_format_of, weight_profile_of)
from tpi.devices.profile import DeviceProfile, cached_or_measured, model_bench_shapes
from tpi.errors import BudgetError, GroupError, TpiError
from tpi.master.events import DeviceJoined, DeviceLeftOut, LinkMeasured
from tpi.master.local_workers import LocalWorker
from tpi.master.options import GroupOptions
from tpi.model.rows import slots_refusal
from tpi.quant.ggml_runtime import idle_cores as ggml_idle_cores
from tpi.scheduler.overhead import runtime_overhead_bytes
from tpi.transport.discovery import lan_addresses


def lan_address() -> str:
    """This machine's first non-loopback IPv4 address (what devices on the LAN reach), else loopback."""
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


def idle_cores(backend: str, cores: int) -> int:
    """Cores to share among this machine's ranks: a ggml rank's threads spin at every op's barrier,
    so it takes only the cores idle now (tpi.quant.ggml_runtime.idle_cores); other backends all."""
    return ggml_idle_cores() if backend == "ggml" else cores


def spawn_local_workers(opts: GroupOptions, port: int, token: str, threads: int,
                        profile: dict | None = None) -> list[LocalWorker]:
    """Start opts.local_workers `tpi join` processes on this machine (the token goes in their environment)."""
    procs = []
    env = dict(os.environ, TPI_TOKEN=token)  # never in argv: any local user can read a command line (ps)
    for i in range(opts.local_workers):
        cmd = [sys.executable, "-m", "tpi.cli.local_worker", f"127.0.0.1:{port}",
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
        procs.append(LocalWorker(f"local-{i + 1}", cmd, env))
    return procs


def collect_joins(link, needed: int, procs, timeout_s: float, on_event) -> list:
    """The first `needed` devices that present the token (tpi.transport.keeper.JoinRequest each)."""
    joins, deadline = [], time.monotonic() + timeout_s
    while len(joins) < needed:
        j = link.next_join(timeout=0.5)
        if j is not None:
            joins.append(j)
            on_event(DeviceJoined(j.name, j.address, len(joins), needed))
            continue
        for p in procs:
            if p.poll() is not None:
                raise GroupError(f"a local worker exited with code {p.returncode} before joining; see its log above")
        if time.monotonic() > deadline:
            raise GroupError(f"only {len(joins)} of {needed} devices joined within {timeout_s:.0f}s; "
                             "run the printed `tpi join` command on each device or lower --devices")
    return joins


@dataclass(frozen=True)
class Profiles:
    """Rank 0's device profile and the one local workers offer (plain dicts, as on the wire)."""

    master: dict
    local_worker: dict


def measured_profiles(opts: GroupOptions, cfg, threads: int, worker_threads: int) -> Profiles:
    """Overrides, else measured once and cached (the local workers share this machine's measurement)."""
    shapes = model_bench_shapes(cfg, opts.world)

    def measure(backend: str, n_threads: int, name: str) -> dict:
        return cached_or_measured(opts.cache_dir / "profile", backend=backend, shapes=shapes, threads=n_threads,
                                  name=name).to_dict()

    if opts.profile:
        master = opts.profile
    else:
        master = measure(opts.backend, threads, "master")
        if opts.backend == "torch":
            import torch  # noqa: F401  (count what the engine will hold: torch is loaded before weights)
        master["runtime_bytes"] = runtime_overhead_bytes()  # this process, with the model source open
    if not opts.local_workers:
        return Profiles(master, {})
    if opts.worker_profile:
        return Profiles(master, opts.worker_profile)
    same = not opts.profile and opts.worker_backend == opts.backend and worker_threads == threads
    worker = dict(master) if same else measure(opts.worker_backend, worker_threads, "local")
    return Profiles(master, dict(worker, runtime_bytes=0))  # 0: each worker counts its own runtime memory at join


def plan_joined(opts: GroupOptions, source, context: int, master_profile: dict, link, joins: list,
                on_event) -> tuple[RealPlan, list[LinkProfile | None]]:
    """Probe each joined device's link, plan the group, and refuse those the planner leaves out."""
    links = []
    for j in joins:
        probe = link.probe(j)
        links.append(None if probe is None else LinkProfile(probe.rtt_s, probe.bandwidth_bytes_s))
        if probe is not None:
            on_event(LinkMeasured(j.name, probe.rtt_s, probe.bandwidth_bytes_s))
    local = {f"local-{i + 1}" for i in range(opts.local_workers)}
    candidates = [Candidate(j.name, j.profile, l, keep=j.name in local and j.address in ("127.0.0.1", "::1"))
                  for j, l in zip(joins, links)]
    cfg = source.config
    params = cost_params(weight_format_of(source), context, master_load_bytes=load_transient_bytes(source, cfg),
                         weights=weight_profile_of(source), experts=opts.experts, slots=opts.slots,
                         expert_streaming=opts.memory_budget is not None or opts.worker_memory_budget is not None)
    def plan(params):
        return plan_real_group(cfg, DeviceProfile.from_dict(master_profile), opts.memory_budget, candidates, params,
                               wire_dtype=opts.wire_dtype, leave_out=opts.leave_out, ratios=opts.ratios)

    try:
        real = plan(params)
    except TpiError as e:  # no group fits: tell every waiting device why before giving up
        if isinstance(e, BudgetError):  # with fewer KV caches (--parallel) it may
            e = slots_refusal(e, lambda n: plan(replace(params, slots=n)), opts.slots)
        for j in joins:
            link.refuse(j, f"the master cannot plan this group: {e}")
        raise e from None
    for i, reason in real.refused:
        on_event(DeviceLeftOut(joins[i].name, reason))
        link.refuse(joins[i], reason)
    return real, links
