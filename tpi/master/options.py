"""What the master is asked to do: the options of a group (and of a group of one)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tpi.errors import TpiError
from tpi.master.speculation import SpeculationOptions
from tpi.transport.wire import REDUCE_DTYPES


def check_wire_dtype(wire_dtype: str | None) -> None:
    """TpiError unless wire_dtype is None (the planner's choice) or a wire the allreduce carries."""
    if wire_dtype is not None and wire_dtype not in REDUCE_DTYPES:
        raise TpiError(f"--wire-dtype {wire_dtype!r} is not a wire dtype; use one of {', '.join(REDUCE_DTYPES)}")


REPLAN_S = 120.0  # what a paused request allows a re-plan, after the rejoin timeout


def check_experts(placement: str | None) -> None:
    """TpiError unless placement is None (the cost model's choice) or an expert placement."""
    if placement not in (None, "split", "whole"):
        raise TpiError(f"--experts {placement!r} is not an expert placement; use split (every expert's columns "
                       "across the ranks) or whole (whole experts per rank)")


@dataclass(frozen=True)
class GroupOptions:
    model: str | None = None
    devices: int = 1  # total group size the master waits for, itself included
    local_workers: int = 0  # worker processes started on this machine (loopback)
    host: str = "0.0.0.0"
    port: int = 0  # 0 = any free port
    context: int | None = None
    slots: int = 1  # KV slots of `context` positions on every rank: sequences served at once (--parallel; 0: from memory)
    threads: int | None = None
    backend: str = "auto"  # kernel backend of rank 0: auto (tpi.model.backends.resolve_backend), ggml, numpy or torch
    worker_backend: str = "auto"  # backend of the local workers
    memory_budget: int | None = None  # rank 0's budget in bytes
    worker_memory_budget: int | None = None  # each local worker's budget
    ratios: tuple[float, ...] | None = None  # split ratios by rank; None = the planner's (equal without one)
    wire_dtype: str | None = None  # allreduce wire dtype; None = the planner's choice (f32 without a plan)
    experts: str | None = None  # MoE expert placement: "split" / "whole"; None = the cost model's choice
    leave_out: bool = False  # let the planner refuse remote devices that would slow the group (tpi serve)
    always_plan: bool = False  # plan (and report a GroupPlanned event) even for a group of one or fixed ratios
    profile: dict | None = None  # test-only: rank 0's device profile instead of measuring it
    worker_profile: dict | None = None  # test-only: the profile every local worker reports
    insecure: bool = False
    config_dir: Path = Path.home() / ".config" / "tpi"
    cache_dir: Path = Path.home() / ".cache" / "tpi"
    join_timeout_s: float = 600.0
    link_settings: object = None  # tpi.transport.link.LinkSettings
    rejoin_timeout_s: float = 30.0  # how long a lost device has to rejoin before the group re-plans
    replan: bool = True  # re-plan over the remaining devices when a lost one does not rejoin
    resume_timeout_s: float | None = None  # how long a request waits for the group to re-form; None = resume_bound_s
    announce: bool = False  # announce the group on the LAN (mDNS) so `tpi join --token T` finds it (tpi serve)
    speculate: str = "off"  # auto | off | lookup (tpi.master.speculation); the CLI's default is auto
    draft: str | None = None  # a draft model for speculation (--draft); None = prompt lookup

    def __post_init__(self) -> None:
        check_wire_dtype(self.wire_dtype)
        check_experts(self.experts)
        self.speculation  # noqa: B018 -- refuses a bad --speculate / --draft before anything loads
        if self.draft is not None and self.slots > 1:
            # a draft model keeps one sequence's KV cache on the master; prompt lookup drafts per slot
            raise TpiError(f"--draft runs one sequence's draft model, but --parallel {self.slots} serves "
                           f"{self.slots} at once; drop --draft (prompt lookup drafts for every sequence) "
                           "or use --parallel 1")

    @property
    def speculation(self):
        return SpeculationOptions(self.speculate, self.draft)

    @property
    def resume_bound_s(self) -> float:
        """The longest a paused request waits for the group to serve again: the rejoin timeout, then a
        re-plan (its joins, shards cut again, workers loaded). A degraded group fails it at once."""
        return self.resume_timeout_s if self.resume_timeout_s is not None else self.rejoin_timeout_s + REPLAN_S

    @property
    def world(self) -> int:
        """Devices the group waits for, this master included."""
        return max(self.devices, 1 + self.local_workers)


@dataclass(frozen=True)
class EngineOptions:
    """A group of one (`tpi run` without workers, perplexity, tests)."""

    model: str | None = None  # path; None = embedded default
    context: int | None = None  # None = min(model context, tpi.master.engine.DEFAULT_CONTEXT)
    threads: int | None = None
    backend: str = "auto"
    slots: int = 1  # KV slots (sequences at once)
    memory_budget: int | None = None  # bytes; None = no streaming
