"""Keep a formed group serving after a device is lost: take it back, re-plan without it, or degrade.

A `GroupSupervisor` thread owns the master link's join queue once the group has formed. It

* refuses devices that join a full group (with the `--devices` fix),
* notices a lost device (heartbeat timeout, or it left) and marks the group `recovering`:
  requests then fail at once with a 503 naming the device, instead of waiting on it,
* admits the same device (same name) back into its rank when it rejoins: same shard, so a
  worker with its cache transfers nothing, and the master's next request prefills again,
* after `rejoin_timeout_s` without it, re-plans over the remaining devices (they are asked to
  join again and get new shards), when their memory allows,
* otherwise marks the group `degraded`, and requests get a 503 with the reason.

Group.state: serving -> recovering -> serving | re-planning -> serving | degraded.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import replace

from tpi.errors import GroupError, GroupUnavailableError, TpiError

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

    def broadcast_step(self, header: dict, x) -> None:
        raise GroupUnavailableError(self.reason)

    def allreduce(self, x):
        raise GroupUnavailableError(self.reason)

    def gather(self, x, wire_dtype=None):
        raise GroupUnavailableError(self.reason)

    def broadcast_reset(self, request_id: int) -> None:
        self._comm.broadcast_reset(request_id)

    def broadcast_truncate(self, slot: int, keep: int) -> None:
        raise GroupUnavailableError(self.reason)

    def broadcast_stop(self, reason: str) -> None:
        self._comm.broadcast_stop(reason)


class GroupSupervisor:
    """Watches a formed group from one thread; see the module docstring for what it does."""

    def __init__(self, group, say=log.info, clock=time.monotonic):
        self.group = group
        self.link = group.link
        self.opts = group.opts
        self.say = say
        self.clock = clock
        self.comm = group.engine.comm  # the newest working communicator
        self.reason = ""  # why the group is not serving, for /health
        self.events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)
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
        return {"reason": self.reason, "events": list(self.events)}

    # ---- the thread ----

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                join = self.link.next_join(timeout=POLL_S)
                if join is not None:
                    self._on_join(join)
                self._notice_lost()
                self._after_rejoin_timeout()
            except TpiError as e:  # the link is closing, or one recovery step failed: say so, go on
                if self._stopping.is_set():
                    return
                log.warning("group supervisor: %s", e)
            except Exception:  # a bug here must not silently end recovery for the whole session
                log.exception("group supervisor failed a step")
                time.sleep(POLL_S)

    def _event(self, kind: str, **detail) -> None:
        self.events.append({"at": time.time(), "event": kind, **detail})

    def _set_unavailable(self, state: str, reason: str) -> None:
        self.group.state = state
        self.reason = reason
        self._swap_comm(UnavailableCommunicator(self.comm, reason))

    def _swap_comm(self, comm) -> None:
        engine = self.group.engine
        with engine.lock:  # a running request fails within the timeout and lets go of the lock
            engine.model.comm = comm
            engine.reset()  # every rank's KV cache is suspect: the next request prefills from 0

    def _notice_lost(self) -> None:
        lost = self.link.lost_peers()
        for d in self.group.devices[1:]:
            sent = self.group.assigns.get(d.rank, (None, None))[0]
            if d.state == "lost" or sent is None or sent.peer_id not in lost:
                continue
            d.state, d.reason = "lost", lost[sent.peer_id]
            self.lost_since[d.rank] = self.clock()
            self._event("lost", device=d.name, rank=d.rank, reason=d.reason)
            names = ", ".join(f"{x.name} (rank {x.rank})" for x in self.group.devices if x.state == "lost")
            then = (f"then re-planning over the other devices" if self.opts.replan
                    else "re-planning is off")
            self._set_unavailable("recovering", f"the group lost device {names}: {d.reason}; waiting up to "
                                                f"{self.opts.rejoin_timeout_s:.0f}s for it to rejoin, {then}")
            self.say(f"lost device {d.name} (rank {d.rank}): {d.reason}; waiting "
                     f"{self.opts.rejoin_timeout_s:.0f}s for it to rejoin")

    def _lost_devices(self) -> list:
        return [d for d in self.group.devices if d.state == "lost"]

    def _on_join(self, join) -> None:
        lost = [d for d in self._lost_devices() if d.name == join.name]
        if lost and self.group.state in ("recovering", "degraded"):
            self._take_back(lost[0], join)
            return
        world = len(self.group.devices)
        if self.group.state == "serving":
            reason = (f"group already full: all {world} devices joined and it is serving; "
                      f"restart tpi serve with --devices {world + 1} to include this device")
        else:
            waiting = ", ".join(d.name for d in self._lost_devices()) or "nobody"
            reason = (f"the group is {self.group.state} and waits only for its lost device(s) ({waiting}); "
                      f"{join.name!r} is not one of them")
        self.link.refuse(join, reason)

    def _take_back(self, device, join) -> None:
        """Admit a lost device into its old rank with its old shard, then serve again if none is missing."""
        sent_before, path = self.group.assigns[device.rank]
        away = self.clock() - self.lost_since.get(device.rank, self.clock())
        self.say(f"{join.name} rejoined after {away:.1f}s; giving it rank {device.rank} again")
        sent = self.link.admit(join, sent_before, path)
        try:
            comm = self.link.communicator(self.comm.wire_dtype, awaiting={device.rank}, first_seq=self.comm.seq)
        except GroupError as e:
            device.reason = f"rejoined but did not get ready: {e}"
            log.warning("%s", device.reason)
            return
        self.group.assigns[device.rank] = (sent, path)
        self.comm = comm
        device.state, device.reason, device.address = "ready", f"rejoined after {away:.1f}s", join.address
        self.lost_since.pop(device.rank, None)
        self._event("rejoined", device=device.name, rank=device.rank, after_s=round(away, 1))
        if self._lost_devices():
            self._set_unavailable(self.group.state, self.reason)
            return
        self._serve_again(comm)
        comm.broadcast_reset(0)  # a worker still inside the abandoned step leaves it now

    def _serve_again(self, comm) -> None:
        self._swap_comm(comm)
        self.group.state, self.reason = "serving", ""
        self.say(f"group of {len(self.group.devices)} serving again")

    def _after_rejoin_timeout(self) -> None:
        if self.group.state != "recovering" or not self.lost_since:
            return
        waited = self.clock() - min(self.lost_since.values())
        if waited < self.opts.rejoin_timeout_s:
            return
        names = ", ".join(d.name for d in self._lost_devices())
        if not self.opts.replan:
            self._degrade(f"device(s) {names} did not rejoin within {self.opts.rejoin_timeout_s:.0f}s and "
                          "re-planning is off; restart tpi join on them, or restart tpi serve")
            return
        self._replan(names)

    def _degrade(self, reason: str) -> None:
        self._set_unavailable("degraded", reason)
        self._event("degraded", reason=reason)
        self.say(f"group degraded: {reason}")

    def _replan(self, lost_names: str) -> None:
        """Ask the remaining workers to join again and form a smaller group over them."""
        from tpi.master.group import start_group
        from tpi.transport.protocol import REJOIN_PREFIX

        survivors = [d for d in self.group.devices[1:] if d.state != "lost"]
        world = 1 + len(survivors)
        self._set_unavailable("re-planning", f"re-planning over {world} device(s) after losing {lost_names}")
        self._event("re-planning", world=world, lost=lost_names)
        self.say(f"{lost_names} did not rejoin in time; re-planning over {world} device(s)")
        self.comm.broadcast_stop(f"{REJOIN_PREFIX}the group is re-planned over {world} device(s) "
                                 f"after losing {lost_names}")
        self.link.forget_ranks()
        opts = replace(self.opts, devices=world, local_workers=0, ratios=None, leave_out=False,
                       join_timeout_s=max(self.opts.rejoin_timeout_s, 10.0))
        try:
            new = start_group(opts, say=self.say, link=self.link)
        except TpiError as e:
            self._degrade(f"lost {lost_names} and could not re-plan over the remaining devices: {e}")
            return
        engine = self.group.engine
        with engine.lock:
            old_weights = engine.model.weights
            engine.model, engine.embed_table = new.engine.model, new.engine.embed_table
            engine.reset()
        old_weights.close()
        self.group.devices, self.group.plan, self.group.assigns = new.devices, new.plan, new.assigns
        self.comm = new.engine.comm
        self.lost_since.clear()
        self.group.state, self.reason = "serving", ""
        self._event("re-planned", world=world, devices=[d.name for d in new.devices])
        self.say(f"re-planned: group of {world} serving ({', '.join(d.name for d in new.devices)})")
