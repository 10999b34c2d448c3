"""Exact rows on ggml: a pass over T rows whose every row is, bit for bit, a one-row (decode) pass.

A verify pass of speculative decoding runs k+1 decode positions in one forward; greedy output stays
token for token plain decoding's only if each row computes what the one-token step would. ggml
chooses kernels by row count, so a plain batched pass does not (ggml 0.25.3, ggml-cpu; read in its
sources and measured against row-by-row calls; tests/test_ggml_exact.py holds F16 and Q4_K_M to it):

- mul_mat on F32 / F16 / BF16 and unrepacked IQ4_NL weights goes to llamafile's tinyBLAS at 2 rows
  or more (ggml-cpu.c, llamafile/sgemm.cpp), which sums in another order than ggml's vec_dot.
  Q4_0, Q5_0 and Q8_0 also go there but agree bit for bit (the same per-block fma order).
- mul_mat on K-quants (Q2_K .. Q6_K) goes to the tiled kernel at 8 rows or more
  (tiled/tiled.cpp, ggml_tiled_min_batch).
- Q4_K repacked for AVX2 (CPU_REPACK) runs each group of 4 rows through a gemm, the rest through
  the gemv the one-row case uses (repack.cpp); repacked Q4_0 and IQ4_NL agree at every row count.
- mul_mat_id (MoE experts) runs one vec_dot per (token, chosen expert) at any row count, and
  repacked experts one gemv per token (ggml-cpu.c, repack.cpp forward_mul_mat_id): no tinyBLAS and
  no repack gemm. Only the tiled kernel applies, per expert: to a K-quant expert that 8 or more of
  the call's tokens name (tiled.cpp, ggml_compute_forward_mul_mat_id_tiled). A token names an
  expert at most once, so calls of at most 7 tokens keep every row's bits.
- flash_attn_ext with ONE query row over n_kv >= 512 cache rows splits the rows across threads and
  reduces the partials (ops.cpp, use_split_kv_path); more query rows run each in one chunk. Also
  the decode step of position p attends over its own bucket n_kv(p) (256-row buckets), and with a
  split the bucket sets the chunk bounds.

So an exact pass splits each mul_mat into row chunks that take the one-row kernel (`rows_per_call`;
mul_mat_id: `expert_rows_per_call`, the MoE router's F32 mul_mat one row a call),
and runs flash attention once per row over that row's own n_kv, as a decode would (one attention
run per row: tpi.model.ggml_steps.step_shape). Everything else (norms, RoPE, set_rows, SwiGLU,
adds) is computed row by row anyway. Weights are still read once per chunk, not once per row,
except for the float types.
"""
from __future__ import annotations

from tpi.quant.ggml_graph import Context, Tensor
from tpi.quant.ggml_lib import TYPE_NAMES

SGEMM_DIFFERS = frozenset({"F32", "F16", "BF16", "IQ4_NL"})  # tinyBLAS at >= 2 rows (IQ4_NL unrepacked)
TILED = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})  # the tiled kernel at >= 8 rows
TILED_MIN_ROWS = 8
REPACK_GEMM_ROWS = {"Q4_K": 4}  # repacked types whose gemm takes groups of this many rows


def rows_per_call(type_name: str, repacked: bool) -> int | None:
    """Most rows one mul_mat may carry and still give every row the one-row kernel's bits (None: any)."""
    if repacked:
        gemm = REPACK_GEMM_ROWS.get(type_name)
        return None if gemm is None else gemm - 1
    if type_name in SGEMM_DIFFERS:
        return 1
    if type_name in TILED:
        return TILED_MIN_ROWS - 1
    return None


def expert_rows_per_call(type_name: str, repacked: bool) -> int | None:
    """Most tokens one mul_mat_id may carry and still give every row the one-row kernel's bits (None: any)."""
    return TILED_MIN_ROWS - 1 if type_name in TILED and not repacked else None


def weight_rows_per_call(w) -> int | None:
    """rows_per_call of a GgmlWeight."""
    return rows_per_call(TYPE_NAMES.get(w.tensor.type, "?"), w.repacked)


def mul_mat(ctx: Context, w, x: Tensor, exact: bool) -> Tensor:
    """w [N, K] (a GgmlWeight) times x [K, T] -> [N, T]; exact: in row chunks that keep one-row bits."""
    t = x.ne[1]
    chunk = weight_rows_per_call(w) if exact else None
    if chunk is None or t <= chunk:
        return ctx.mul_mat(w.tensor, x)
    out = None
    for r0 in range(0, t, chunk):
        n = min(chunk, t - r0)
        part = ctx.mul_mat(w.tensor, ctx.view(x, (x.ne[0], n), (x.nb[1],), r0 * x.nb[1]))
        out = part if out is None else ctx.concat(out, part, 1)
    return out



def mul_mat_id(ctx: Context, w, x: Tensor, ids: Tensor, exact: bool) -> Tensor:
    """Experts w [K, N, E] (a GgmlWeight) times x [K, 1 or slots, T] at ids I32 [slots, T] -> [N, slots, T];
    exact: in token chunks that keep one-row bits."""
    t = ids.ne[1]
    chunk = expert_rows_per_call(TYPE_NAMES.get(w.tensor.type, "?"), w.repacked) if exact else None
    if chunk is None or t <= chunk:
        return ctx.mul_mat_id(w.tensor, x, ids)
    out = None
    for r0 in range(0, t, chunk):
        n = min(chunk, t - r0)
        xs = ctx.view(x, (x.ne[0], x.ne[1], n), (x.nb[1], x.nb[2]), r0 * x.nb[2])
        part = ctx.mul_mat_id(w.tensor, xs, ctx.view(ids, (ids.ne[0], n), (ids.nb[1],), r0 * ids.nb[1]))
        out = part if out is None else ctx.concat(out, part, 2)
    return out
