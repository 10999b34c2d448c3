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
    """The per-block maths for a backend: the one place that picks torch or numpy."""
    if backend == "torch":
        try:
            from tpi.layers_torch import TorchLayers
        except ImportError:
            raise TpiError("torch is not installed; install the full engine with pip install 'tpi[all]'") from None
        return TorchLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads)
    if backend == "numpy":
        from tpi.layers_numpy import NumpyLayers

        return NumpyLayers(cfg, shard.n_q_heads, shard.q_to_local_kv, context, threads)
    raise TpiError(f"unknown backend '{backend}'; use torch or numpy")


def build_local_engine(opts: EngineOptions):
    """A group of one: every block of the model on this device."""
    from tpi.devices.slicing import plan_shards
    from tpi.formats import open_model
    from tpi.generate import Engine
    from tpi.model import ResidentWeights, Transformer
    from tpi.shard import iter_rank_blocks

    source = open_model(opts.model)
    cfg = source.config
    context = resolve_context(cfg, opts.context)
    (shard,) = plan_shards(cfg, [1.0])
    layers = make_layers(opts.backend, cfg, shard, context, opts.threads)
    tokenizer = source.tokenizer()
    blocks, embed = {}, None
    for key, (blk,) in iter_rank_blocks(source, cfg, [shard]):
        if key == "globals":
            embed = blk.pop("embed")
        blocks[key] = layers.to_runtime(blk)
    model = Transformer(cfg, layers, ResidentWeights(blocks))
    return Engine(cfg, tokenizer, model, embed, context)
