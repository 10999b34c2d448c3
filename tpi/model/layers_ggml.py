"""Per-rank transformer block maths on ggml, llama.cpp's kernel library: one graph per block.

Each attention block and each MLP block runs as ONE ggml graph (tpi.model.ggml_blocks), so Python runs
once per block, not once per op; between them the model adds the block's output (after the
allreduce in a group). Decode graphs (one token) are built the first time a block runs and kept
on the block, reading their inputs in place from buffers this object owns:
  x     F32 [1, hidden]   the residual stream (hidden_from_numpy copies into it; add_ updates it)
  pos   I32 [1], idx I64 [1]   RoPE position and KV-cache row
  mask  F16 [context]     0 up to the position, -inf after it (mask_swa: also -inf a window back)
Flash attention reads the first n_kv rows of the F16 caches, n_kv rounded up to 256 (as llama.cpp
pads it), so a decode graph is rebuilt once per 256 positions. A prefill (T > 1) builds its graphs
per call into one shared compute buffer. A group of one with resident blocks runs its whole pass
as one graph (forward_all): measured 1.16x (1 thread) and 1.24x (2 threads, loaded machine) the
block-by-block decode on SmolLM2, bit-identical to it.
Same interface as NumpyLayers / TorchLayers; activations at the seam are float32 numpy.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np

from tpi.model.blocks import EMBED, GLOBALS, POST_ATTN_NORM, POST_MLP_NORM, QK_NORMS, attn_key, mlp_key
from tpi.model.config import ModelConfig
from tpi.errors import ShapeError
from tpi.model.ggml_blocks import (OPS_PER_MLP, BlockSpec, StepTensors, build_attention, build_logits, build_mlp,
                                   build_post_norm, mlp_ops, rope_frequency_factors)
from tpi.model.ggml_exact import decode_kv
from tpi.quant.ggml_backend import GgmlBackend, can_repack, gather_rows, weight_type
from tpi.quant.ggml_graph import Context, Graph, SharedComputeBuffer
from tpi.quant.ggml_lib import F16
from tpi.quant.ggml_runtime import CpuRuntime
from tpi.quant.ggml_graph import array_address
from tpi.quant.ggml_stream import (copied_repacked, drop, mapped_repacked, page_range, populate, remap_supported,
                                   repacked_rows)

ACT = np.float32
KV_BUCKET = 256  # attended cache rows are a multiple of this (llama.cpp pads n_kv the same way)


# The rows of each q/k-bearing tensor in rotate-half order (BlockSpec.rotate_half_rows is for q|k|v;
# the per-head q/k norm weights take the order within one head).
_QK_ROWS = {
    "wqkv": lambda rows, s: rows, "bqkv": lambda rows, s: rows,
    "wq": lambda rows, s: rows[:s.q_dim], "wk": lambda rows, s: rows[s.q_dim:s.q_dim + s.kv_dim] - s.q_dim,
    **{name: lambda rows, s: s.head_rotate_half() for name in QK_NORMS},
}


class GgmlBlock(dict):
    """A prepared block: name -> GgmlWeight or F32 vector tensor, plus the graphs built over it.

    A streamed block lists the file pages its weights are mapped from: release() drops them from
    the process (the block stays built), populate() maps them in again for its next use.
    """

    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx  # owns the vector tensors
        self.graphs: dict[tuple, Graph] = {}
        self.pages: list[tuple[int, int]] = []

    def populate(self) -> None:
        populate(self.pages)

    def release(self) -> None:
        drop(self.pages)


def _arrays(block: dict):
    """The numpy arrays of a stored block, in order."""
    for v in block.values():
        if isinstance(v, np.ndarray):
            yield v
        elif hasattr(v, "arrays"):
            yield from v.arrays.values()


def _in_map(store, a: np.ndarray) -> bool:
    """Whether a is a view of store's map (not a copy)."""
    try:
        store.file_offset(a)
    except ValueError:
        return False
    return True


