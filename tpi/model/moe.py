"""Mixture of experts (qwen3moe): the router's maths, the expert tensors' layout, a rank's share.

Every layer's MLP is E experts, each a SwiGLU MLP of expert_ff columns. A router [E, hidden] (F32)
scores them per token and the top k run, as llama.cpp's build_moe_ffn (softmax gating, norm_w):
  probs   = softmax(router . xn)                       over all E experts, F32
  chosen  = the k largest probs, largest first
  weights = probs[chosen] / max(sum of them, 6.1035e-5)
  out     = sum over chosen (in that order) of weight * down(silu(gate xn) * up xn)
The ggml layers compute exactly that in the graph (tpi.model.moe_ggml); `route` below is the numpy
twin for the numpy backend.

Expert tensors keep the GGUF's stacking as 2-D row stacks: gate / up [E * ff, hidden] (expert e is
rows e * ff ..), down [E * hidden, ff] (rows e * hidden ..). A rank holds experts [e0, e1) at
columns [f0, f1) of each (ExpertShare): placement "split" (A) keeps every expert at a slice of ff,
placement "whole" (B) a range of whole experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


ROUTER, GATE_EXPS, UP_EXPS, DOWN_EXPS = "router", "wgate_exps", "wup_exps", "wdown_exps"
EXPERT_TENSORS = (GATE_EXPS, UP_EXPS, DOWN_EXPS)
# Canonical per-layer names of a MoE MLP (tpi.model.config.layer_name) -> the name inside a block.
MOE_CANONICAL = {"router": ROUTER, "w_gate_exps": GATE_EXPS, "w_up_exps": UP_EXPS, "w_down_exps": DOWN_EXPS}
WEIGHT_SUM_FLOOR = 6.103515625e-5  # llama.cpp clamps the chosen weights' sum to the smallest normal F16
SPLIT, WHOLE = "split", "whole"  # placements: every expert's ff split across ranks / whole experts per rank
PLACEMENTS = (SPLIT, WHOLE)


@dataclass(frozen=True)
class ExpertShare:
    """The experts a rank holds and the columns of each: experts [e0, e1) x ff columns [f0, f1)."""

    n_experts: int  # in the model
    expert_ff: int  # columns of a whole expert
    experts: range
    ff: range

    def __post_init__(self) -> None:
        assert 0 <= self.experts.start < self.experts.stop <= self.n_experts, self.experts
        assert 0 <= self.ff.start < self.ff.stop <= self.expert_ff, self.ff

    @classmethod
    def whole_model(cls, n_experts: int, expert_ff: int) -> "ExpertShare":
        return cls(n_experts, expert_ff, range(n_experts), range(expert_ff))

    @property
    def n_local(self) -> int:
        return len(self.experts)

    @property
    def ff_local(self) -> int:
        return len(self.ff)

    @property
    def all_experts(self) -> bool:
        """Every expert is here (one device, or placement A): routing needs no filtering."""
        return self.n_local == self.n_experts

    def local_slots(self, chosen: np.ndarray) -> list[tuple[int, int]]:
        """(slot, local expert) of a token's chosen experts that live here, in slot order."""
        e0, e1 = self.experts.start, self.experts.stop
        return [(i, int(e) - e0) for i, e in enumerate(chosen) if e0 <= e < e1]


def softmax_f32(logits: np.ndarray) -> np.ndarray:
    """Softmax along the last axis in float32, max subtracted first (as ggml's soft_max)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return (e / e.sum(axis=-1, dtype=np.float64, keepdims=True).astype(np.float32)).astype(np.float32)


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, E) -> chosen experts (T, k) int64, largest first, and their weights (T, k) f32."""
    probs = softmax_f32(np.asarray(logits, dtype=np.float32))
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    total = np.maximum(weights.sum(axis=-1, keepdims=True), np.float32(WEIGHT_SUM_FLOOR))
    return chosen, (weights / total).astype(np.float32)


def expert_rows(share: ExpertShare, hidden: int) -> dict[str, tuple[int, int]]:
    """Rows per expert and columns of each expert tensor on a rank: name -> (rows per expert, K)."""
    return {GATE_EXPS: (share.ff_local, hidden), UP_EXPS: (share.ff_local, hidden), DOWN_EXPS: (hidden, share.ff_local)}


def expert_slab_bytes(block: dict, share: ExpertShare) -> int:
    """Bytes of one expert's gate + up + down on this rank (what streaming one expert reads)."""
    return sum(block[name].nbytes // share.n_local for name in EXPERT_TENSORS)
