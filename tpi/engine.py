"""Build a ready-to-run engine on this device: open the model, cut rank 0's blocks, prepare kernels."""
from __future__ import annotations

from dataclasses import dataclass

from tpi.errors import TpiError

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # path; None = embedded default
    context: int | None = None  # None = min(model context, DEFAULT_CONTEXT)
    threads: int | None = None
    backend: str = "torch"
    memory_budget: int | None = None  # bytes; None = no streaming


def resolve_context(cfg, requested: int | None) -> int:
    ctx = requested or min(cfg.context, DEFAULT_CONTEXT)
    if ctx < 8:
        raise TpiError(f"--context {ctx} is too small; use at least 8")
    return ctx


def make_layers(backend: str, cfg, shard, context: int, threads: int | None):
    """The per-block maths for a backend: the one place that picks ggml, torch or numpy."""
    if backend == "ggml":
        from tpi.quant.ggml_lib import load_ggml

        load_ggml()  # GgmlUnavailableError (a TpiError naming the fix) when ggml cannot run here
        from tpi.layers_ggml import GgmlLayers

        return GgmlLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads)
    if backend == "torch":
        try:
            from tpi.layers_torch import TorchLayers
        except ImportError:
            raise TpiError("torch is not installed; install the full engine with pip install 'tpi[all]'") from None
        return TorchLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads)
    if backend == "numpy":
        from tpi.layers_numpy import NumpyLayers

        return NumpyLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads)
    raise TpiError(f"unknown backend '{backend}'; use ggml, torch or numpy")


def build_local_engine(opts: EngineOptions):
    """A group of one: every block of the model on this device (streamed under a budget)."""
    from tpi.group import GroupOptions, start_group

    group = start_group(GroupOptions(model=opts.model, context=opts.context, threads=opts.threads,
                                     backend=opts.backend, memory_budget=opts.memory_budget))
    return group.engine
