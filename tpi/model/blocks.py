"""The block layout: how a rank's weights are grouped, keyed and ordered.

The shard cutter (tpi.master.shard), the shard store, the model's forward pass, the memory plans
and the converted-model reader (tpi.formats.native) all speak this layout:

- A layer has two blocks, attention ("L{i}.attn") and MLP ("L{i}.mlp"); after the last layer
  comes "globals" (final norm, this rank's lm_head rows, and on rank 0 the embedding table).
- A block is a flat dict. q|k|v fuse into "wqkv" and gate|up into "wgu" (rows stacked in the order
  of FUSED) where the parts share one fmt and K; otherwise they stay apart under UNFUSED's names
  (a Q4_K_M file keeps attn_v in Q6_K on some layers). The q|k|v biases always fuse into "bqkv".
- Norm vectors are whole on every rank: attn_norm, mlp_norm, the per-head q_norm / k_norm and the
  post-norms (applied to a block's output after the ranks' partial sums are added up).
"""
from __future__ import annotations

GLOBALS = "globals"
EMBED = "embed"  # rank 0's embedding table in its globals block: looked up by row, never multiplied

# A fused matrix -> its parts, in row order; the parts' names are also their keys when kept apart.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "wgu": ("wgate", "wup")}
UNFUSED = {"wqkv": FUSED["wqkv"], "wgu": FUSED["wgu"]}  # the matrices that may stay apart
UNFUSED_PARTS = frozenset(p for parts in UNFUSED.values() for p in parts)

# Canonical tensor name (tpi.model.config.LAYER_TENSORS) -> its name inside a block, where they differ.
BLOCK_NAME = {"w_gate": "wgate", "w_up": "wup", "w_down": "wdown"}
ATTN_TENSORS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm", "wo", "post_attn_norm")
MLP_TENSORS = ("mlp_norm", "w_gate", "w_up", "w_down", "post_mlp_norm")
QK_NORMS = ("q_norm", "k_norm")  # [head_dim], the same on every rank (qk_norm families)
# The norm a block's summed output goes through before the residual add (post_norms families).
POST_ATTN_NORM, POST_MLP_NORM = "post_attn_norm", "post_mlp_norm"


def attn_key(layer: int) -> str:
    return f"L{layer}.attn"


def mlp_key(layer: int) -> str:
    return f"L{layer}.mlp"


def layer_keys(n_layers: int) -> list[tuple[str, str]]:
    """(attention key, MLP key) of every layer, in order."""
    return [(attn_key(i), mlp_key(i)) for i in range(n_layers)]


def block_keys(n_layers: int) -> list[str]:
    """Every block key in the execution order of a forward pass."""
    return [k for pair in layer_keys(n_layers) for k in pair] + [GLOBALS]


def block_of(short: str, layer: int) -> str:
    """The key of the block holding a layer's canonical tensor `short`."""
    if short in ATTN_TENSORS:
        return attn_key(layer)
    assert short in MLP_TENSORS, short
    return mlp_key(layer)


def part_rows(fused: str, part: str, q_dim: int, kv_dim: int, inter: int) -> tuple[int, int]:
    """Rows [start, stop) of `part` inside the fused matrix `fused` (dims as the block holds them)."""
    widths = {"wqkv": (q_dim, kv_dim, kv_dim), "bqkv": (q_dim, kv_dim, kv_dim), "wgu": (inter, inter)}[fused]
    i = FUSED[fused].index(part)
    start = sum(widths[:i])
    return start, start + widths[i]


def fused_name(block_name: str) -> str | None:
    """The fused matrix a part belongs to ("wk" -> "wqkv"), or None for a tensor never fused."""
    return next((f for f, parts in FUSED.items() if block_name in parts), None)
