"""Keep a formed group serving after a device is lost: take it back, re-plan without it, or degrade.

A `GroupSupervisor` thread owns the master link's join queue once the group has formed. It

* refuses devices that join a full group (with the `--devices` fix),
* notices a lost device (its connection closed or its local process ended: at once; silent past the
  heartbeat timeout; or it left) and puts the group in `recovering`: a running request pauses and
  resumes on the re-formed group (tpi.master.resume), and ends with a 503 naming the device only if
  the group cannot re-form,
* restarts a local worker whose process died (tpi.master.local_workers): it rejoins from its cache,
* admits the same device (same name) back into its rank when it rejoins: same shard, so a
  worker with its cache transfers nothing, and the master's next request prefills again,
* after `rejoin_timeout_s` without it, re-forms the group over the remaining devices (they are
  asked to join again and get new shards), when their memory allows,
* otherwise puts the group in `degraded`, and requests get a 503 with the reason.

Group states: serving -> recovering -> serving | re-planning -> serving | degraded. The supervisor
changes the group only through its narrow API (tpi.master.group.Group).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from tpi.errors import GroupError, GroupUnavailableError, TpiError
from tpi.master.events import (Degraded, DeviceLost, DeviceRejoined, GroupEvent, LocalWorkerRestarted, Replanned,
                               Replanning, ServingAgain)
from tpi.master.options import GroupOptions

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the supervisor looks at lost devices while no join arrives
MAX_EVENTS = 32  # the newest group events kept for /health


class UnavailableCommunicator:
    """Stands in for the group's communicator while it recovers: a step fails at once with the reason."""

    rank = 0

    def __init__(self, comm, reason: str):
        self._comm = comm  # the last working communicator: it still tells live workers to stop
        self.world = comm.world
        self.stats = comm.stats
        self.reason = reason

    def broadcast_step(self, step) -> None:
        raise GroupUnavailableError(self.reason)

    def allreduce(self, x):
        raise GroupUnavailableError(self.reason)

    def gather(self, x):
        raise GroupUnavailableError(self.reason)

    def broadcast_truncate(self, slot: int, keep: int) -> None:
        self._comm.broadcast_truncate(slot, keep)

    def broadcast_stop(self, reason: str, rejoin: bool = False) -> None:
        self._comm.broadcast_stop(reason, rejoin)