class _DecodeInputs:
    """The one-token inputs every decode graph reads in place (window: a local layer's, 0 for none)."""

    def __init__(self, hidden: int, context: int, window: int = 0):
        self.x = np.zeros((1, hidden), ACT)
        self.pos = np.zeros(1, np.int32)
        self.idx = np.zeros(1, np.int64)
        self.mask = np.full(context, -np.inf, np.float16)
        self.window = window
        self.mask_swa = np.full(context, -np.inf, np.float16) if window else None
        self.post = np.zeros((1, hidden), ACT)  # a summed block output on its way through a post-norm
        self.visible = 0  # mask[:visible] == 0
        self.position = -1
        self.ctx = Context(6)
        swa = self.ctx.input(self.mask_swa) if window else None
        self.step = StepTensors(self.ctx.input(self.x), self.ctx.input(self.pos), self.ctx.input(self.idx),
                                self.ctx.input(self.mask), 1, swa)
        self.post_in = self.ctx.input(self.post)

    def move_to(self, position: int) -> None:
        if position == self.position:  # every layer of a pass after the first
            return
        self.position = position
        self.pos[0] = position
        self.idx[0] = position
        end = position + 1
        if end > self.visible:
            self.mask[self.visible:end] = 0.0
        elif end < self.visible:
            self.mask[end:self.visible] = -np.inf
        self.visible = end
        if self.mask_swa is not None:  # the query sees keys p0 with position - p0 < window
            self.mask_swa.fill(-np.inf)
            self.mask_swa[max(0, end - self.window):end] = 0.0


def _prefill_inputs(h: np.ndarray, start: int, n_kv: int, window: int = 0,
                    row_kv: tuple[int, ...] = ()) -> tuple[StepTensors, Context]:
    """Inputs of a T-token pass at positions start..: query i sees cache rows up to start + i (and on
    local layers only the window rows before that). row_kv: each row's decode n_kv, for exact rows."""
    t = h.shape[0]
    pos = np.arange(start, start + t, dtype=np.int32)
    back = pos[:, None] - np.arange(n_kv)[None, :]  # (T, n_kv): query position - key position
    mask = np.where(back >= 0, 0.0, -np.inf).astype(np.float16)
    ctx = Context(5)
    swa = None
    if window:
        swa = ctx.input(np.where((back >= 0) & (back < window), 0.0, -np.inf).astype(np.float16))
    step = StepTensors(ctx.input(h), ctx.input(pos), ctx.input(pos.astype(np.int64)), ctx.input(mask), t, swa, row_kv)
    return step, ctx


