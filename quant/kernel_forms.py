"""What the torch / numpy kernels hold: GGUF-typed weights converted to q4g32 / q8 / bf16, q|k|v and
gate|up parts stacked (one kernel where their converted formats agree), and whole blocks in that
form for a device-local kernel-layout copy of a shard (tpi.model.weights.kernel_layout_store).

numpy only; gguf is imported when a GGUF-typed weight is converted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from tpi.errors import ShapeError
from tpi.model.blocks import UNFUSED
from tpi.quant.gguf_import import KERNEL_FORMAT
from tpi.quant.formats import F32, Q4G32_PREPACKED, QTensor, concat_rows, fmt_nbytes, ggml_type_info, is_ggml

_PREPACKED_FORMATS = frozenset(Q4G32_PREPACKED.values())  # int4-pack order: rows cannot be stacked as bytes


def _as_qtensor(w: QTensor | np.ndarray) -> QTensor:
    if isinstance(w, QTensor):
        return w
    a = np.asarray(w)
    if a.ndim != 2:
        raise ShapeError(f"a linear weight must be 2-D [N, K], got shape {a.shape}")
    return QTensor(F32, (int(a.shape[0]), int(a.shape[1])), {"weight": np.ascontiguousarray(a, dtype=np.float32)})


def to_kernel_format(w: QTensor | np.ndarray) -> QTensor:
    """The weight in a format the torch / numpy kernels run: ggml types converted, others as they are."""
    qt = _as_qtensor(w)
    if not is_ggml(qt.fmt):
        return qt
    from tpi.quant.gguf_import import convert_ggml  # gguf is only needed for GGUF-typed weights

    return convert_ggml(qt)[0]


def kernel_nbytes(qt) -> int:
    """Bytes of a weight once converted for the torch / numpy kernels (vectors and embeddings as they are)."""
    if isinstance(qt, QTensor) and is_ggml(qt.fmt):
        return fmt_nbytes(KERNEL_FORMAT[ggml_type_info(qt.fmt).name], qt.shape)
    return int(qt.nbytes)


@dataclass(frozen=True, eq=False)
class RowConcat:
    """Several prepared weights over one input, outputs side by side: q|k|v or gate|up in different formats."""

    fmt: str
    kernel: str
    in_features: int
    out_features: int
    parts: tuple
    cat: Callable  # the backend's concatenation along the last axis

    def __call__(self, x):
        return self.cat([p(x) for p in self.parts])


def _stackable(qts: list[QTensor]) -> bool:
    """Whether rows of these weights stack into one matrix: one format, one K, rows as bytes."""
    return len({(q.fmt, q.shape[1]) for q in qts}) == 1 and qts[0].fmt not in _PREPACKED_FORMATS


def prepare_unfused(backend, block: dict) -> dict:
    """{"wqkv" / "wgu": prepared} for the q|k|v and gate|up parts a block keeps apart."""
    return {fused: prepare_rows(backend, [block[p] for p in parts])
            for fused, parts in UNFUSED.items() if parts[0] in block}


def prepare_rows(backend, parts: list) -> Callable:
    """One prepared weight computing the parts' rows stacked (fused when their kernel formats agree)."""
    qts = [to_kernel_format(p) for p in parts]
    if _stackable(qts):
        return backend.prepare(concat_rows(qts))
    prepared = tuple(backend.prepare(q) for q in qts)
    return RowConcat("+".join(q.fmt for q in qts), "+".join(p.kernel for p in prepared), qts[0].shape[1],
                     sum(q.shape[0] for q in qts), prepared, backend.concat)


def kernel_block(backend, block: dict, keep: tuple[str, ...] = ()) -> dict:
    """A block as `backend` runs it, for a device-local copy: ggml types converted, q|k|v and gate|up
    fused where the converted formats agree, then the backend's kernel_form (torch: int4 prepack).
    Vectors and the matrices named in `keep` stay as they are."""
    out = dict(block)
    for fused, names in UNFUSED.items():
        if names[0] in block:
            qts = [to_kernel_format(block[n]) for n in names]
            if _stackable(qts):
                out = {k: v for k, v in out.items() if k not in names} | {fused: concat_rows(qts)}
    return {name: t if name in keep or not isinstance(t, QTensor) else backend.kernel_form(t)
            for name, t in out.items()}
