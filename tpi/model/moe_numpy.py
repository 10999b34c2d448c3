"""A rank's mixture-of-experts MLP on numpy (the torch-free fallback, phones): tpi.model.moe's maths.

The router runs in float32 (BLAS), its top k as tpi.model.moe.route; each local chosen expert is
three prepared numpy kernels (GGUF types converted once, at prepare, like every numpy weight).
Tokens are grouped by expert, so a prefill multiplies each used expert once.
"""
from __future__ import annotations

import numpy as np

from tpi.errors import ShapeError
from tpi.model.moe import DOWN_EXPS, GATE_EXPS, ROUTER, UP_EXPS, ExpertShare, route
from tpi.quant.formats import dequantize, slice_rows

ACT = np.float32


def prepare_moe(kernels, block: dict, share: ExpertShare, hidden: int) -> dict:
    """Stored MoE block -> {"mlp_norm", "router" float32 [E, hidden], "experts": [(gate, up, down)]}."""
    router = block[ROUTER]
    router = router if isinstance(router, np.ndarray) else dequantize(router)
    if router.shape != (share.n_experts, hidden):
        raise ShapeError(f"the router is {list(router.shape)}, the model has {share.n_experts} experts of {hidden}")
    rows = {GATE_EXPS: share.ff_local, UP_EXPS: share.ff_local, DOWN_EXPS: hidden}
    experts = []
    for e in range(share.n_local):
        experts.append(tuple(kernels.prepare(slice_rows(block[n], e * r, (e + 1) * r)) for n, r in rows.items()))
    return {"mlp_norm": np.array(block["mlp_norm"], dtype=ACT), ROUTER: np.ascontiguousarray(router, dtype=ACT),
            "experts": experts}


def moe_mlp(xn: np.ndarray, blk: dict, share: ExpertShare, k: int) -> np.ndarray:
    """xn (T, hidden) normed -> this rank's partial MoE output (T, hidden) f32."""
    chosen, weights = route(xn @ blk[ROUTER].T, k)  # (T, k) each
    out = np.zeros_like(xn)
    for local in sorted({e for row in chosen for _, e in share.local_slots(row)}):
        mine = chosen == local + share.experts.start  # (T, k): at most one slot per token
        tokens = np.nonzero(mine.any(axis=1))[0]
        gate, up, down = blk["experts"][local]
        x = xn[tokens]
        g = gate(x)
        act = np.tanh(g * 0.5)  # silu(g) = g * sigmoid(g), sigmoid via tanh (no overflow warning)
        act += 1.0
        act *= 0.5
        act *= g
        act *= up(x)
        out[tokens] += down(act) * weights[tokens][mine[tokens]][:, None]
    return out
