"""The inputs of one forward step as ggml graph leaves: numpy buffers the graphs read in place.

A step is runs of rows (tpi.model.rows.Rows). Its graphs are built for its *shape*: the number of
rows, and per run the row count, the KV slot's first cache row and n_kv (the attended cache rows,
rounded up to KV_BUCKET as llama.cpp pads them). Values (hidden states, positions, KV write rows,
masks, output rows) are written into the buffers before each compute, so a decode step reuses its
graphs until a slot joins, leaves or crosses a bucket.
"""
from __future__ import annotations

import itertools

import numpy as np

from tpi.model.ggml_blocks import AttnRun, StepTensors
from tpi.model.rows import Rows
from tpi.quant.ggml_graph import Context

ACT = np.float32
KV_BUCKET = 256  # attended cache rows are a multiple of this (llama.cpp pads n_kv the same way)
_serials = itertools.count()


def n_kv_of(end: int, context: int) -> int:
    """Cache rows a run ending at position `end` (exclusive) attends: end rounded up to KV_BUCKET."""
    return min(context, -(-end // KV_BUCKET) * KV_BUCKET)


def step_shape(rows: Rows, context: int) -> tuple:
    """(tokens, ((rows, first cache row, n_kv) per run), output rows, exact): what a step's graphs depend on.

    An exact step's verify runs (Rows.exact_runs, tpi.model.ggml_exact) attend one row per run, over the
    n_kv of that row's own decode step; its prompt chunks attend as in a plain step.
    """
    runs = []
    for slot, start, count, end, exact in zip(rows.slots, rows.starts, rows.counts, rows.ends, rows.exact_runs):
        if exact:
            runs += [(1, slot * context, n_kv_of(pos + 1, context)) for pos in range(start, end)]
        else:
            runs.append((count, slot * context, n_kv_of(end, context)))
    runs = tuple(runs)
    return rows.tokens, runs, rows.n_outputs, rows.exact


class StepInputs:
    """One step shape's input buffers and their graph leaves.

    x [T, hidden] f32 residual, pos I32 [T] (RoPE), idx I64 [T] (KV rows written: slot * context +
    position), out I32 [n] (rows whose logits are wanted; the last row when none are), and per run
    a mask F16 [rows, n_kv] of its slot's cache rows (0 up to each row's position, -inf after; window:
    a local layer's mask also hides keys window or more positions back, 0 for none). post [T, hidden]
    carries a summed block output through a post-norm (gemma3).
    """

    def __init__(self, shape: tuple, hidden: int, x: np.ndarray | None = None, window: int = 0):
        tokens, runs, n_out, exact = shape
        self.shape, self.serial = shape, next(_serials)  # the serial tells graphs of equal shapes apart
        self.x = np.zeros((tokens, hidden), ACT) if x is None else x
        self.pos = np.zeros(tokens, np.int32)
        self.idx = np.zeros(tokens, np.int64)
        self.out = np.full(max(1, n_out), tokens - 1, np.int32)
        self.post = np.zeros((tokens, hidden), ACT)
        self.window = window
        self.masks = [np.full((count, n_kv), -np.inf, np.float16) for count, _, n_kv in runs]
        self.masks_swa = [np.full((count, n_kv), -np.inf, np.float16) for count, _, n_kv in runs] if window else []
        self.ctx = Context(5 + 2 * len(runs))
        ctx = self.ctx
        row0 = 0
        attn_runs = []
        for i, ((count, kv_row0, n_kv), mask) in enumerate(zip(runs, self.masks)):
            swa = ctx.input(self.masks_swa[i]) if window else None
            attn_runs.append(AttnRun(row0, count, kv_row0, n_kv, ctx.input(mask), swa))
            row0 += count
        self._run_rows = [(r.row0, r.rows) for r in attn_runs]  # (first row, rows) of each attention run
        out = ctx.input(self.out) if n_out < tokens else None
        self.step = StepTensors(ctx.input(self.x), ctx.input(self.pos), ctx.input(self.idx), tuple(attn_runs),
                                tokens, out, exact)
        self.post_in = ctx.input(self.post)
        self._cols = [np.arange(n_kv, dtype=np.int32) for _, _, n_kv in runs]

    @property
    def tokens(self) -> int:
        return self.shape[0]

    @property
    def n_outputs(self) -> int:
        return self.shape[2]

    def fill(self, rows: Rows, context: int) -> None:
        """Write a step's positions, KV rows, masks and output rows (rows must have this shape)."""
        np.copyto(self.pos, rows.positions)
        np.multiply(rows.row_slots, context, out=self.idx, casting="unsafe")
        self.idx += self.pos
        if rows.n_outputs:
            np.copyto(self.out, rows.output_rows)
        for i, ((first, count), mask, cols) in enumerate(zip(self._run_rows, self.masks, self._cols)):
            back = self.pos[first:first + count, None] - cols[None, :]  # (rows, n_kv): query - key position
            np.copyto(mask, np.where(back >= 0, np.float16(0), np.float16(-np.inf)))
            if self.window:
                np.copyto(self.masks_swa[i], np.where((back >= 0) & (back < self.window), np.float16(0),
                                                      np.float16(-np.inf)))
