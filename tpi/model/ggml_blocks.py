"""One rank's transformer blocks as ggml graphs: attention, MLP and the logits slice.

Shapes are in ggml order (ne[0] fastest): activations are [hidden, T], a weight [N, K] is ne [K, N].
The graphs follow llama.cpp's own (src/llama-graph.cpp, src/models/<arch>.cpp): rms_norm * w, q/k/v
(+ bias), per-head q/k rms_norm * w (qk_norm families), RoPE on the layer's base, q * scale (scale_q
families), set_rows into an F16 KV cache, flash attention with F32 accumulation over a view of the
cache (a local layer's mask hides keys past its window), output projection; rms_norm * w, gate|up,
SwiGLU or GeGLU, down. So a rank's numbers are llama.cpp's. A post-norm (gemma3) applies to a
block's output summed over the ranks: `build_post_norm`, outside the block graphs of a group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tpi.model.blocks import QK_NORMS
from tpi.model.config import ModelConfig
from tpi.errors import ShapeError
from tpi.model.ggml_exact import mul_mat
from tpi.model.moe import ROUTER
from tpi.model.moe_ggml import build_moe, moe_ops
from tpi.quant.ggml_graph import Context, Tensor
from tpi.quant.ggml_lib import ROPE_NEOX, ROPE_NORMAL
from tpi.model.rope import adjacent_pair_index, inverse_frequencies

F32_BYTES, F16_BYTES = 4, 2
OPS_PER_ATTENTION = 48  # tensors an attention graph creates, before its per-segment extras
OPS_PER_SEGMENT = 8
OPS_PER_MLP = 16
OPS_PER_EXACT_ROW = 32  # per exact row: a chunk's view, mul_mat and concat for each matmul of a block


def attention_segments(q_to_kv: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """Runs (q0, q1, kv0, kv1) of local query heads that share a uniform GQA group size.

    Each run is one flash-attention call (it needs n_q % n_kv == 0). A KV group split across ranks
    gives this rank a partial group at either end, so at most three runs; no KV row is replicated.
    """
    if not q_to_kv or q_to_kv[0] != 0:
        raise ShapeError(f"query heads must map onto local KV heads from 0, got {list(q_to_kv)}")
    groups: list[list[int]] = []  # [kv, q0, q1]
    for q, kv in enumerate(q_to_kv):
        if groups and groups[-1][0] == kv:
            groups[-1][2] = q + 1
        elif not groups or kv == groups[-1][0] + 1:
            groups.append([kv, q, q + 1])
        else:
            raise ShapeError(f"query heads must map onto consecutive KV heads, got {list(q_to_kv)}")
    runs: list[list[int]] = []  # [q0, q1, kv0, kv1]
    for kv, q0, q1 in groups:
        if runs and runs[-1][1] - runs[-1][0] == (q1 - q0) * (runs[-1][3] - runs[-1][2]):  # same group size
            runs[-1][1], runs[-1][3] = q1, kv + 1
        else:
            runs.append([q0, q1, kv, kv + 1])
    return tuple(tuple(r) for r in runs)


def rope_frequency_factors(cfg: ModelConfig) -> np.ndarray | None:
    """Per-pair divisors of RoPE frequencies for ggml (llama3 scaling), or None when there are none.

    GGUF files carry them (rope_freqs); an HF llama3 config gets them from the same formula.
    """
    if cfg.rope_freq_factors is not None:
        return np.asarray(cfg.rope_freq_factors, dtype=np.float32)
    if cfg.rope_scaling.kind != "llama3":
        return None
    hd = cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    return (plain / inverse_frequencies(cfg)).astype(np.float32)


@dataclass(frozen=True)
class BlockSpec:
    """What one rank's graphs need to know of the model and its share of the heads."""

    hidden: int
    head_dim: int
    n_q: int
    n_kv: int
    eps: float
    rope_base: float
    rope_scale: float  # linear scaling: positions times this
    rope_ctx_orig: int
    segments: tuple[tuple[int, int, int, int], ...]
    rope_mode: int = ROPE_NORMAL  # NEOX for archs llama.cpp runs rotate-half (q/k rows re-ordered to match)
    attn_scale: float = 1.0  # of q.k
    scale_q: bool = False  # applied to q before attention (llama.cpp's gemma3 / phi3 order), not to the scores
    gelu: bool = False  # GeGLU (gelu_tanh gate) instead of SwiGLU
    swa_layers: frozenset = frozenset()  # local layers: window mask, their own RoPE base, no scaling
    rope_base_swa: float = 10000.0
    softcap: float = 0.0  # logits = c * tanh(logits / c) when c > 0
    experts_used: int = 0  # MoE: experts the router picks per token (k); 0 for a dense MLP

    @property
    def q_dim(self) -> int:
        return self.n_q * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv * self.head_dim

    @classmethod
    def of(cls, cfg: ModelConfig, n_q: int, q_to_kv: tuple[int, ...]) -> "BlockSpec":
        if len(q_to_kv) != n_q:
            raise ShapeError(f"{n_q} local query heads but a KV map of {len(q_to_kv)}")
        linear = cfg.rope_scaling.kind == "linear" and cfg.rope_freq_factors is None
        family = cfg.family
        return cls(cfg.hidden, cfg.head_dim, n_q, max(q_to_kv) + 1, cfg.rms_eps, cfg.rope_theta,
                   1.0 / cfg.rope_scaling.factor if linear else 1.0,
                   cfg.rope_scaling.original_context if cfg.rope_scaling.kind else cfg.context,
                   attention_segments(tuple(q_to_kv)), ROPE_NEOX if family.rope_neox else ROPE_NORMAL,
                   cfg.scale, family.scale_q, family.activation == "gelu_tanh",
                   frozenset(cfg.swa_layers) if cfg.sliding_window else frozenset(), cfg.rope_theta_swa,
                   cfg.final_softcap, cfg.n_experts_used)

    def head_rotate_half(self) -> np.ndarray | None:
        """Within one head: rotate-half element j <- adjacent-pair element (the q/k norm weights' order)."""
        return np.argsort(adjacent_pair_index(1, self.head_dim)) if self.rope_mode == ROPE_NEOX else None

    def rotate_half_rows(self) -> np.ndarray | None:
        """Row order turning this rank's fused q|k|v rows from tpi's adjacent pairs into rotate-half.

        llama.cpp runs NEOX-rope archs (qwen2) on rotate-half rows, so the same order here makes
        the KV cache and flash attention's sums its own, bit for bit. None for adjacent-pair archs.
        """
        if self.rope_mode != ROPE_NEOX:
            return None
        per_head = np.argsort(adjacent_pair_index(1, self.head_dim))  # rotate-half row j <- pair row
        heads = np.arange(self.n_q + self.n_kv)[:, None] * self.head_dim
        qk = (heads + per_head[None, :]).reshape(-1)
        return np.concatenate([qk, np.arange(self.q_dim + self.kv_dim, self.q_dim + 2 * self.kv_dim)])

    def attention_ops(self, runs: int = 1, exact_rows: int = 0) -> int:
        """Tensors an attention graph creates (exact_rows: rows of an exact step, matmuls in chunks)."""
        return OPS_PER_ATTENTION + runs * (OPS_PER_SEGMENT * len(self.segments) + 1) + exact_rows * OPS_PER_EXACT_ROW


    def mlp_ops(self) -> int:
        return moe_ops(self.experts_used) if self.experts_used else OPS_PER_MLP


