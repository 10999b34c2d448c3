"""A rank's mixture-of-experts MLP as ggml graphs, in llama.cpp's own ops and order (build_moe_ffn).

Shapes in ggml order (ne[0] fastest). Expert tensors are 3-D: gate / up [hidden, ff_local, E_local],
down [ff_local, hidden, E_local] (tpi.quant.ggml_backend.GgmlBackend.weight with experts=E_local).

Two ways to run a block:
- fused (`build_moe`): router, top k, weights and experts in one graph. Used when every chosen expert
  lives on this rank (one device, placement A) and nothing streams: the numbers are llama.cpp's.
- split (`MoeRunner`): a router graph hands the chosen experts to Python, which keeps those that live
  here (placement B) and tells the expert cache (streaming) before an expert graph runs only them.
  Decode graphs are kept per block and step-input shape: the router graph, and one expert graph per
  local count m (1..k).

Exact rows (a verify pass of speculative decoding, tpi.model.ggml_exact): the router's F32 mul_mat runs
one row a call (tinyBLAS otherwise sums another way from 2 rows on) and the experts' mul_mat_id in calls
of at most 7 tokens (the tiled K-quant kernel takes an expert that 8 tokens name); the rest (soft_max,
top k, weights, SwiGLU, the slots' sum) is per row anyway. A split runner's verify pass pads each token's
slots with weight-0 experts, which add +0 to its sum: the same bits as its decode step's.
"""
from __future__ import annotations

import numpy as np

from tpi.errors import ShapeError
from tpi.model.ggml_exact import mul_mat, mul_mat_id
from tpi.model.moe import DOWN_EXPS, GATE_EXPS, ROUTER, UP_EXPS, WEIGHT_SUM_FLOOR, ExpertShare
from tpi.quant.ggml_graph import Context, Graph, Tensor

OPS_PER_ROUTER = 16  # norm 2, router 11 (argsort counts 2), slack
OPS_PER_EXPERTS = 12  # reshape, 3 mul_mat_id, swiglu, mul, cont, slack; plus 2 per slot
OPS_PER_EXACT_ROW = 16  # per row of an exact pass: router chunk 3, expert chunks 3 x 4, slack
KEPT = 2  # step-input shapes whose decode graphs a block keeps (tpi.model.layers_ggml.KEPT_SHAPES)


def moe_ops(k: int) -> int:
    """Tensors a fused MoE graph of k slots creates."""
    return OPS_PER_ROUTER + OPS_PER_EXPERTS + 2 * k


def _norm(ctx: Context, x: Tensor, w: Tensor, eps: float) -> Tensor:
    return ctx.mul(ctx.rms_norm(x, eps), w)


def build_router(ctx: Context, blk: dict, xn: Tensor, k: int, exact: bool = False) -> tuple[Tensor, Tensor]:
    """(chosen I32 [k, T] largest first (a view), weights F32 [1, k, T] renormalised) of xn [hidden, T]."""
    t = xn.ne[1]
    logits = mul_mat(ctx, blk[ROUTER], xn, exact)  # [E, T], F32 weights: no activation rounding
    probs = ctx.soft_max(logits)
    chosen = ctx.argsort_top_k(probs, k)
    weights = ctx.get_rows(ctx.reshape(probs, 1, probs.ne[0], t), chosen)  # [1, k, T]
    weights = ctx.reshape(weights, k, t)
    total = ctx.clamp(ctx.sum_rows(weights), WEIGHT_SUM_FLOOR, float("inf"))  # [1, T]
    return chosen, ctx.reshape(ctx.div(weights, total), 1, k, t)


