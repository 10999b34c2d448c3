"""One rank's forward pass. Plain maths over blocks; it knows a Communicator, never a socket.

Every rank holds the full residual stream h (T, hidden) in fp32 and identical copies of the
norms. After the attention output projection and after the MLP down projection the ranks'
partial outputs are summed (allreduce), so h stays bit-identical on every rank.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from tpi.model.blocks import GLOBALS, POST_ATTN_NORM, POST_MLP_NORM, layer_keys
from tpi.model.config import ModelConfig
from tpi.transport.comm import Communicator, NullCommunicator


class ResidentWeights:
    """Every block prepared and held in memory (the all-pinned case)."""

    def __init__(self, blocks: dict[str, dict]):
        self.blocks = blocks

    def get(self, key: str) -> dict:
        return self.blocks[key]

    def release(self, key: str) -> None:
        pass

    def token_stats(self) -> dict:
        return {}

    def close(self) -> None:
        self.blocks = {}


@dataclass
class ForwardStats:
    """Time split of forward passes on one rank, accumulated until reset."""

    compute_s: float = 0.0
    allreduce_s: float = 0.0
    passes: int = 0
    extra: dict = field(default_factory=dict)

    def reset(self) -> "ForwardStats":
        done = ForwardStats(self.compute_s, self.allreduce_s, self.passes, self.extra)
        self.compute_s = self.allreduce_s = 0.0
        self.passes = 0
        self.extra = {}
        return done


class Transformer:
    """A rank's share of the model: layers -> partial sums -> allreduce -> logits slice."""

    def __init__(self, cfg: ModelConfig, layers, weights, comm: Communicator | None = None):
        self.cfg = cfg
        self.layers = layers  # TorchLayers / NumpyLayers: the per-block maths
        self.weights = weights  # get(key) -> prepared block; release(key)
        self.comm = comm or NullCommunicator()
        self.stats = ForwardStats()
        self._keys = layer_keys(cfg.n_layers)

    def forward(self, h_np: np.ndarray, start: int, all_positions: bool = False, exact: bool = False) -> np.ndarray:
        """h_np: (T, hidden) float32 embeddings at positions start.. -> (T or 1, vocab_local) logits.

        exact (a verify pass of speculative decoding): every row computed exactly as a one-token
        forward at its position computes it. Kernels pick their algorithm by row count, so a batched
        row can round differently; layers that can compute exact rows in one pass have `exact_rows`
        (ggml: tpi.model.ggml_exact), the others run each block row by row. Either way a pass makes
        the same allreduces as a plain one, so ranks of different backends stay in step.
        """
        t0 = time.perf_counter()
        L = self.layers
        exact = exact and h_np.shape[0] > 1
        rows = getattr(L, "exact_rows", None)
        with L.forward_context(), (rows() if exact and rows else contextlib.nullcontext()):
            if exact and rows is None:
                logits, ar = self._rows_one_by_one(L.hidden_from_numpy(h_np), start, all_positions)
            else:
                logits, ar = self._layers(L.hidden_from_numpy(h_np), start, all_positions)
        st = self.stats
        st.allreduce_s += ar
        st.compute_s += time.perf_counter() - t0 - ar
        st.passes += 1
        return logits

    def _layers(self, h, start: int, all_positions: bool):
        L, W = self.layers, self.weights
        whole = getattr(L, "forward_all", None)  # ggml: a group of one may run the step as one graph
        if whole is not None and self.comm.world == 1 and isinstance(W, ResidentWeights):
            logits = whole(h, W.blocks, start, all_positions)
            if logits is not None:
                return logits, 0.0
        ar = 0.0
        for i, (ka, km) in enumerate(self._keys):
            # released before the allreduce so the loader can refill the window meanwhile; a post-norm
            # vector is a prepared copy, not file pages, so it stays valid
            blk = W.get(ka)
            part = L.attention(h, blk, i, start)
            W.release(ka)
            ar += self._sum_into(h, part, blk, POST_ATTN_NORM)
            blk = W.get(km)
            part = L.mlp(h, blk)
            W.release(km)
            ar += self._sum_into(h, part, blk, POST_MLP_NORM)
        logits = L.logits(h, W.get(GLOBALS), all_positions)
        W.release(GLOBALS)
        return logits, ar

    def _rows_one_by_one(self, h, start: int, all_positions: bool):
        """Exact rows on layers without them: each block runs once per row (its one-token path), in
        order (row t + 1 attends over row t's keys), and the rows' partial sums meet in one allreduce."""
        L, W = self.layers, self.weights

        def per_row(fn, *args) -> object:
            parts = [L.to_numpy(fn(h[t:t + 1], *args(t))) for t in range(h.shape[0])]
            return L.hidden_from_numpy(np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]))

        ar = 0.0
        for i, (ka, km) in enumerate(self._keys):
            blk = W.get(ka)
            part = per_row(L.attention, lambda t: (blk, i, start + t))
            W.release(ka)
            ar += self._sum_into(h, part, blk, POST_ATTN_NORM)
            blk = W.get(km)
            part = per_row(L.mlp, lambda t: (blk,))
            W.release(km)
            ar += self._sum_into(h, part, blk, POST_MLP_NORM)
        glob = W.get(GLOBALS)
        rows = [np.asarray(L.logits(h[t:t + 1], glob, False)) for t in range(h.shape[0])]
        W.release(GLOBALS)
        return (np.concatenate(rows) if all_positions else rows[-1]), ar

    def _sum_into(self, h, part, blk, post_norm: str) -> float:
        """Add the group's sum of every rank's `part` to the residual h; returns allreduce seconds.

        A post-norm (gemma3) is not linear, so it applies to the sum, on every rank alike.
        """
        L, spent = self.layers, 0.0
        if self.comm.world == 1:
            total = part
        else:
            t = time.perf_counter()
            total = self.comm.allreduce(L.to_numpy(part))
            spent = time.perf_counter() - t
        if post_norm in blk:
            total = L.post_norm(total, blk, post_norm)
        L.add_(h, total)
        return spent
