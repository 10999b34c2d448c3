"""A running group: rank 0's engine, its devices, and the narrow API its supervisor changes it through.

The group is formed by tpi.master.setup.start_group and kept serving by tpi.master.recovery; recovery
never writes the group's fields, it calls `mark_lost`, `mark_back`, `enter`, `adopt`.
"""
from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tpi.errors import TpiError
from tpi.master.options import GroupOptions

log = logging.getLogger(__name__)

STATES = ("serving", "recovering", "re-planning", "degraded")


@dataclass
class DeviceInfo:
    """One rank as /health shows it."""

    rank: int
    name: str
    address: str
    share: dict
    profile: dict = field(default_factory=dict)
    state: str = "ready"  # ready | lost
    plan: dict = field(default_factory=dict)  # share, predicted memory and link figures (planned groups)
    reason: str = ""  # why it was lost, or when it came back


@dataclass(frozen=True)
class Admission:
    """What a worker rank was sent (tpi.transport.protocol.Assign) and the shard file it fetches."""

    assign: object
    shard_path: Path


@dataclass
class Members:
    """The ranks of a formed group: devices in rank order, and what each worker was admitted with."""

    devices: list[DeviceInfo]
    admissions: dict[int, Admission]  # rank -> admission; a rejoining device gets the same again
    plan: dict = field(default_factory=dict)  # tpi.devices.group_plan.plan_summary, for a planned group


class Group:
    """A running group: rank 0's engine plus what is needed to recover it and stop it cleanly."""

    def __init__(self, engine, members: Members, link=None, procs=(), opts: GroupOptions | None = None,
                 announcer=None):
        self.engine = engine
        self._members = members
        self.link = link
        self.procs = list(procs)
        self.token = link.token if link is not None else None
        self.opts = opts or GroupOptions()
        self.announcer = announcer  # tpi.transport.discovery.Announcer while the group is announced on the LAN
        self.state = "serving"  # one of STATES
        self.reason = ""  # why the group is not serving
        self.supervisor = None
        self._closed = False

    # ---- what the group is ----

    @property
    def devices(self) -> list[DeviceInfo]:
        return self._members.devices

    @property
    def plan(self) -> dict:
        return self._members.plan

    def admission(self, rank: int) -> Admission | None:
        return self._members.admissions.get(rank)

    def peer_id(self, rank: int) -> str | None:
        """The data-channel id of a worker rank (what the link reports lost peers by)."""
        a = self.admission(rank)
        return None if a is None else a.assign.peer_id

    def lost_devices(self) -> list[DeviceInfo]:
        return [d for d in self.devices if d.state == "lost"]

    def status(self) -> dict:
        return {
            "state": self.state,
            "world": len(self.devices),
            "model": self.engine.cfg.name,
            "context": self.engine.context,
            "devices": [vars(d) for d in self.devices],
            "plan": self.plan,
            "reason": self.reason,
            **(self.supervisor.status() if self.supervisor else {}),
            **(self.engine.resume.status() if self.engine.resume else {}),
        }

    # ---- the narrow API recovery uses ----

    def supervise(self, supervisor) -> None:
        """Hand the group to its supervisor (tpi.master.recovery.GroupSupervisor) and start it."""
        self.supervisor = supervisor
        supervisor.start()

    def enter(self, state: str, reason: str = "", comm=None) -> None:
        """Change the group's state; with `comm`, steps run through it from now on (the KV caches restart)."""
        assert state in STATES, state
        if state != "serving":  # say so at once: swapping waits for a running step to fail
            self.state, self.reason = state, reason
        if comm is not None:
            self.engine.swap_comm(comm)
        self.state, self.reason = state, reason  # serving only once the working communicator is in place

    def mark_lost(self, rank: int, reason: str) -> DeviceInfo:
        d = self.devices[rank]
        d.state, d.reason = "lost", reason
        return d

    def note(self, rank: int, text: str) -> str:
        """Say something about a device on /health (its `reason`); returns the text."""
        self.devices[rank].reason = text
        return text

    def mark_back(self, rank: int, assign, address: str, note: str) -> DeviceInfo:
        """A lost device rejoined its rank with the same shard (assign: what it was sent this time)."""
        self._members.admissions[rank] = Admission(assign, self._members.admissions[rank].shard_path)
        d = self.devices[rank]
        d.state, d.reason, d.address = "ready", note, address
        return d

    def adopt(self, formed: "Group") -> None:
        """Take over a group re-formed over the remaining devices: its rank 0, ranks and plan."""
        self.engine.adopt(formed.engine.model, formed.engine.embed_table)
        self._members = formed._members

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.announcer is not None:
            self.announcer.close()
        try:
            self.engine.comm.broadcast_stop("master is shutting down")
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
        if self.engine.speculator is not None:
            self.engine.speculator.close()
