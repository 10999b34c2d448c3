"""Options of a single-device engine, the planned context, and a group of one built from them."""
from __future__ import annotations

from dataclasses import dataclass

from tpi.errors import TpiError

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # path; None = embedded default
    context: int | None = None  # None = min(model context, DEFAULT_CONTEXT)
    threads: int | None = None
    backend: str = "auto"
    memory_budget: int | None = None  # bytes; None = no streaming


def resolve_context(cfg, requested: int | None) -> int:
    ctx = requested or min(cfg.context, DEFAULT_CONTEXT)
    if ctx < 8:
        raise TpiError(f"--context {ctx} is too small; use at least 8")
    return ctx


def build_local_engine(opts: EngineOptions):
    """A group of one: every block of the model on this device (streamed under a budget)."""
    from tpi.master.group import GroupOptions, start_group

    group = start_group(GroupOptions(model=opts.model, context=opts.context, threads=opts.threads,
                                     backend=opts.backend, memory_budget=opts.memory_budget))
    return group.engine
