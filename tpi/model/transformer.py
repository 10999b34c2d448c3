"""One rank's forward pass. Plain maths over blocks; it knows a Communicator, never a socket.

Every rank holds the full residual stream h (T, hidden) in fp32 and identical copies of the
norms. After the attention output projection and after the MLP down projection the ranks'
partial outputs are summed (allreduce), so h stays bit-identical on every rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tpi.model.blocks import GLOBALS, POST_ATTN_NORM, POST_MLP_NORM, layer_keys
from tpi.model.config import ModelConfig
from tpi.model.rows import KVSlots, Rows, as_rows
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
        self.kv = KVSlots(getattr(layers, "slots", 1), layers.context)  # what each KV slot holds

    def forward(self, h_np: np.ndarray, rows: Rows | int, all_positions: bool = False) -> np.ndarray:
        """h_np: (T, hidden) float32 embeddings of a step's rows -> (outputs, vocab_local) logits.

        rows: the step's Rows (tpi.model.rows), or the start position of one sequence in KV slot 0
        whose last row (every row with all_positions) returns logits.

        Exact rows (rows.exact, a verify pass of speculative decoding): every row computed exactly
        as a one-row step at its position computes it. Kernels pick their algorithm by row count, so
        a batched row can round differently; layers that compute exact rows in one pass say so
        (`exact_rows`, ggml: tpi.model.ggml_exact), the others run each block row by row. Either way
        the step makes a plain step's allreduces, so ranks of different backends stay in step.
        """
        rows = as_rows(rows, np.shape(h_np)[0], all_positions)
        self.kv.admit(rows)  # ShapeError before this rank computes a step it cannot
        t0 = time.perf_counter()
        L = self.layers
        by_row = rows.exact and rows.tokens > 1 and not getattr(L, "exact_rows", False)
        with L.forward_context():
            h = L.hidden_from_numpy(h_np, rows)
            logits, ar = self._rows_one_by_one(h, rows) if by_row else self._layers(h, rows)
        self.kv.advance(rows)
        st = self.stats
        st.allreduce_s += ar
        st.compute_s += time.perf_counter() - t0 - ar
        st.passes += 1
        return logits

    def truncate(self, slot: int, keep: int) -> None:
        """Forget positions keep.. of a KV slot (a rolled-back speculation, a freed slot)."""
        self.kv.truncate(slot, keep)

    def _layers(self, h, rows: Rows):
        L, W = self.layers, self.weights
        whole = getattr(L, "forward_all", None)  # ggml: a group of one may run the step as one graph
        if whole is not None and self.comm.world == 1 and isinstance(W, ResidentWeights):
            logits = whole(h, W.blocks, rows)
            if logits is not None:
                return logits, 0.0
        ar = 0.0
        for i, (ka, km) in enumerate(self._keys):
            # released before the allreduce so the loader can refill the window meanwhile; a post-norm
            # vector is a prepared copy, not file pages, so it stays valid
            blk = W.get(ka)
            part = L.attention(h, blk, i, rows)
            W.release(ka)
            ar += self._sum_into(h, part, blk, POST_ATTN_NORM)
            blk = W.get(km)
            part = L.mlp(h, blk)
            W.release(km)
            ar += self._sum_into(h, part, blk, POST_MLP_NORM)
        logits = L.logits(h, W.get(GLOBALS), rows)
        W.release(GLOBALS)
        return logits, ar

    def _rows_one_by_one(self, h, rows: Rows):
        """Exact rows on layers without them: each block runs once per row (its one-row path), in order
        (a row attends over the rows before it), and the rows' partial sums meet in one allreduce."""
        L, W = self.layers, self.weights
        singles = [Rows.sequence(int(p), 1, slot=int(s)) for p, s in zip(rows.positions, rows.row_slots)]

        def per_row(fn, args):
            parts = [np.asarray(L.to_numpy(fn(h[t:t + 1], *args(t))), dtype=np.float32) for t in range(len(singles))]
            return L.hidden_from_numpy(np.concatenate(parts))

        ar = 0.0
        for i, (ka, km) in enumerate(self._keys):
            blk = W.get(ka)
            part = per_row(L.attention, lambda t: (blk, i, singles[t]))
            W.release(ka)
            ar += self._sum_into(h, part, blk, POST_ATTN_NORM)
            blk = W.get(km)
            part = per_row(L.mlp, lambda t: (blk,))
            W.release(km)
            ar += self._sum_into(h, part, blk, POST_MLP_NORM)
        glob = W.get(GLOBALS)
        logits = [np.asarray(L.logits(h[t:t + 1], glob, singles[t])) for t in rows.output_rows]
        W.release(GLOBALS)
        return np.concatenate(logits), ar

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