class GgmlLayers:
    """Computes one rank's share of attention and MLP blocks, and its logits slice, as ggml graphs."""

    name = "ggml"
    _exact = False  # inside exact_rows(): a many-row pass computes each row as its decode step would

    def __init__(self, cfg: ModelConfig, n_q: int, q_to_kv: tuple[int, ...], context: int, threads: int | None,
                 repack: bool = True, whole_graph: bool = True):
        self.cfg = cfg
        self.runtime = CpuRuntime(threads)
        self.kernels = GgmlBackend(runtime=self.runtime, repack=repack)
        self.spec = BlockSpec.of(cfg, n_q, tuple(q_to_kv))
        self.context = context
        kv_dim = self.spec.kv_dim
        # (context, kv_dim) per layer, as llama.cpp's cache; np.zeros pages are resident once written
        self.k_cache = [np.zeros((context, kv_dim), np.float16) for _ in range(cfg.n_layers)]
        self.v_cache = [np.zeros((context, kv_dim), np.float16) for _ in range(cfg.n_layers)]
        self._const = Context(2 * cfg.n_layers + 1)
        self._k = [self._const.input(a, F16) for a in self.k_cache]
        self._v = [self._const.input(a, F16) for a in self.v_cache]
        factors = rope_frequency_factors(cfg)
        self._rope_factors = None if factors is None else self._const.input(factors)
        self.window = cfg.sliding_window if cfg.swa_layers else 0
        self._decode = _DecodeInputs(cfg.hidden, context, self.window)
        self._prefill: tuple[np.ndarray, int, StepTensors, Context] | None = None
        self._shared = SharedComputeBuffer()
        self._rows = self.spec.rotate_half_rows()
        self.whole_graph = whole_graph
        self._whole: tuple[int, dict, Graph] | None = None

    # ---- weights -------------------------------------------------------------------------
    @staticmethod
    def forward_context():
        """Nothing to switch around a ggml forward pass."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def exact_rows(self):
        """Within: a pass of T rows gives each row the bits of a one-row pass (tpi.model.ggml_exact)."""
        self._exact, self._prefill = True, None
        try:
            yield
        finally:
            self._exact, self._prefill = False, None

    def to_runtime(self, block: dict) -> GgmlBlock:
        """Stored block (QTensors + float32 vectors) -> ggml weight tensors (repacked where ggml
        repacks, a copy as llama.cpp makes) and F32 vector tensors."""
        return self._block(self._rotate_half(block), lambda name, qt: self.kernels.weight(qt))

    def _rotate_half(self, block: dict) -> dict:
        """q/k rows (and biases) in llama.cpp's rotate-half order, for NEOX-rope archs (a copy of them)."""
        if self._rows is None:
            return block
        return {name: gather_rows(v, _QK_ROWS[name](self._rows, self.spec)) if name in _QK_ROWS else v
                for name, v in block.items()}

    def _block(self, block: dict, weight) -> GgmlBlock:
        vectors = [n for n, v in block.items() if isinstance(v, np.ndarray) and v.ndim == 1]
        out = GgmlBlock(Context(max(1, len(vectors))))
        for name, value in block.items():
            if name == EMBED:
                out[name] = value
            elif name in vectors:
                out[name] = out.ctx.input(np.array(value, dtype=ACT))  # small; copied off the map
            else:
                out[name] = weight(name, value)
        return out

    # ---- streaming -------------------------------------------------------------------------
    @property
    def kernel_layout(self):
        """(name, prepare_block) of the shard copy streamed blocks map: q/k rows in llama.cpp's order
        and weights in ggml's repacked bytes (tpi.quant.ggml_stream); None where nothing would differ."""
        if not (self.kernels.repack and remap_supported() and self.kernels.lib.has_avx2):
            return None
        lib = self.kernels.lib
        name = f"ggml-{lib.version}-{lib.commit.split('-')[0]}-repack"

        def prepare(block: dict) -> dict:
            return {n: v if n == EMBED or isinstance(v, np.ndarray) else repacked_rows(self.kernels, v)
                    for n, v in self._rotate_half(block).items()}

        return name, prepare

    def runtime_for(self, store):
        """(pinned, streamed) to_runtime for blocks of a shard store: the streamed ones come as views
        of its map and are bound where they lie, never copied.

        From the kernel-layout copy, repacked weights are copied as they are when pinned and mapped
        when streamed (tpi.quant.ggml_stream). From a plain shard the streamed weights are bound as
        rows, unrepacked: repacking per load costs ~10x the block's compute (140 ms per
        Llama-2-7B layer against 15), computing unrepacked ~1.3x.
        """
        layout, kernels = self.kernel_layout, self.kernels
        from_layout = layout is not None and store.meta.get("kernel_layout") == layout[0]
        fd = store.fileno()
        built: dict[int, GgmlBlock] = {}  # file offset of a block's first array -> the block, mapped once

        def pinned(name: str, qt):
            return copied_repacked(kernels, qt) if repacked(qt) else kernels.weight(qt, repack=False)

        def repacked(qt) -> bool:
            gtype = weight_type(qt.fmt)
            return from_layout and gtype is not None and can_repack(gtype, qt.shape[0], kernels.lib)

        def mapped(name: str, qt):
            if repacked(qt):  # mapped apart and populated: the store's own map of it is never touched
                return mapped_repacked(kernels, qt, fd, store.file_offset(qt.arrays["data"]))
            w = kernels.weight(qt, repack=False)  # bound where it lies when ggml runs its type as stored
            data = qt.arrays.get("data", qt.arrays.get("weight"))
            if weight_type(qt.fmt) is None or data is None or not _in_map(store, data):
                return w  # converted or gathered: a copy of its own
            store.populate_array(data)
            return replace(w, pages=page_range(array_address(data), data.nbytes))

        def streamed(block: dict) -> GgmlBlock:
            """Mapped and built the first time; later uses only map its pages in again (no mapping,
            Python object or graph per token: those cost the compute thread ~3 ms a block). A block
            holding a copy (a converted format, gathered q/k rows) is built anew each time instead."""
            key = store.file_offset(next(_arrays(block)))
            blk = built.get(key)
            if blk is not None:
                blk.populate()
                return blk
            blk = self._block(block if from_layout else self._rotate_half(block), mapped)
            weights = [w for w in blk.values() if hasattr(w, "pages")]
            if all(w.pages for w in weights):  # every weight is file pages: nothing stays resident
                blk.pages = [w.pages for w in weights]
                built[key] = blk
            return blk

        if not from_layout:
            return self.to_runtime, streamed
        return lambda block: self._block(block, pinned), streamed

    # ---- tensors at the seam ---------------------------------------------------------------
    def hidden_from_numpy(self, h: np.ndarray) -> np.ndarray:
        """A float32 (T, hidden) residual the graphs can read in place (decode: the shared buffer)."""
        h = np.asarray(h)
        if h.ndim != 2 or h.shape[1] != self.cfg.hidden or h.shape[0] < 1:
            raise ShapeError(f"hidden states must be (tokens, {self.cfg.hidden}), got {list(h.shape)}")
        if h.shape[0] == 1:
            np.copyto(self._decode.x, h)
            return self._decode.x
        return np.array(h, dtype=ACT, order="C")  # a copy: h may be a read-only network buffer

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def add_(h: np.ndarray, partial: np.ndarray) -> None:
        np.add(h, partial, out=h)

    # ---- blocks ----------------------------------------------------------------------------
    def _n_kv(self, end: int) -> int:
        return min(self.context, -(-end // KV_BUCKET) * KV_BUCKET)

    def _step(self, h: np.ndarray, start: int) -> StepTensors:
        """The inputs of a pass of h's tokens at start.. (checked: ggml aborts on a row past the cache)."""
        t = h.shape[0]
        if not (isinstance(start, (int, np.integer)) and 0 <= start and start + t <= self.context):
            raise ShapeError(f"positions {start}..{start + t - 1} are outside the KV cache of {self.context}; "
                             "raise --context or start a new conversation")
        if t == 1:
            if h is not self._decode.x:
                np.copyto(self._decode.x, h)
            self._decode.move_to(int(start))
            return self._decode.step
        if self._prefill is None or self._prefill[0] is not h or self._prefill[1] != start:
            h = h if h.dtype == ACT and h.flags.c_contiguous else np.ascontiguousarray(h, dtype=ACT)
            row_kv = tuple(decode_kv(p, self.context, KV_BUCKET) for p in range(start, start + t)) if self._exact else ()
            self._prefill = (h, start, *_prefill_inputs(h, int(start), self._n_kv(start + t), self.window, row_kv))
        return self._prefill[2]

    def _run(self, blk: GgmlBlock, key: tuple, ops: int, build, shape: tuple[int, int]) -> np.ndarray:
        """Compute a block's graph: a kept one for one token, a once-used one (output copied) for more."""
        if shape[0] == 1:
            graph = blk.graphs.get(key)
            if graph is None:
                for stale in [k for k in blk.graphs if k[0] == key[0]]:
                    del blk.graphs[stale]  # an attention graph of an older n_kv bucket
                ctx = Context(ops, graph_size=2 * ops + 16)
                graph = blk.graphs[key] = Graph(ctx, [build(ctx)], [shape])
            self.runtime.compute(graph)
            return graph.outputs[0]
        ctx = Context(ops, graph_size=2 * ops + 16)
        graph = Graph(ctx, [build(ctx)], [shape], galloc=self._shared.ptr)
        self.runtime.compute(graph)
        return graph.outputs[0].copy()

    def attention(self, h: np.ndarray, blk: GgmlBlock, layer: int, start: int) -> np.ndarray:
        """h: (T, hidden) f32 -> this rank's partial attention output (T, hidden) f32."""
        step = self._step(h, start)
        n_kv = self._n_kv(start + step.tokens)
        return self._run(blk, ("attn", n_kv), self.spec.attention_ops(len(step.row_kv)), lambda ctx: build_attention(
            ctx, self.spec, blk, step, self._k[layer], self._v[layer], n_kv, self._rope_factors, layer),
            (step.tokens, self.cfg.hidden))

    def _x(self, h: np.ndarray) -> StepTensors:
        """The inputs for a block that does not move the position (MLP, logits)."""
        if h.shape[0] == 1:
            if h is not self._decode.x:
                np.copyto(self._decode.x, h)
            return self._decode.step
        if self._prefill is not None and self._prefill[0] is h:
            return self._prefill[2]
        return self._step(h, 0)  # a pass this object has not seen: positions do not matter here

    def mlp(self, h: np.ndarray, blk: GgmlBlock) -> np.ndarray:
        """h: (T, hidden) f32 -> this rank's partial MLP output (T, hidden) f32."""
        step = self._x(h)
        return self._run(blk, ("mlp",), mlp_ops(len(step.row_kv)),
                         lambda ctx: build_mlp(ctx, self.spec, blk, step.x, step.exact), (step.tokens, self.cfg.hidden))

    def post_norm(self, total: np.ndarray, blk: GgmlBlock, name: str) -> np.ndarray:
        """A block's output summed over the ranks, (T, hidden) f32, through the block's post-norm."""
        if total.shape[0] == 1:
            np.copyto(self._decode.post, total)
            return self._run(blk, (name,), OPS_PER_MLP, lambda ctx: build_post_norm(
                ctx, self.spec, blk, name, self._decode.post_in), (1, self.cfg.hidden))
        ctx = Context(OPS_PER_MLP, graph_size=2 * OPS_PER_MLP + 16)
        x = ctx.input(np.ascontiguousarray(total, dtype=ACT))
        graph = Graph(ctx, [build_post_norm(ctx, self.spec, blk, name, x)], [total.shape], galloc=self._shared.ptr)
        self.runtime.compute(graph)
        return graph.outputs[0].copy()

    def forward_all(self, h: np.ndarray, blocks: dict, start: int, all_positions: bool) -> np.ndarray | None:
        """A group of one's whole pass as ONE graph: no Python and no thread wake-up between blocks.

        A decode step's graph is built once per n_kv bucket and kept; a prefill's is built per call
        into the shared compute buffer. None (run block by block) when whole_graph is off.
        """
        if not self.whole_graph:
            return None
        step = self._step(h, start)
        t, n_kv = step.tokens, self._n_kv(start + step.tokens)
        vocab = blocks[GLOBALS]["lm_head"].out_features
        if t > 1:
            ctx, out = self._whole_graph(blocks, step, n_kv, last_only=not all_positions)
            graph = Graph(ctx, [out], [(t if all_positions else 1, vocab)], galloc=self._shared.ptr)
            self.runtime.compute(graph)
            return graph.outputs[0].copy()
        cached = self._whole
        if cached is None or cached[0] != n_kv or cached[1] is not blocks:
            self._whole = None  # its compute buffer goes before the next one is made
            ctx, out = self._whole_graph(blocks, step, n_kv, last_only=True)
            cached = self._whole = (n_kv, blocks, Graph(ctx, [out], [(1, vocab)]))
        self.runtime.compute(cached[2])
        return cached[2].outputs[0].copy()

    def _whole_graph(self, blocks: dict, step: StepTensors, n_kv: int, last_only: bool):
        """(context, logits) of every layer and the logits slice as one graph over step's inputs."""
        rows = len(step.row_kv)
        ops = self.cfg.n_layers * (self.spec.attention_ops(rows) + mlp_ops(rows) + 6) + mlp_ops(rows)
        ctx = Context(ops, graph_size=2 * ops + 16)
        x, last = step.x, self.cfg.n_layers - 1

        def post(blk, name, out):  # gemma3's post-norms, as post_norm between block graphs
            return build_post_norm(ctx, self.spec, blk, name, out) if name in blk else out

        for i in range(self.cfg.n_layers):
            blk = blocks[attn_key(i)]
            attn = build_attention(ctx, self.spec, blk, replace(step, x=x), self._k[i], self._v[i], n_kv,
                                   self._rope_factors, i)
            if i == last and last_only and step.tokens > 1:  # as llama.cpp: only the output row goes on
                x, attn = (ctx.view(a, (self.cfg.hidden, 1), (a.nb[1],), (step.tokens - 1) * a.nb[1]) for a in (x, attn))
            x = ctx.add(x, post(blk, POST_ATTN_NORM, attn))  # the residual, as add_ adds between block graphs
            blk = blocks[mlp_key(i)]
            x = ctx.add(x, post(blk, POST_MLP_NORM, build_mlp(ctx, self.spec, blk, x, step.exact)))
        return ctx, build_logits(ctx, self.spec, blocks[GLOBALS], x, last_only, step.exact)

    def logits(self, h: np.ndarray, glob: GgmlBlock, all_positions: bool) -> np.ndarray:
        """Final norm and this rank's vocabulary slice: (T or 1, vocab_local) float32 numpy (a copy)."""
        step = self._x(h)
        rows = step.tokens if all_positions else 1
        vocab = glob["lm_head"].out_features
        if step.tokens == 1:
            return self._run(glob, ("logits",), OPS_PER_MLP, lambda ctx: build_logits(
                ctx, self.spec, glob, step.x, True), (1, vocab)).copy()
        ops = mlp_ops(len(step.row_kv))
        ctx = Context(ops, graph_size=2 * ops + 16)
        graph = Graph(ctx, [build_logits(ctx, self.spec, glob, step.x, not all_positions, step.exact)],
                      [(rows, vocab)], galloc=self._shared.ptr)
        self.runtime.compute(graph)
        return graph.outputs[0].copy()