def build_experts(ctx: Context, blk: dict, xn: Tensor, chosen: Tensor, weights: Tensor, exact: bool = False) -> Tensor:
    """sum over slots i of weights[i] * down(silu(gate xn) * up xn) for expert chosen[i]: [hidden, T].

    chosen holds local expert indices, checked by whoever filled it; slots add up in slot order.
    """
    hidden, t = xn.ne[0], xn.ne[1]
    slots = chosen.ne[0]
    cur = ctx.reshape(xn, hidden, 1, t)
    up = mul_mat_id(ctx, blk[UP_EXPS], cur, chosen, exact)  # [ff, slots, T]
    gate = mul_mat_id(ctx, blk[GATE_EXPS], cur, chosen, exact)
    experts = mul_mat_id(ctx, blk[DOWN_EXPS], ctx.swiglu_split(gate, up), chosen, exact)  # [hidden, slots, T]
    experts = ctx.mul(experts, weights)
    row = experts.nb[2]
    out = ctx.view(experts, (hidden, t), (row,), 0)
    for i in range(1, slots):
        out = ctx.add(out, ctx.view(experts, (hidden, t), (row,), i * experts.nb[1]))
    return ctx.cont(out) if slots == 1 else out


def build_moe(ctx: Context, blk: dict, x: Tensor, k: int, eps: float, exact: bool = False) -> Tensor:
    """The fused MoE MLP of residual x [hidden, T]: this rank's partial output [hidden, T] (exact: rows
    with their decode steps' bits)."""
    xn = _norm(ctx, x, blk["mlp_norm"], eps)
    chosen, weights = build_router(ctx, blk, xn, k, exact)
    return build_experts(ctx, blk, xn, chosen, weights, exact)


def check_expert_block(blk: dict, share: ExpertShare, hidden: int) -> None:
    """Refuse a block whose expert tensors do not hold this share (ggml would read out of bounds)."""
    want = {GATE_EXPS: (hidden, share.ff_local), UP_EXPS: (hidden, share.ff_local),
            DOWN_EXPS: (share.ff_local, hidden)}
    for name, (k, rows) in want.items():
        ne = blk[name].tensor.ne
        if ne[:3] != (k, rows, share.n_local):
            raise ShapeError(f"expert tensor {name} is {list(ne[:3])}, this rank's share needs "
                             f"{[k, rows, share.n_local]}; the shard does not match its assignment")
    if blk[ROUTER].tensor.ne[:2] != (hidden, share.n_experts):
        raise ShapeError(f"the router is {list(blk[ROUTER].tensor.ne[:2])}, the model has {share.n_experts} experts")


def padded_slots(per_token: list, weights: np.ndarray, m: int, used: list[int], n_local: int):
    """(ids I32 (T, m), weights F32 (T, m, 1)): each token's local experts, then weight-0 padding.

    Padding picks experts the batch uses anyway (no extra bytes read) and never one the token already
    has: ggml's repacked mul_mat_id counts at most T rows per expert, and a token naming an expert
    twice overruns its table.
    """
    t = len(per_token)
    ids = np.empty((t, m), np.int32)
    w = np.zeros((t, m, 1), np.float32)
    spare = used + [e for e in range(n_local) if e not in set(used)]
    for i, slots in enumerate(per_token):
        mine = [e for _, e in slots]
        pad = [e for e in spare if e not in mine][: m - len(mine)]
        ids[i] = mine + pad
        for j, (slot, _) in enumerate(slots):
            w[i, j, 0] = weights[i, slot]
    if ids.min() < 0 or ids.max() >= n_local or any(len(set(row)) != m for row in ids.tolist()):
        raise ShapeError(f"expert ids out of range or repeated for {n_local} local experts; this is a tpi bug")
    return ids, w