def exact_ops(exact_rows: int) -> int:
    """Tensors an exact step of that many rows adds to an MLP or logits graph (its matmuls in chunks)."""
    return exact_rows * OPS_PER_EXACT_ROW


@dataclass(frozen=True)
class AttnRun:
    """One sequence's rows in a step: rows row0.. attend to n_kv cache rows from kv_row0 (its KV slot)."""

    row0: int
    rows: int
    kv_row0: int
    n_kv: int
    mask: Tensor  # F16 [n_kv, rows]: 0 where a row may look (its slot's positions up to its own), -inf elsewhere
    mask_swa: Tensor | None = None  # the same for local layers: also hides keys >= window positions back


@dataclass(frozen=True)
class StepTensors:
    """A forward step's inputs as graph leaves: x [hidden, T], pos I32 [T], idx I64 [T] (KV rows written),
    the runs of rows that attend together, and out I32 [n] (rows whose logits are wanted; None: all)."""

    x: Tensor
    pos: Tensor
    idx: Tensor
    runs: tuple[AttnRun, ...]
    tokens: int
    out: Tensor | None = None
    exact: bool = False  # matmuls in row chunks that keep one-row bits (tpi.model.ggml_exact)


def _norm(ctx: Context, x: Tensor, w: Tensor, eps: float) -> Tensor:
    return ctx.mul(ctx.rms_norm(x, eps), w)


