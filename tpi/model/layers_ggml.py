"""Per-rank transformer block maths on ggml, llama.cpp's kernel library: one graph per block.

Each attention block and each MLP block runs as ONE ggml graph (tpi.model.ggml_blocks), so Python runs
once per block, not once per op; between them the model adds the block's output (after the
allreduce in a group). A step is runs of rows, one per sequence (tpi.model.rows.Rows), each in its
own KV slot: the caches hold `slots` regions of `context` rows. The graphs read their inputs in place
from buffers made per step shape (tpi.model.ggml_steps): a step of up to KEEP_ROWS rows (decode rows,
a speculative check) keeps its graphs on the block and reuses them while its shape stands (n_kv is
rounded up to 256, as llama.cpp pads it, so a decode graph is rebuilt once per 256 positions); a
larger step (a prompt chunk) builds its graphs per call into one shared compute buffer. A group of
one with resident blocks runs its whole pass as one graph (forward_all): measured 1.16x (1 thread)
and 1.24x (2 threads, loaded machine) the block-by-block decode on SmolLM2, bit-identical to it.
Same interface as NumpyLayers / TorchLayers; activations at the seam are float32 numpy.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np

from tpi.model.blocks import EMBED, GLOBALS, POST_ATTN_NORM, POST_MLP_NORM, QK_NORMS, attn_key, mlp_key
from tpi.model.config import ModelConfig
from tpi.errors import ShapeError
from tpi.model.ggml_blocks import (OPS_PER_MLP, BlockSpec, exact_ops, build_attention, build_logits, build_mlp, build_post_norm,
                                   rope_frequency_factors)
from tpi.model.ggml_steps import StepInputs, step_shape
from tpi.model.rows import Rows, as_rows, kv_zeros
from tpi.model.moe import EXPERT_TENSORS, ROUTER, ExpertShare
from tpi.model.moe_ggml import MoeRunner, check_expert_block
from tpi.scheduler.experts import ExpertCache
from tpi.quant.ggml_backend import GgmlBackend, can_repack, gather_rows, weight_type
from tpi.quant.ggml_graph import Context, Graph, SharedComputeBuffer
from tpi.quant.ggml_lib import F16
from tpi.quant.ggml_runtime import CpuRuntime
from tpi.quant.ggml_graph import array_address
from tpi.quant.ggml_stream import (copied_repacked, drop, mapped_repacked, page_range, populate, remap_supported,
                                   repacked_rows)

ACT = np.float32
KEEP_ROWS = 16  # steps of up to this many rows keep their graphs (decode rows, speculative checks)
KEPT_SHAPES = 4  # graphs kept per block and kind (and step inputs kept, x2), least recently used dropped:
# a decode step and the speculative checks between them (tpi.master.speculation: 2, 3, 5 or 9 rows)


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
        self.expert_cache = None  # a streamed MoE block: its experts map in through it (tpi.scheduler.experts)

    def populate(self) -> None:
        populate(self.pages)

    def release(self) -> None:
        drop(self.pages)
        if self.expert_cache is not None:
            self.expert_cache.release(self)


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


def _exact_rows(step) -> int:
    """Rows whose matmuls an exact step splits into chunks (0 for a plain step): sizes its graphs."""
    return step.tokens if step.exact else 0


class GgmlLayers:
    """Computes one rank's share of attention and MLP blocks, and its logits slice, as ggml graphs."""

    name = "ggml"
    exact_rows = True  # a step's rows.exact is computed in one pass (tpi.model.ggml_exact)

    def __init__(self, cfg: ModelConfig, n_q: int, q_to_kv: tuple[int, ...], context: int, threads: int | None,
                 repack: bool = True, whole_graph: bool = True, slots: int = 1,
                 experts: ExpertShare | None = None):
        self.cfg = cfg
        self.runtime = CpuRuntime(threads)
        self.kernels = GgmlBackend(runtime=self.runtime, repack=repack)
        self.spec = BlockSpec.of(cfg, n_q, tuple(q_to_kv))
        self.context, self.slots = context, slots
        kv_dim = self.spec.kv_dim
        # (slots * context, kv_dim) per layer, slot s at rows s * context..: llama.cpp's cache once per
        # slot; np.zeros pages are resident once written
        self.k_cache = [kv_zeros((slots * context, kv_dim), np.float16) for _ in range(cfg.n_layers)]
        self.v_cache = [kv_zeros((slots * context, kv_dim), np.float16) for _ in range(cfg.n_layers)]
        self._const = Context(2 * cfg.n_layers + 1)
        self._k = [self._const.input(a, F16) for a in self.k_cache]
        self._v = [self._const.input(a, F16) for a in self.v_cache]
        factors = rope_frequency_factors(cfg)
        self._rope_factors = None if factors is None else self._const.input(factors)
        self.window = cfg.sliding_window if cfg.swa_layers else 0
        self._kept: dict[tuple, StepInputs] = {}  # step shape -> its inputs (small steps, newest last)
        self._pass: tuple[Rows, StepInputs] | None = None  # the step being computed
        self._shared = SharedComputeBuffer()
        self._rows = self.spec.rotate_half_rows()
        self.whole_graph = whole_graph
        self._whole: dict[int, tuple[dict, Graph]] = {}  # inputs serial -> (blocks, whole-pass graph)
        self.experts = experts or (ExpertShare.whole_model(cfg.n_experts, cfg.expert_ff) if cfg.is_moe else None)
        # MoE blocks whose chosen experts may live elsewhere (placement B) run router and experts apart
        self.moe: MoeRunner | None = None
        self.expert_cache = None  # tpi.scheduler.experts.ExpertCache when experts stream (runtime_for)
        if self.experts is not None and not self.experts.all_experts:
            self.split_experts()

    def split_experts(self, cache=None) -> None:
        """Run MoE blocks as a router graph, then a graph of the chosen local experts (placement B, or
        experts streamed through `cache`, which then hears of every use)."""
        self.moe = MoeRunner(self.experts, self.cfg.hidden, self.cfg.n_experts_used, self.cfg.rms_eps,
                             self.runtime, self._shared, cache)
        self.whole_graph = False

    # ---- weights -------------------------------------------------------------------------
    @staticmethod
    def forward_context():
        """Nothing to switch around a ggml forward pass."""
        return contextlib.nullcontext()

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

    def _block(self, block: dict, weight, expert_weight=None) -> GgmlBlock:
        """A stored block bound as ggml tensors: matrices through `weight`, expert tensors (3-D) through
        `expert_weight` (default: resident, repacked where ggml repacks them)."""
        vectors = [n for n, v in block.items() if isinstance(v, np.ndarray) and v.ndim == 1]
        out = GgmlBlock(Context(max(1, len(vectors))))
        for name, value in block.items():
            if name == EMBED:
                out[name] = value
            elif name in vectors:
                out[name] = out.ctx.input(np.array(value, dtype=ACT))  # small; copied off the map
            elif name in EXPERT_TENSORS:
                out[name] = (expert_weight or self._expert_weight)(value)
            else:
                out[name] = weight(name, value)
        if ROUTER in out:
            check_expert_block(out, self.experts, self.cfg.hidden)
        return out

    def _expert_weight(self, qt):
        return self.kernels.weight(qt, experts=self.experts.n_local)

    # ---- streaming -------------------------------------------------------------------------
    @property
    def kernel_layout(self):
        """(name, prepare_block) of the shard copy streamed blocks map: q/k rows in llama.cpp's order
        and weights in ggml's repacked bytes (tpi.quant.ggml_stream); None where nothing would differ."""
        if not (self.kernels.repack and remap_supported() and self.kernels.lib.has_avx2):
            return None
        lib = self.kernels.lib
        name = f"ggml-{lib.version}-{lib.commit.split('-')[0]}-repack" + ("-experts-stored" if self.cfg.is_moe else "")

        def prepare(block: dict) -> dict:  # expert tensors stay as stored: streamed, they are read in place
            return {n: v if n == EMBED or n in EXPERT_TENSORS or isinstance(v, np.ndarray)
                    else repacked_rows(self.kernels, v) for n, v in self._rotate_half(block).items()}

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

        def mapped_experts(qt):
            """Expert tensors bound where they lie and not mapped in: the expert cache maps in the chosen ones."""
            w = kernels.weight(qt, repack=False, experts=self.experts.n_local)
            data = qt.arrays.get("data")
            if data is None or not _in_map(store, data):
                return w
            return replace(w, pages=(array_address(data), data.nbytes))

        def streamed(block: dict) -> GgmlBlock:
            """Mapped and built the first time; later uses only map its pages in again (no mapping,
            Python object or graph per token: those cost the compute thread ~3 ms a block). A block
            holding a copy (a converted format, gathered q/k rows) is built anew each time instead."""
            key = store.file_offset(next(_arrays(block)))
            blk = built.get(key)
            if blk is not None:
                blk.populate()
                return blk
            blk = self._block(block if from_layout else self._rotate_half(block), mapped, mapped_experts)
            weights = {n: w for n, w in blk.items() if hasattr(w, "pages")}
            if all(w.pages for w in weights.values()):  # every weight is file pages: nothing stays resident
                blk.pages = [w.pages for n, w in weights.items() if n not in EXPERT_TENSORS]
                if ROUTER in blk and self.expert_cache is not None:
                    tensors = [(*blk[n].pages, store.file_offset(block[n].arrays["data"])) for n in EXPERT_TENSORS]
                    self.expert_cache.add_block(blk, tensors, self.experts.n_local, fd)
                    blk.expert_cache = self.expert_cache
                built[key] = blk
            return blk

        if self.cfg.is_moe:  # experts stream one by one: the router runs apart and tells the cache
            self.expert_cache = ExpertCache()
            self.split_experts(self.expert_cache)

        if not from_layout:
            return self.to_runtime, streamed
        return lambda block: self._block(block, pinned), streamed

    # ---- tensors at the seam ---------------------------------------------------------------
    def hidden_from_numpy(self, h: np.ndarray, rows: Rows | None = None) -> np.ndarray:
        """A float32 (T, hidden) residual the graphs read in place: the buffer of the step's inputs."""
        h = np.asarray(h)
        if h.ndim != 2 or h.shape[1] != self.cfg.hidden or h.shape[0] < 1:
            raise ShapeError(f"hidden states must be (tokens, {self.cfg.hidden}), got {list(h.shape)}")
        return self._inputs(h, as_rows(0 if rows is None else rows, h.shape[0]), begin=True).x

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def add_(h: np.ndarray, partial: np.ndarray) -> None:
        np.add(h, partial, out=h)

    # ---- step inputs -----------------------------------------------------------------------
    def _inputs(self, h: np.ndarray, rows: Rows | None, begin: bool = False) -> StepInputs:
        """The inputs of the step h belongs to, holding h's values (rows None: the current step's).

        A new step (other rows) gets its shape's kept inputs, or fresh ones for a large step, and
        writes its positions, KV rows and masks once; later blocks of the pass only copy h in when
        the caller's h is not the inputs' own buffer.
        """
        cur = self._pass
        if not begin and cur is not None and (rows is None or rows is cur[0] or rows == cur[0]) \
                and cur[1].tokens == h.shape[0]:
            inputs = cur[1]
        else:
            rows = rows if rows is not None else Rows.sequence(0, h.shape[0])  # positions matter not here
            rows.check(self.slots, self.context)  # ggml aborts on a KV row past the cache
            inputs = self._new_inputs(rows, h)
            inputs.fill(rows, self.context)
            self._pass = (rows, inputs)
        if h is not inputs.x:
            np.copyto(inputs.x, h)
        return inputs

    def _new_inputs(self, rows: Rows, h: np.ndarray) -> StepInputs:
        shape = step_shape(rows, self.context)
        if rows.tokens > KEEP_ROWS:  # its own copy: h may be a read-only network buffer
            return StepInputs(shape, self.cfg.hidden, np.array(h, dtype=ACT, order="C"), self.window)
        inputs = self._kept.pop(shape, None) or StepInputs(shape, self.cfg.hidden, window=self.window)
        self._kept[shape] = inputs
        while len(self._kept) > 2 * KEPT_SHAPES:
            self._kept.pop(next(iter(self._kept)))
        return inputs

    def _run(self, blk: GgmlBlock, kind: str, inputs: StepInputs, ops: int, build, shape: tuple[int, int]) -> np.ndarray:
        """Compute a block's graph: kept on the block for a small step, once-used (output copied) otherwise."""
        if inputs.tokens <= KEEP_ROWS:
            key = (kind, inputs.serial)
            graph = blk.graphs.pop(key, None)  # re-inserted below: the dict's order is least recent first
            if graph is None:
                same = [k for k in blk.graphs if k[0] == kind]
                for stale in same[:max(0, len(same) - KEPT_SHAPES + 1)]:
                    del blk.graphs[stale]  # an older step shape (n_kv bucket, slots)
                ctx = Context(ops, graph_size=2 * ops + 16)
                graph = Graph(ctx, [build(ctx)], [shape])
            blk.graphs[key] = graph
            self.runtime.compute(graph)
            return graph.outputs[0]
        ctx = Context(ops, graph_size=2 * ops + 16)
        graph = Graph(ctx, [build(ctx)], [shape], galloc=self._shared.ptr)
        self.runtime.compute(graph)
        return graph.outputs[0].copy()

    # ---- blocks ----------------------------------------------------------------------------
    def attention(self, h: np.ndarray, blk: GgmlBlock, layer: int, rows: Rows | int) -> np.ndarray:
        """h: (T, hidden) f32 at rows (or one sequence's start position) -> this rank's partial attention
        output (T, hidden) f32."""
        inputs = self._inputs(h, as_rows(rows, h.shape[0]))
        step = inputs.step
        ops = self.spec.attention_ops(len(step.runs), _exact_rows(step))
        return self._run(blk, "attn", inputs, ops, lambda ctx: build_attention(
            ctx, self.spec, blk, step, self._k[layer], self._v[layer], self._rope_factors, layer),
            (step.tokens, self.cfg.hidden))

    def mlp(self, h: np.ndarray, blk: GgmlBlock) -> np.ndarray:
        """h: (T, hidden) f32 -> this rank's partial MLP output (T, hidden) f32."""
        inputs = self._inputs(h, None)
        step = inputs.step
        if self.moe is not None and ROUTER in blk:
            if step.tokens == 1:
                return self.moe.decode(blk, step.x, inputs.serial)
            return self.moe.prefill(blk, step.x, step.exact)
        return self._run(blk, "mlp", inputs, self.spec.mlp_ops() + exact_ops(_exact_rows(step)),
                         lambda ctx: build_mlp(ctx, self.spec, blk, step.x, step.exact),
                         (step.tokens, self.cfg.hidden))

    def post_norm(self, total: np.ndarray, blk: GgmlBlock, name: str) -> np.ndarray:
        """A block's output summed over the ranks, (T, hidden) f32, through the block's post-norm."""
        inputs = self._pass[1] if self._pass is not None else None  # the step whose block this is
        if inputs is None or inputs.tokens != total.shape[0]:
            raise ShapeError(f"a post-norm of {total.shape[0]} rows outside a step of as many rows")
        np.copyto(inputs.post, total)
        return self._run(blk, name, inputs, OPS_PER_MLP, lambda ctx: build_post_norm(
            ctx, self.spec, blk, name, inputs.post_in), (inputs.tokens, self.cfg.hidden))

    def _logits_rows(self, h: np.ndarray, rows: Rows | bool) -> Rows:
        """Rows, or all_positions of one sequence (the current step's when it is one)."""
        if isinstance(rows, Rows):
            return rows
        cur = self._pass[0] if self._pass is not None and self._pass[1].tokens == h.shape[0] else None
        one = cur is not None and len(cur.slots) == 1
        return Rows.sequence(cur.starts[0] if one else 0, h.shape[0], bool(rows), cur.slots[0] if one else 0)

    def forward_all(self, h: np.ndarray, blocks: dict, rows: Rows) -> np.ndarray | None:
        """A group of one's whole pass as ONE graph: no Python and no thread wake-up between blocks.

        A small step's graph is kept (per step shape, the last KEPT_SHAPES); a large one's is built
        per call into the shared compute buffer. None (run block by block) when whole_graph is off.
        """
        if not self.whole_graph:
            return None
        inputs = self._inputs(h, rows)
        step, n_out = inputs.step, inputs.n_outputs
        vocab = blocks[GLOBALS]["lm_head"].out_features
        rows_out = max(1, n_out)
        if inputs.tokens > KEEP_ROWS:
            ctx, out = self._whole_graph(blocks, step)
            graph = Graph(ctx, [out], [(rows_out, vocab)], galloc=self._shared.ptr)
            self.runtime.compute(graph)
            return graph.outputs[0][:n_out].copy()
        cached = self._whole.pop(inputs.serial, None)  # re-inserted below: least recent first
        if cached is None or cached[0] is not blocks:
            while len(self._whole) >= KEPT_SHAPES:
                self._whole.pop(next(iter(self._whole)))  # its compute buffer goes before the next one is made
            ctx, out = self._whole_graph(blocks, step)
            cached = (blocks, Graph(ctx, [out], [(rows_out, vocab)]))
        self._whole[inputs.serial] = cached
        self.runtime.compute(cached[1])
        return cached[1].outputs[0][:n_out].copy()

    def _whole_graph(self, blocks: dict, step):
        """(context, logits) of every layer and the logits slice as one graph over step's inputs."""
        exact = _exact_rows(step)
        ops = (self.cfg.n_layers * (self.spec.attention_ops(len(step.runs), exact) + self.spec.mlp_ops() + exact_ops(exact)
                                    + 6) + OPS_PER_MLP + exact_ops(exact) + 2)
        ctx = Context(ops, graph_size=2 * ops + 16)
        x, last = step.x, self.cfg.n_layers - 1

        def post(blk, name, out):  # gemma3's post-norms, as post_norm between block graphs
            return build_post_norm(ctx, self.spec, blk, name, out) if name in blk else out

        for i in range(self.cfg.n_layers):
            blk = blocks[attn_key(i)]
            attn = build_attention(ctx, self.spec, blk, replace(step, x=x), self._k[i], self._v[i],
                                   self._rope_factors, i)
            if i == last and step.out is not None:  # as llama.cpp: only the output rows go on
                x, attn = ctx.get_rows(x, step.out), ctx.get_rows(attn, step.out)
            x = ctx.add(x, post(blk, POST_ATTN_NORM, attn))  # the residual, as add_ adds between block graphs
            blk = blocks[mlp_key(i)]
            x = ctx.add(x, post(blk, POST_MLP_NORM, build_mlp(ctx, self.spec, blk, x, step.exact)))
        return ctx, build_logits(ctx, self.spec, blocks[GLOBALS], x, None, step.exact)

    def logits(self, h: np.ndarray, glob: GgmlBlock, rows: Rows | bool) -> np.ndarray:
        """Final norm and this rank's vocabulary slice of the output rows (rows: the step's Rows, or
        all_positions for one sequence): (n, vocab_local) float32 numpy (a copy)."""
        inputs = self._inputs(h, self._logits_rows(h, rows))
        step, n_out = inputs.step, inputs.n_outputs
        vocab = glob["lm_head"].out_features
        if n_out == 0:
            return np.zeros((0, vocab), ACT)
        out = self._run(glob, "logits", inputs, OPS_PER_MLP + exact_ops(_exact_rows(step)) + 1, lambda ctx: build_logits(
            ctx, self.spec, glob, step.x, step.out, step.exact), (n_out, vocab))
        return out.copy() if inputs.tokens <= KEEP_ROWS else out