class GroupSupervisor:
    """Watches a formed group from one thread; see the module docstring for what it does.

    reform(opts) forms a group over the devices that join again (tpi.master.setup.start_group on the
    same link); it is passed in so that recovery does not build groups itself.
    """

    def __init__(self, group, on_event: Callable[[GroupEvent], None], reform: Callable[[GroupOptions], object],
                 clock=time.monotonic):
        self.group = group
        self.link = group.link
        self.opts = group.opts
        self.on_event = on_event
        self.reform = reform
        self.clock = clock
        self.comm = group.engine.comm  # the newest working communicator
        self.events: collections.deque[GroupEvent] = collections.deque(maxlen=MAX_EVENTS)
        self.lost_since: dict[int, float] = {}  # rank -> when it was noticed
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tpi-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def status(self) -> dict:
        return {"events": [e.status() for e in self.events]}

    # ---- the thread ----

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                join = self.link.next_join(timeout=POLL_S)
                if join is not None:
                    self._on_join(join)
                self._watch_local_workers()
                self._notice_lost()
                self._after_rejoin_timeout()
            except TpiError as e:  # the link is closing, or one recovery step failed: say so, go on
                if self._stopping.is_set():
                    return
                log.warning("group supervisor: %s", e)
            except Exception:  # a bug here must not silently end recovery for the whole session
                log.exception("group supervisor failed a step")
                time.sleep(POLL_S)

    def report(self, event: GroupEvent) -> None:
        if event.kind:
            self.events.append(event)
        self.on_event(event)

    def _unavailable(self, state: str, reason: str) -> None:
        self.group.enter(state, reason, UnavailableCommunicator(self.comm, reason))

    def _notice_lost(self) -> None:
        lost = self.link.lost_peers()
        for d in self.group.devices[1:]:
            peer = self.group.peer_id(d.rank)
            if d.state == "lost" or peer is None or peer not in lost:
                continue
            self.group.mark_lost(d.rank, lost[peer])
            self.lost_since[d.rank] = self.clock()
            names = ", ".join(f"{x.name} (rank {x.rank})" for x in self.group.lost_devices())
            then = "then re-planning over the other devices" if self.opts.replan else "re-planning is off"
            self.report(DeviceLost(d.name, d.rank, d.reason, self.opts.rejoin_timeout_s))
            self._unavailable("recovering", f"the group lost device {names}: {d.reason}; waiting up to "
                                            f"{self.opts.rejoin_timeout_s:.0f}s for it to rejoin, {then}")

    def _watch_local_workers(self) -> None:
        """A local worker whose process ended is lost at once, and started again (it rejoins from its cache)."""
        for proc in self.group.procs:
            if not proc.died():
                continue
            device = next((d for d in self.group.devices[1:] if d.name == proc.name), None)
            if device is not None and device.state != "lost":  # lost first, so that its rejoin is taken back
                self.link.lose(self.group.peer_id(device.rank), f"its process ended (exit code {proc.returncode})")
            elif proc.restart_due() and not self._stopping.is_set():
                log.warning("%s", proc.restart())
                self.report(LocalWorkerRestarted(proc.name, proc.restarts))

    def _on_join(self, join) -> None:
        lost = [d for d in self.group.lost_devices() if d.name == join.name]
        if lost and self.group.state in ("recovering", "degraded"):
            self._take_back(lost[0], join)
            return
        world = len(self.group.devices)
        if self.group.state == "serving":
            reason = (f"group already full: all {world} devices joined and it is serving; "
                      f"restart tpi serve with --devices {world + 1} to include this device")
        else:
            waiting = ", ".join(d.name for d in self.group.lost_devices()) or "nobody"
            reason = (f"the group is {self.group.state} and waits only for its lost device(s) ({waiting}); "
                      f"{join.name!r} is not one of them")
        self.link.refuse(join, reason)

    def _take_back(self, device, join) -> None:
        """Admit a lost device into its old rank with its old shard, then serve again if none is missing."""
        before = self.group.admission(device.rank)
        away = self.clock() - self.lost_since.get(device.rank, self.clock())
        sent = self.link.admit(join, before.assign, before.shard_path)
        try:
            comm = self.link.communicator(self.comm.wire_dtype, awaiting={device.rank}, first_seq=self.comm.seq)
        except GroupError as e:
            log.warning("%s", self.group.note(device.rank, f"rejoined but did not get ready: {e}"))
            return
        self.group.mark_back(device.rank, sent, join.address, f"rejoined after {away:.1f}s")
        self.report(DeviceRejoined(join.name, device.rank, round(away, 1)))
        self.comm = comm
        self.lost_since.pop(device.rank, None)
        if self.group.lost_devices():
            self._unavailable(self.group.state, self.group.reason)
            return
        self.group.enter("serving", "", comm)
        self.report(ServingAgain(len(self.group.devices)))
        comm.broadcast_truncate(0, 0)  # a worker still inside the abandoned step leaves it now

    def _after_rejoin_timeout(self) -> None:
        if self.group.state != "recovering" or not self.lost_since:
            return
        waited = self.clock() - min(self.lost_since.values())
        if waited < self.opts.rejoin_timeout_s:
            return
        names = ", ".join(d.name for d in self.group.lost_devices())
        if not self.opts.replan:
            self._degrade(f"device(s) {names} did not rejoin within {self.opts.rejoin_timeout_s:.0f}s and "
                          "re-planning is off; restart tpi join on them, or restart tpi serve")
            return
        self._replan(names)

    def _degrade(self, reason: str) -> None:
        self._unavailable("degraded", reason)
        self.report(Degraded(reason))

    def _replan(self, lost_names: str) -> None:
        """Ask the remaining workers to join again and form a smaller group over them."""
        survivors = [d for d in self.group.devices[1:] if d.state != "lost"]
        world = 1 + len(survivors)
        self._unavailable("re-planning", f"re-planning over {world} device(s) after losing {lost_names}")
        self.report(Replanning(world, lost_names))
        self.comm.broadcast_stop(f"the group is re-planned over {world} device(s) after losing {lost_names}",
                                 rejoin=True)
        self.link.forget_ranks()
        opts = replace(self.opts, devices=world, local_workers=0, ratios=None, leave_out=False,
                       join_timeout_s=max(self.opts.rejoin_timeout_s, 10.0))
        try:
            formed = self.reform(opts)
        except TpiError as e:
            self._degrade(f"lost {lost_names} and could not re-plan over the remaining devices: {e}")
            return
        self.group.adopt(formed)  # its engine steps through the new group's communicator
        self.comm = formed.engine.comm
        self.lost_since.clear()
        self.group.enter("serving")
        self.report(Replanned(world, tuple(d.name for d in formed.devices)))