def _qkv(ctx: Context, s: BlockSpec, blk: dict, xn: Tensor, t: int, exact: bool) -> tuple[Tensor, Tensor, Tensor]:
    """q [hd, n_q, T], k [hd, n_kv, T] (views or reshapes) and v [kv_dim, T], biases added."""
    hd, q_dim, kv_dim = s.head_dim, s.q_dim, s.kv_dim
    bias = blk.get("bqkv")
    if "wqkv" in blk:
        qkv = mul_mat(ctx, blk["wqkv"], xn, exact)  # [q_dim + 2 kv_dim, T]
        if bias is not None:
            qkv = ctx.add(qkv, bias)
        row = qkv.nb[1]
        q = ctx.view(qkv, (hd, s.n_q, t), (hd * F32_BYTES, row), 0)
        k = ctx.view(qkv, (hd, s.n_kv, t), (hd * F32_BYTES, row), q_dim * F32_BYTES)
        v = ctx.view(qkv, (kv_dim, t), (row,), (q_dim + kv_dim) * F32_BYTES)
        return q, k, v
    parts = []
    for name, offset, width in (("wq", 0, q_dim), ("wk", q_dim, kv_dim), ("wv", q_dim + kv_dim, kv_dim)):
        y = mul_mat(ctx, blk[name], xn, exact)
        if bias is not None:
            y = ctx.add(y, ctx.view(bias, (width,), (), offset * F32_BYTES))
        parts.append(y)
    q, k, v = parts
    return ctx.reshape(q, hd, s.n_q, t), ctx.reshape(k, hd, s.n_kv, t), v