class MoeRunner:
    """Runs MoE blocks split in two graphs (router, then the local chosen experts), for placement B
    and for streamed experts; `cache` (tpi.scheduler.experts.ExpertCache or None) hears which
    experts each block uses before they compute and after."""

    def __init__(self, share: ExpertShare, hidden: int, k: int, eps: float, runtime, shared, cache=None):
        self.share, self.hidden, self.k, self.eps = share, hidden, k, eps
        self.runtime, self.shared, self.cache = runtime, shared, cache
        self._ids = {m: np.zeros((1, m), np.int32) for m in range(1, k + 1)}  # ne [m, 1]
        self._weights = {m: np.zeros((1, m, 1), np.float32) for m in range(1, k + 1)}  # ne [1, m, 1]
        self._inputs = Context(2 * k)
        self._ids_t = {m: self._inputs.input(a) for m, a in self._ids.items()}
        self._weights_t = {m: self._inputs.input(a) for m, a in self._weights.items()}
        self._zeros = np.zeros((1, hidden), np.float32)
        self._serials: list[int] = []  # step inputs whose decode graphs are kept

    # ---- one token: kept graphs --------------------------------------------------------------
    def decode(self, blk, x: Tensor, serial: int) -> np.ndarray:
        """The block's partial output (1, hidden) for the token in x [hidden, 1], the buffer of the step
        inputs numbered `serial` (graphs are kept per serial, the last KEPT of them)."""
        if serial not in self._serials:
            self._serials = (self._serials + [serial])[-KEPT:]
        for key in [k for k in blk.graphs if k[0] in ("moe-router", "moe-experts") and k[-1] not in self._serials]:
            del blk.graphs[key]  # built over step inputs that are gone
        graph = blk.graphs.get(("moe-router", serial))
        if graph is None:
            ctx = Context(OPS_PER_ROUTER + 2, graph_size=2 * OPS_PER_ROUTER + 16)
            chosen, weights = build_router(ctx, blk, _norm(ctx, x, blk["mlp_norm"], self.eps), self.k)
            graph = blk.graphs[("moe-router", serial)] = Graph(
                ctx, [ctx.cont(chosen), ctx.reshape(weights, self.k, 1)], [(1, self.k), (1, self.k)])
        self.runtime.compute(graph)
        chosen, weights = graph.outputs
        slots = self.share.local_slots(chosen[0])
        if self.cache is not None:
            self.cache.use(blk, [e for _, e in slots])
        m = len(slots)
        if m == 0:
            return self._zeros
        ids, w = self._ids[m], self._weights[m]
        for j, (slot, local) in enumerate(slots):
            ids[0, j] = local
            w[0, j, 0] = weights[0, slot]
        graph = blk.graphs.get(("moe-experts", m, serial))
        if graph is None:
            ops = OPS_PER_EXPERTS + 2 * m + 2
            ctx = Context(ops, graph_size=2 * ops + 16)
            xn = _norm(ctx, x, blk["mlp_norm"], self.eps)
            out = build_experts(ctx, blk, xn, self._ids_t[m], self._weights_t[m])
            graph = blk.graphs[("moe-experts", m, serial)] = Graph(ctx, [out], [(1, self.hidden)])
        self.runtime.compute(graph)
        if self.cache is not None:
            self.cache.done(blk)
        return graph.outputs[0]

    # ---- a batch of tokens: graphs built per call ----------------------------------------------
    def prefill(self, blk, x: Tensor, exact: bool = False) -> np.ndarray:
        """The block's partial output (T, hidden) for x [hidden, T] (a copy; exact: each row its decode
        step's bits)."""
        t = x.ne[1]
        extra = OPS_PER_EXACT_ROW * t if exact else 0
        ops = OPS_PER_ROUTER + 2 + extra
        ctx = Context(ops, graph_size=2 * ops + 16)
        chosen, weights = build_router(ctx, blk, _norm(ctx, x, blk["mlp_norm"], self.eps), self.k, exact)
        graph = Graph(ctx, [ctx.cont(chosen), ctx.reshape(weights, self.k, t)], [(t, self.k), (t, self.k)],
                      galloc=self.shared.ptr)
        self.runtime.compute(graph)
        chosen, weights = (a.copy() for a in graph.outputs)
        per_token = [self.share.local_slots(c) for c in chosen]
        used = sorted({e for slots in per_token for _, e in slots})
        if self.cache is not None:
            self.cache.use(blk, used)
        m = max((len(s) for s in per_token), default=0)
        if m == 0:
            return np.zeros((t, self.hidden), np.float32)
        ids, w = padded_slots(per_token, weights, m, used, self.share.n_local)
        ops = OPS_PER_EXPERTS + 2 * m + 4 + extra
        ctx = Context(ops, graph_size=2 * ops + 16)
        xn = _norm(ctx, x, blk["mlp_norm"], self.eps)
        out = build_experts(ctx, blk, xn, ctx.input(ids), ctx.input(w), exact)
        graph = Graph(ctx, [out], [(t, self.hidden)], galloc=self.shared.ptr)
        self.runtime.compute(graph)
        result = graph.outputs[0].copy()
        if self.cache is not None:
            self.cache.done(blk)
        return result
