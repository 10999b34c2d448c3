"""Per-rank transformer block maths on numpy alone: float32 activations, residual, norms and RoPE.

The torch-free twin of tpi.model.layers_torch.TorchLayers (same interface, same semantics), for devices
where torch cannot be installed. Nothing on this path imports torch: the linear kernels come from
the numpy backend of tpi.quant.kernels, everything else is a handful of vectorised numpy ops.
"""
from __future__ import annotations

import contextlib

import numpy as np

from tpi.model.config import ModelConfig
from tpi.model.blocks import EMBED, UNFUSED_PARTS
from tpi.model.moe import ROUTER, ExpertShare
from tpi.model.moe_numpy import moe_mlp, prepare_moe
from tpi.model.rows import Rows, as_rows, kv_zeros
from tpi.quant.kernel_forms import prepare_unfused
from tpi.quant.kernels import get_backend
from tpi.model.rope import inverse_frequencies

ACT = np.float32


def rope_cos_sin(cfg: ModelConfig, context: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [context, head_dim/2] float32 for adjacent-pair RoPE (angles computed in float64);
    local: a sliding-window layer's (its own base, unscaled)."""
    angles = np.outer(np.arange(context, dtype=np.float64), inverse_frequencies(cfg, local))
    return np.cos(angles).astype(ACT), np.sin(angles).astype(ACT)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Gemma's gate), float32."""
    inner = x * (1.0 + 0.044715 * x * x)
    inner *= ACT(np.sqrt(2.0 / np.pi))
    return 0.5 * x * (1.0 + np.tanh(inner))


def limit_blas_threads(threads: int | None) -> None:
    """Cap numpy's BLAS threads when threadpoolctl is installed; numpy alone cannot change them."""
    if not threads:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: phones run with numpy's default (usually one thread per core)
        return
    threadpool_limits(limits=threads, user_api="blas")


class NumpyLayers:
    """Computes one rank's share of attention and MLP blocks, and its logits slice, in numpy."""

    name = "numpy"

    def __init__(self, cfg: ModelConfig, n_q: int, q_to_kv: tuple[int, ...], context: int, threads: int | None,
                 slots: int = 1, experts: ExpertShare | None = None):
        limit_blas_threads(threads)
        self.cfg = cfg
        self.experts = experts or (ExpertShare.whole_model(cfg.n_experts, cfg.expert_ff) if cfg.is_moe else None)
        self.kernels = get_backend("numpy")
        self.nq, self.nkv, self.hd = n_q, max(q_to_kv) + 1, cfg.head_dim
        self.q_dim, self.kv_dim = self.nq * self.hd, self.nkv * self.hd
        g = self.nq // self.nkv
        # Uniform GQA: local q head i uses local KV head i // g, so q reshapes to (nkv, g * T, hd)
        # and each KV head meets its whole group in one batched matmul. A KV group split across
        # ranks maps unevenly; then the KV heads are gathered per query head (group of one).
        uniform = self.nq % self.nkv == 0 and tuple(q_to_kv) == tuple(i // g for i in range(self.nq))
        self.kv_index = None if uniform else np.asarray(q_to_kv, dtype=np.intp)
        self.group = g if uniform else 1
        self.context, self.slots = context, slots
        self.rope = {False: rope_cos_sin(cfg, context)}  # local layer? -> (cos, sin)
        if cfg.sliding_window and cfg.swa_layers:
            self.rope[True] = rope_cos_sin(cfg, context, local=True)
        self.k_cache = kv_zeros((slots, cfg.n_layers, self.nkv, context, self.hd), ACT)  # (slots, L, kv, S, hd)
        self.v_cache = kv_zeros(self.k_cache.shape, ACT)  # pages are only touched once written
        self.eps = cfg.rms_eps
        self.scale = ACT(cfg.scale)

    # ---- weights -------------------------------------------------------------------------
    @staticmethod
    def forward_context():
        """Nothing to switch off around a numpy forward pass."""
        return contextlib.nullcontext()

    def to_runtime(self, block: dict) -> dict:
        """Numpy block (QTensors + float32 vectors) -> prepared numpy kernels and float32 vectors."""
        if ROUTER in block:
            return prepare_moe(self.kernels, block, self.experts, self.cfg.hidden)
        out = prepare_unfused(self.kernels, block)  # q|k|v or gate|up whose formats differ
        for name, value in block.items():
            if name in UNFUSED_PARTS:
                continue
            if isinstance(value, np.ndarray) and value.ndim == 1:
                out[name] = np.array(value, dtype=ACT)  # small; copied off the mmap
            elif name == EMBED:
                out[name] = value  # looked up by row on the host, never multiplied
            else:
                out[name] = self.kernels.prepare(value)
        return out

    # ---- tensors at the seam ---------------------------------------------------------------
    @staticmethod
    def hidden_from_numpy(h: np.ndarray, rows: Rows | None = None) -> np.ndarray:
        # A copy: h may be a read-only network buffer, and the residual stream is updated in place.
        return np.array(h, dtype=ACT)

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def add_(h: np.ndarray, partial: np.ndarray) -> None:
        h += partial

    def _norm(self, h: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm over the last axis of (..., d) times w [d]."""
        ms = np.einsum("...i,...i->...", h, h) / h.shape[-1]  # mean square without a squared copy
        return h * (1.0 / np.sqrt(ms + self.eps)).astype(ACT)[..., None] * w

    def post_norm(self, total: np.ndarray, blk: dict, name: str) -> np.ndarray:
        """A block's output summed over the ranks, (T, hidden), through the block's post-norm (gemma3)."""
        return self._norm(total, blk[name])

    def _rope(self, x: np.ndarray, pos: np.ndarray, local: bool) -> np.ndarray:
        """x: (T, heads, hd) f32 at positions pos (T,), pairs (x[2j], x[2j+1]) -> rotated copy, same shape."""
        T, heads, hd = x.shape
        pairs = x.reshape(T, heads, hd // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        cos, sin = self.rope[local]
        cos, sin = cos[pos, None, :], sin[pos, None, :]  # (T, 1, hd/2)
        out = np.empty_like(pairs)
        out[..., 0] = x0 * cos - x1 * sin
        out[..., 1] = x0 * sin + x1 * cos
        return out.reshape(T, heads, hd)

    # ---- blocks ----------------------------------------------------------------------------
    def attention(self, h: np.ndarray, blk: dict, layer: int, rows: Rows | int) -> np.ndarray:
        """h: (T, hidden) f32 at rows (or one sequence's start position) -> this rank's partial attention
        output (T, hidden) f32. Each run of rows attends only to its own KV slot, up to its positions."""
        T = h.shape[0]
        rows = as_rows(rows, T)
        rows.check(self.slots, self.context)
        nq, nkv, hd = self.nq, self.nkv, self.hd
        qkv = blk["wqkv"](self._norm(h, blk["attn_norm"]))  # (T, q_dim + 2 kv_dim)
        bias = blk.get("bqkv")
        if bias is not None:
            qkv += bias
        qk = qkv[:, : self.q_dim + self.kv_dim].reshape(T, nq + nkv, hd)  # (T, nq + nkv, hd)
        if "q_norm" in blk:  # per-head RMSNorm over hd, before RoPE
            qk = np.concatenate([self._norm(qk[:, :nq], blk["q_norm"]), self._norm(qk[:, nq:], blk["k_norm"])], 1)
        local = self.cfg.is_local(layer)
        qk = self._rope(qk, rows.positions, local)
        v_new = qkv[:, self.q_dim + self.kv_dim :].reshape(T, nkv, hd)
        o = np.empty((T, self.q_dim), ACT)
        for slot, start, count, first in zip(rows.slots, rows.starts, rows.counts, rows.first_rows):
            run, end = slice(first, first + count), start + count
            kc, vc = self.k_cache[slot, layer], self.v_cache[slot, layer]  # (nkv, S, hd)
            kc[:, start:end] = qk[run, nq:].transpose(1, 0, 2)
            vc[:, start:end] = v_new[run].transpose(1, 0, 2)
            o[run] = self._attend(qk[run, :nq], kc, vc, start, end, local)
        return blk["wo"](o)  # (T, hidden)

    def _attend(self, q: np.ndarray, kc: np.ndarray, vc: np.ndarray, start: int, end: int, local: bool) -> np.ndarray:
        """One run's queries q (T, nq, hd) at start..end over its slot's caches (nkv, S, hd) -> (T, q_dim)."""
        T, g, hd = q.shape[0], self.group, self.hd
        first = max(0, start + 1 - self.cfg.sliding_window) if local else 0  # no query sees keys before it
        k, v = kc[:, first:end], vc[:, first:end]  # (nkv, end - first, hd) views of the cache
        if self.kv_index is not None:
            k, v = k[self.kv_index], v[self.kv_index]  # (nq, end, hd)
        heads = k.shape[0]
        q = (q.transpose(1, 0, 2) * self.scale).reshape(heads, g * T, hd)  # (kv, g*T, hd)
        scores = np.matmul(q, k.transpose(0, 2, 1))  # (kv, g*T, end - first)
        if T > 1:  # query i sits at position start + i and sees keys up to it (local: window - 1 before it)
            back = np.arange(start, end)[:, None] - np.arange(first, end)[None, :]  # (T, end - first)
            hidden = (back < 0) | (local & (back >= self.cfg.sliding_window))
            scores = scores.reshape(heads, g, T, end - first)
            scores[:, :, hidden] = -np.inf
            scores = scores.reshape(heads, g * T, end - first)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        o = np.matmul(scores, v)  # (kv, g*T, hd)
        return o.reshape(self.nq, T, hd).transpose(1, 0, 2).reshape(T, self.q_dim)

    def mlp(self, h: np.ndarray, blk: dict) -> np.ndarray:
        """h: (T, hidden) f32 -> this rank's partial MLP output (T, hidden) f32."""
        if ROUTER in blk:
            return moe_mlp(self._norm(h, blk["mlp_norm"]), blk, self.experts, self.cfg.n_experts_used)
        gu = blk["wgu"](self._norm(h, blk["mlp_norm"]))  # (T, 2 * inter_local): gate | up
        inter = gu.shape[1] // 2
        gate, up = gu[:, :inter], gu[:, inter:]
        if self.cfg.family.activation == "gelu_tanh":
            act = gelu_tanh(gate)
        else:  # silu(x) = x * sigmoid(x), sigmoid via tanh: no overflow warning for large negative x
            act = np.tanh(gate * 0.5)
            act += 1.0
            act *= 0.5
            act *= gate
        act *= up
        return blk["wdown"](act)

    def logits(self, h: np.ndarray, glob: dict, rows: Rows | bool) -> np.ndarray:
        """Final norm and this rank's vocabulary slice of the output rows (rows: the step's Rows, or
        all_positions of one sequence): (n, vocab_local) float32 numpy."""
        if isinstance(rows, Rows):
            x = h[rows.output_rows] if rows.n_outputs < h.shape[0] else h
        else:
            x = h if rows else h[-1:]
        out = np.asarray(glob["lm_head"](self._norm(x, glob["norm"])), dtype=ACT)
        c = self.cfg.final_softcap
        return ACT(c) * np.tanh(out / ACT(c)) if c > 0 else out