def build_attention(ctx: Context, s: BlockSpec, blk: dict, step: StepTensors, k_cache: Tensor, v_cache: Tensor,
                    rope_factors: Tensor | None, layer: int) -> Tensor:
    """This rank's partial attention output [hidden, T]; writes rows idx of the layer's KV cache.

    Each run (a sequence) is its own flash-attention call over its own slot's rows of the cache, so
    a row's attention is computed as when its sequence runs alone: same query rows, same n_kv.
    """
    t, hd = step.tokens, s.head_dim
    xn = _norm(ctx, step.x, blk["attn_norm"], s.eps)
    q, k, v = _qkv(ctx, s, blk, xn, t, step.exact)
    if QK_NORMS[0] in blk:  # per head: each [hd] row of q and of k, one weight for every head
        q = _norm(ctx, q, blk["q_norm"], s.eps)
        k = _norm(ctx, k, blk["k_norm"], s.eps)
    local = layer in s.swa_layers
    if local:  # llama.cpp: rope.freq_base_swa, freq_scale_swa 1, no frequency factors
        rope = (None, hd, s.rope_mode, s.rope_ctx_orig, s.rope_base_swa, 1.0)
    else:
        rope = (rope_factors, hd, s.rope_mode, s.rope_ctx_orig, s.rope_base, s.rope_scale)
    q = ctx.rope(q, step.pos, *rope)  # contiguous [hd, n_q, T]
    k = ctx.reshape(ctx.rope(k, step.pos, *rope), s.kv_dim, t)
    kq_scale = s.attn_scale
    if s.scale_q:
        q, kq_scale = ctx.scale(q, s.attn_scale), 1.0
    k_all = ctx.set_rows(k_cache, k, step.idx)  # views of the caches, ordered after the writes
    v_all = ctx.set_rows(v_cache, v, step.idx)
    cache_row = s.kv_dim * F16_BYTES
    out = None
    for run in step.runs:
        mask = run.mask_swa if local else run.mask
        whole = (run.row0, run.rows) == (0, t)
        o_run = None
        for q0, q1, kv0, kv1 in s.segments:
            qs = q if whole and (q0, q1) == (0, s.n_q) else ctx.view(
                q, (hd, q1 - q0, run.rows), (q.nb[1], q.nb[2]), q0 * q.nb[1] + run.row0 * q.nb[2])
            at = run.kv_row0 * cache_row + kv0 * hd * F16_BYTES
            ks = ctx.view(k_all, (hd, run.n_kv, kv1 - kv0), (cache_row, hd * F16_BYTES), at)
            vs = ctx.view(v_all, (hd, run.n_kv, kv1 - kv0), (cache_row, hd * F16_BYTES), at)
            o = ctx.flash_attn(ctx.permute(qs, 0, 2, 1, 3), ks, vs, mask, kq_scale)  # [hd, heads, rows]
            o_run = o if o_run is None else ctx.concat(o_run, o, 1)
        out = o_run if out is None else ctx.concat(out, o_run, 2)
    return mul_mat(ctx, blk["wo"], ctx.reshape(out, s.q_dim, t), step.exact)


def build_mlp(ctx: Context, s: BlockSpec, blk: dict, x: Tensor, exact: bool = False) -> Tensor:
    """This rank's partial MLP output [hidden, T]: down(act(gate(xn)) * up(xn)), act silu or gelu_tanh; or its experts'."""
    if ROUTER in blk:
        return build_moe(ctx, blk, x, s.experts_used, s.eps, exact)
    xn = _norm(ctx, x, blk["mlp_norm"], s.eps)
    if "wgu" in blk:
        gate_up = mul_mat(ctx, blk["wgu"], xn, exact)  # rows gate | up -> [2 inter, T]
        act = ctx.geglu(gate_up) if s.gelu else ctx.swiglu(gate_up)  # -> [inter, T]
    else:
        gate, up = mul_mat(ctx, blk["wgate"], xn, exact), mul_mat(ctx, blk["wup"], xn, exact)
        act = ctx.geglu_split(gate, up) if s.gelu else ctx.swiglu_split(gate, up)
    return mul_mat(ctx, blk["wdown"], act, exact)


def build_post_norm(ctx: Context, s: BlockSpec, blk: dict, name: str, x: Tensor) -> Tensor:
    """A block's summed output [hidden, T] through its post-norm (gemma3), as llama.cpp's build_norm."""
    return _norm(ctx, x, blk[name], s.eps)


def build_logits(ctx: Context, s: BlockSpec, glob: dict, x: Tensor, out_rows: Tensor | None,
                 exact: bool = False) -> Tensor:
    """This rank's vocabulary slice [vocab_local, n] of the final-normed hidden states of rows out_rows (None: all)."""
    if out_rows is not None:
        x = ctx.get_rows(x, out_rows)
    out = mul_mat(ctx, glob["lm_head"], _norm(ctx, x, glob["norm"], s.eps), exact)
    if s.softcap > 0:  # llama.cpp: scale, tanh, scale
        out = ctx.scale(ctx.tanh(ctx.scale(out, 1.0 / s.softcap)), s.softcap)
    return out
