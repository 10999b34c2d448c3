"""Per-rank transformer block maths on torch: bf16 activations into the int4/int8 kernels; fp32
residual, norms, RoPE, KV cache and attention.

The hot path: every op here runs once per layer per token, and a small torch op costs
about a microsecond of Python overhead, so each block is kept to as few ops as possible.
The KV cache and attention are fp32 because torch's bf16 bmm/SDPA on AVX2 CPUs without native
bf16 dot products is 3-6x slower than fp32 at decode shapes (bench/profile_decode.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.model.blocks import EMBED, UNFUSED_PARTS
from tpi.model.rope import inverse_frequencies
from tpi.model.rows import Rows, as_rows
from tpi.quant.kernel_forms import prepare_unfused
from tpi.quant.kernels import get_backend

ACT = torch.bfloat16  # activations into the packed kernels
KV = torch.float32  # KV cache, queries and attention


def rope_table(cfg: ModelConfig, context: int) -> torch.Tensor:
    """Complex rotations [context, head_dim/2] for adjacent-pair RoPE (llama3 scaling folded in)."""
    inv = torch.from_numpy(inverse_frequencies(cfg))  # [hd/2] float64
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


class TorchLayers:
    """Computes one rank's share of attention and MLP blocks, and its logits slice."""

    name = "torch"

    slots = 1  # one KV cache: the torch backend runs one sequence at a time

    def __init__(self, cfg: ModelConfig, n_q: int, q_to_kv: tuple[int, ...], context: int, threads: int | None,
                 slots: int = 1):
        if slots != 1:
            raise TpiError(f"the torch backend runs one sequence at a time, not {slots} (--parallel); "
                           "use --backend ggml or numpy, or --parallel 1")
        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.kernels = get_backend("torch")
        self.nq, self.nkv, self.hd = n_q, max(q_to_kv) + 1, cfg.head_dim
        self.q_dim, self.kv_dim = self.nq * self.hd, self.nkv * self.hd
        g = self.nq // self.nkv
        # GQA maps contiguously when every local KV head serves the same number of local q heads;
        # otherwise (a group split across ranks) the KV heads are gathered per query head.
        self.uniform = self.nq % self.nkv == 0 and q_to_kv == tuple(i // g for i in range(self.nq))
        self.gqa = self.uniform and self.nq != self.nkv
        self.kv_index = None if self.uniform else torch.tensor(q_to_kv)
        self.context = context
        self.freqs = rope_table(cfg, context)
        # One (kv, S, hd) tensor per layer: a list index is free, a tensor select is a dispatched op.
        self.k_cache = [torch.zeros(self.nkv, context, self.hd, dtype=KV) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(self.nkv, context, self.hd, dtype=KV) for _ in range(cfg.n_layers)]
        # RMSNorm as x * (w * sqrt(d)) / hypot(|x|, sqrt(d * eps)): 4 ops, where F.rms_norm
        # dispatches 7-8 on CPU. The sqrt(d) is folded into the weights in to_runtime.
        self._norm_eps = torch.tensor(math.sqrt(cfg.hidden * cfg.rms_eps), dtype=torch.float32)
        self._norm_gain = math.sqrt(cfg.hidden)
        self.scale = 1.0 / math.sqrt(self.hd)
        self.qk_dim = self.q_dim + self.kv_dim
        self._q_buf = torch.empty(self.nkv, self.nq // self.nkv, self.hd, dtype=KV)  # decode query, scaled
        self._x_buf = torch.empty(1, cfg.hidden, dtype=ACT)  # decode: normed hidden into a kernel

    def forward_context(self):
        """Wraps a forward pass: no autograd bookkeeping on any op."""
        return torch.inference_mode()

    # ---- weights -------------------------------------------------------------------------
    def to_runtime(self, block: dict) -> dict:
        """Numpy block (QTensors + float32 vectors) -> prepared kernels and torch vectors."""
        out = prepare_unfused(self.kernels, block)  # q|k|v or gate|up whose formats differ
        for name, value in block.items():
            if name in UNFUSED_PARTS:
                continue
            if isinstance(value, np.ndarray) and value.ndim == 1:
                out[name] = torch.tensor(value, dtype=torch.float32)  # small; copied off the mmap
                if name.endswith("norm"):
                    out[name] *= self._norm_gain  # see _norm
            elif name == EMBED:
                out[name] = value  # looked up by row on the host, never multiplied
            else:
                out[name] = self.kernels.prepare(value)
        return out

    # ---- tensors at the seam ---------------------------------------------------------------
    @staticmethod
    def hidden_from_numpy(h: np.ndarray, rows: Rows | None = None) -> torch.Tensor:
        # A copy: h may be a read-only network buffer, and the residual stream is updated in place.
        return torch.from_numpy(np.array(h, dtype=np.float32))

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        return x.float().numpy()

    @staticmethod
    def add_(h: torch.Tensor, partial) -> None:
        h.add_(torch.from_numpy(partial) if isinstance(partial, np.ndarray) else partial)

    def _norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm of fp32 h with w (already times sqrt(hidden)), rounded once to bf16."""
        rms = torch.hypot(torch.linalg.vector_norm(h, dim=-1, keepdim=True), self._norm_eps)
        out = self._x_buf if h.shape[0] == 1 else torch.empty(h.shape, dtype=ACT)
        return torch.div(h * w, rms, out=out)

    # ---- blocks ----------------------------------------------------------------------------
    def attention(self, h: torch.Tensor, blk: dict, layer: int, rows: Rows | int) -> torch.Tensor:
        """h: (T, hidden) f32 of one sequence in slot 0 (Rows, or its start) -> this rank's partial
        attention output (T, hidden) bf16."""
        T = h.shape[0]
        start = _one_sequence(as_rows(rows, T))
        if T == 1 and self.kv_index is None:
            return self._decode_block(h, blk, layer, start)
        nq, nkv, hd = self.nq, self.nkv, self.hd
        end = start + T
        qkv = blk["wqkv"](self._norm(h, blk["attn_norm"]))  # (T, q_dim + 2 kv_dim)
        bias = blk.get("bqkv")
        if bias is not None:
            qkv = qkv.float() + bias
        qk = qkv[:, : self.qk_dim].float()  # (T, (nq + nkv) * hd) f32 copy
        rot = torch.view_as_complex(qk.view(T, nq + nkv, hd // 2, 2)) * self.freqs[start:end, None, :]
        qk = torch.view_as_real(rot).view(T, nq + nkv, hd)
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (nkv, S, hd)
        kc[:, start:end] = qk[:, nq:].transpose(0, 1)
        vc[:, start:end] = qkv[:, self.qk_dim :].view(T, nkv, hd).transpose(0, 1)
        o = self._prefill_attention(qk[:, :nq].transpose(0, 1), kc[:, :end], vc[:, :end], start)
        return blk["wo"](o.to(ACT))  # (T, hidden)

    def _decode_block(self, h: torch.Tensor, blk: dict, layer: int, pos: int) -> torch.Tensor:
        """The one-token path, with as few dispatched ops as it can take (each costs ~1-2 µs)."""
        nq, nkv, hd = self.nq, self.nkv, self.hd
        row = blk["wqkv"](self._norm(h, blk["attn_norm"]))[0]  # (q_dim + 2 kv_dim,)
        bias = blk.get("bqkv")
        if bias is not None:
            row = row.float() + bias
        rot = torch.view_as_complex(row[: self.qk_dim].float().view(nq + nkv, hd // 2, 2)) * self.freqs[pos]
        qk = torch.view_as_real(rot)  # (nq + nkv, hd/2, 2) f32
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (nkv, S, hd)
        kc.select(1, pos).copy_(qk[nq:].view(nkv, hd))
        vc.select(1, pos).copy_(row[self.qk_dim :].view(nkv, hd))
        q = torch.mul(qk[:nq].view(self._q_buf.shape), self.scale, out=self._q_buf)  # scale folded
        scores = torch.bmm(q, kc.narrow(1, 0, pos + 1).transpose(1, 2))  # (nkv, g, S)
        o = torch.bmm(torch.softmax(scores, dim=-1), vc.narrow(1, 0, pos + 1))  # (nkv, g, hd)
        return blk["wo"](o.view(1, self.q_dim).to(ACT))

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q: (nq, T, hd) fp32 against the cache prefix; causal within the new tokens."""
        T = q.shape[1]
        if self.kv_index is not None:  # a KV group split across ranks: gather KV per query head
            k, v = k.index_select(0, self.kv_index), v.index_select(0, self.kv_index)
        if T == 1:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa)
        elif start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        else:  # prefill continuing a cached prefix: query i sees keys up to start + i
            mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        return o.transpose(0, 1).reshape(T, self.q_dim)

    def mlp(self, h: torch.Tensor, blk: dict) -> torch.Tensor:
        """h: (T, hidden) f32 -> this rank's partial MLP output (T, hidden) bf16."""
        gu = blk["wgu"](self._norm(h, blk["mlp_norm"]))  # (T, 2 * inter_local): gate | up
        inter = gu.shape[1] // 2
        return blk["wdown"](F.silu(gu[:, :inter]) * gu[:, inter:])

    def logits(self, h: torch.Tensor, glob: dict, rows: Rows | bool) -> np.ndarray:
        """Final norm and this rank's vocabulary slice of the output rows (rows: the step's Rows, or
        all_positions): (n, vocab_local) float32 numpy."""
        if isinstance(rows, Rows):
            _one_sequence(rows)
            x = h[h.shape[0] - rows.n_outputs:]
        else:
            x = h if rows else h[-1:]
        return glob["lm_head"](self._norm(x, glob["norm"])).float().numpy()


def _one_sequence(rows: Rows) -> int:
    """The start of a step's one sequence in KV slot 0; TpiError for a batched step."""
    if rows.slots != (0,):
        raise TpiError("the torch backend runs one sequence at a time in KV slot 0; "
                       "use --backend ggml or numpy to batch sequences (--parallel)")
    return rows.starts[0]
