"""One rank's forward pass. Plain maths over blocks; it knows a Communicator, never a socket.

Every rank holds the full residual stream h (T, hidden) in fp32 and identical copies of the
norms. After the attention output projection and after the MLP down projection the ranks'
partial outputs are summed (allreduce), so h stays bit-identical on every rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tpi.model.blocks import GLOBALS, layer_keys
from tpi.model.config import ModelConfig


class NullCommunicator:
    """The communicator of a group of one."""

    rank, world = 0, 1

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def gather(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]


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

    def __init__(self, cfg: ModelConfig, layers, weights, comm=None):
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
        row can round differently; layers that can compute exact rows in one pass say so
        (`exact_rows`, ggml: tpi.model.ggml_exact), the others run each block row by row.
        """
        t0 = time.perf_counter()
        L = self.layers
        exact = exact and h_np.shape[0] > 1
        with L.forward_context():
            if exact and not getattr(L, "exact_rows", False):
                logits, ar = self._rows_one_by_one(h_np, start, all_positions)
            else:
                logits, ar = self._layers(L.hidden_from_numpy(h_np), start, all_positions, exact)
        st = self.stats
        st.allreduce_s += ar
        st.compute_s += time.perf_counter() - t0 - ar
        st.passes += 1
        return logits

    def _layers(self, h, start: int, all_positions: bool, exact: bool = False):
        L, W = self.layers, self.weights
        rows = {"exact": True} if exact else {}  # only layers with exact_rows see the flag
        whole = getattr(L, "forward_all", None)  # ggml: a group of one may run the step as one graph
        if whole is not None and self.comm.world == 1 and isinstance(W, ResidentWeights):
            logits = whole(h, W.blocks, start, all_positions, **rows)
            if logits is not None:
                return logits, 0.0
        ar = 0.0
        for i, (ka, km) in enumerate(self._keys):
            part = L.attention(h, W.get(ka), i, start, **rows)
            W.release(ka)
            ar += self._sum_into(h, part)
            part = L.mlp(h, W.get(km), **rows)
            W.release(km)
            ar += self._sum_into(h, part)
        logits = L.logits(h, W.get(GLOBALS), all_positions, **rows)
        W.release(GLOBALS)
        return logits, ar

    def _rows_one_by_one(self, h_np: np.ndarray, start: int, all_positions: bool):
        """Exact rows on layers without them: each block runs once per row (its one-token path), and
        the rows' partial sums still meet in one allreduce per block."""
        L, W = self.layers, self.weights
        h = np.array(h_np, dtype=np.float32)  # (T, hidden), the residual as numpy between blocks

        def per_row(fn, *args) -> np.ndarray:
            return np.concatenate([np.array(L.to_numpy(fn(L.hidden_from_numpy(h[t:t + 1]), *args(t))))
                                   for t in range(h.shape[0])])

        ar = 0.0
        for i, (ka, km) in enumerate(self._keys):
            blk = W.get(ka)
            ar += self._sum_into(h, per_row(L.attention, lambda t: (blk, i, start + t)), _add_numpy)
            W.release(ka)
            blk = W.get(km)
            ar += self._sum_into(h, per_row(L.mlp, lambda t: (blk,)), _add_numpy)
            W.release(km)
        glob = W.get(GLOBALS)
        logits = per_row(L.logits, lambda t: (glob, False))
        W.release(GLOBALS)
        return (logits if all_positions else logits[-1:]), ar

    def _sum_into(self, h, part, add=None) -> float:
        """Add the group's sum of every rank's `part` to the residual h; returns allreduce seconds."""
        add = add or self.layers.add_
        if self.comm.world == 1:
            add(h, part)
            return 0.0
        t = time.perf_counter()
        total = self.comm.allreduce(part if isinstance(part, np.ndarray) else self.layers.to_numpy(part))
        spent = time.perf_counter() - t
        add(h, total)
        return spent


def _add_numpy(h: np.ndarray, part: np.ndarray) -> None:
    np.add(h, part, out=h)
