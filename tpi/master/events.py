"""What the master reports while it forms and keeps a group: typed events, each with its one line of text.

The group's setup and its supervisor emit these through an `on_event` callback; the CLI prints
`str(event)`, `tpi serve` follows formation by the event types, and /health lists the recovery events
(`status()`). Nothing parses the text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupEvent:
    """Base: one thing that happened, with the time it happened."""

    at: float = field(default_factory=time.time, kw_only=True)
    kind = ""  # the name /health shows for recovery events; "" for formation progress

    def status(self) -> dict:
        """Plain JSON for /health."""
        detail = {k: v for k, v in vars(self).items() if k != "at"}
        return {"at": self.at, "event": self.kind, **detail}


@dataclass(frozen=True)
class WaitingForDevices(GroupEvent):
    needed: int
    port: int  # the control port devices join
    token: str
    join_command: str = ""  # what to run on each device; empty when they join again (a re-plan)

    def __str__(self) -> str:
        if not self.join_command:
            return f"waiting for {self.needed} device(s) to join again"
        return f"waiting for {self.needed} device(s); on each one run:\n  {self.join_command}"


@dataclass(frozen=True)
class DeviceJoined(GroupEvent):
    name: str
    address: str
    count: int
    needed: int

    def __str__(self) -> str:
        return f"device joined: {self.name} ({self.address}) [{self.count}/{self.needed}]"


@dataclass(frozen=True)
class LinkMeasured(GroupEvent):
    name: str
    rtt_s: float
    bandwidth_bytes_s: float

    def __str__(self) -> str:
        return (f"link to {self.name}: round trip {self.rtt_s * 1e3:.2f} ms, "
                f"{self.bandwidth_bytes_s * 8 / 1e6:.0f} Mbit/s")


@dataclass(frozen=True)
class GroupPlanned(GroupEvent):
    """The planner's choice for the real group, before any weight loads (tpi.devices.planner.GroupPlan)."""

    plan: object

    def __str__(self) -> str:
        return f"planned a group of {len(self.plan.devices)}"


@dataclass(frozen=True)
class DeviceLeftOut(GroupEvent):
    name: str
    reason: str

    def __str__(self) -> str:
        return f"left out {self.name}: {self.reason}"


@dataclass(frozen=True)
class ShardsRequantized(GroupEvent):
    tensors: tuple[str, ...]
    ways: int

    def __str__(self) -> str:
        return (f"{' and '.join(self.tensors)} shards are re-quantized to Q8_0: their blocks cannot be split "
                f"{self.ways} ways")


@dataclass(frozen=True)
class ExpertsPlaced(GroupEvent):
    """A MoE model's experts over the group: the placement (tpi.devices.experts) and why."""

    placement: str
    reason: str

    def __str__(self) -> str:
        return f"experts: {self.reason}"


@dataclass(frozen=True)
class CuttingShards(GroupEvent):
    model: str
    world: int

    def __str__(self) -> str:
        return f"cutting {self.model} into {self.world} shard(s)…"


@dataclass(frozen=True)
class ShardsReady(GroupEvent):
    seconds: float

    def __str__(self) -> str:
        return f"shards ready in {self.seconds:.1f}s"


@dataclass(frozen=True)
class SendingShards(GroupEvent):
    def __str__(self) -> str:
        return "sending shards and waiting for every device to load…"


@dataclass(frozen=True)
class GroupReady(GroupEvent):
    devices: tuple[str, ...]

    def __str__(self) -> str:
        return f"group of {len(self.devices)} ready: {', '.join(self.devices)}"


# ---- recovery (tpi.master.recovery); these are the events /health lists ----

@dataclass(frozen=True)
class DeviceLost(GroupEvent):
    kind = "lost"
    device: str
    rank: int
    reason: str
    rejoin_timeout_s: float

    def __str__(self) -> str:
        return (f"lost device {self.device} (rank {self.rank}): {self.reason}; waiting "
                f"{self.rejoin_timeout_s:.0f}s for it to rejoin")


@dataclass(frozen=True)
class DeviceRejoined(GroupEvent):
    kind = "rejoined"
    device: str
    rank: int
    after_s: float

    def __str__(self) -> str:
        return f"{self.device} rejoined after {self.after_s:.1f}s; giving it rank {self.rank} again"


@dataclass(frozen=True)
class LocalWorkerRestarted(GroupEvent):
    kind = "restarted"
    device: str
    restarts: int

    def __str__(self) -> str:
        return f"local worker {self.device} died; restarted it (restart {self.restarts}), it rejoins from its cache"


@dataclass(frozen=True)
class RequestResumed(GroupEvent):
    """A request that a device loss interrupted went on streaming on the re-formed group."""

    kind = "resumed"
    paused_s: float
    cause: str
    replayed_tokens: int  # prompt + tokens already streamed, computed again on the re-formed group

    def __str__(self) -> str:
        return (f"request resumed after a {self.paused_s:.1f}s pause ({self.cause}); "
                f"{self.replayed_tokens} tokens re-prefilled")


@dataclass(frozen=True)
class ServingAgain(GroupEvent):
    world: int

    def __str__(self) -> str:
        return f"group of {self.world} serving again"


@dataclass(frozen=True)
class Replanning(GroupEvent):
    kind = "re-planning"
    world: int
    lost: str

    def __str__(self) -> str:
        return f"{self.lost} did not rejoin in time; re-planning over {self.world} device(s)"


@dataclass(frozen=True)
class Replanned(GroupEvent):
    kind = "re-planned"
    world: int
    devices: tuple[str, ...]

    def __str__(self) -> str:
        return f"re-planned: group of {self.world} serving ({', '.join(self.devices)})"


@dataclass(frozen=True)
class Degraded(GroupEvent):
    kind = "degraded"
    reason: str

    def __str__(self) -> str:
        return f"group degraded: {self.reason}"
