"""The kernel seam: get_backend(name).prepare(weight) -> PreparedLinear, called as w(x) -> y.

x is [T, K] activations, y is [T, N]. Backends:
  ggml   float32 activations in and out; llama.cpp's own kernels (tpi.quant.ggml_backend), when
         llama-cpp-python's ggml libraries load here.
  torch  bf16 activations in and out; packed int4 / int8 kernels, bf16 F.linear otherwise.
  numpy  float32 activations in and out; no torch import anywhere on its path.
Both run q4g32 / q8 / bf16 / f32: a GGUF-typed weight ("ggml:<TYPE>") is converted when it is
prepared (tpi.quant.kernel_forms), and `kernel_form` gives that converted form ahead of time, for
a shard copy that streams without converting.
The model and scheduler call only this seam.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from tpi.errors import ShapeError, TpiError
from tpi.quant.ggml_backend import GgmlBackend
from tpi.quant.ggml_lib import ggml_available
from tpi.quant.formats import (BF16, F32, GROUP, Q4G32, Q4G32_PREPACKED, Q8, QTensor, bf16_bits_to_f32, dequantize,
                               unpack_nibbles)
from tpi.quant.kernel_forms import kernel_nbytes, to_kernel_format

# Packed torch kernels only for these shapes: int4pack needs N % 16 and K % 32; int8pack_mm
# segfaults on odd shapes (N=7, K=33), so it gets the same guard. Other shapes use dense bf16.
KERNEL_N_MULTIPLE = 16
KERNEL_K_MULTIPLE = GROUP
# Rows of a q4g32/q8/bf16 weight expanded to float32 at once by the numpy backend: measured
# best for K=576 (1024 rows = 2.3 MB of float32, stays in L2/L3).
NUMPY_ROW_CHUNK = 1024
# Up to this many tokens the numpy q4 path uses the grouped integer dot; above it, dequantizing a
# chunk and one BLAS matmul wins (measured: equal near T=16, 4-10x faster at T=64).
NUMPY_Q4_DOT_MAX_T = 16


class KernelBackendError(TpiError):
    """The requested kernel backend does not exist or cannot run here."""


class PreparedLinear(Protocol):
    """A weight in a backend's runtime form; calling it computes x @ W.T."""

    fmt: str
    kernel: str  # which implementation runs: "int4pack", "int8pack", "dense", "numpy-q4", ...
    in_features: int
    out_features: int

    def __call__(self, x): ...


def torch_available() -> bool:
    """True when torch can be imported here; does not import it."""
    return importlib.util.find_spec("torch") is not None


def kernel_shape_ok(n: int, k: int) -> bool:
    """Whether the packed torch kernels accept an [N, K] weight."""
    return n > 0 and k > 0 and n % KERNEL_N_MULTIPLE == 0 and k % KERNEL_K_MULTIPLE == 0


# ----------------------------------------------------------------------------------------------
# int4 packing for torch._weight_int4pack_mm_for_cpu (numpy; verified against torch's converter).
# torch blocks N by BLOCK_N (32 on AVX2 and plain builds) and, per k, stores BLOCK_N/2 bytes:
#   AVX2:    byte d = q[d, k] | q[d + 16, k] << 4            (d < 16 within a 32-row block)
#   DEFAULT: byte d = q[2d, k] | q[2d + 1, k] << 4
# A trailing block of 16 rows uses the DEFAULT pairing on both. Other capabilities (AVX-512 with
# 64-row blocks, ARM) go through torch's own converter.

def _pair_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical rows a, b uint8 [blocks, w, K/2] -> kernel bytes [blocks, K, w] of a | b << 4."""
    even = (a & np.uint8(0x0F)) | (b << np.uint8(4))  # k = 2j
    odd = (a >> np.uint8(4)) | (b & np.uint8(0xF0))  # k = 2j + 1
    blocks, width, half = a.shape
    return np.stack([even, odd], axis=-1).reshape(blocks, width, half * 2).transpose(0, 2, 1)


def int4pack_layout(qweight: np.ndarray, capability: str) -> np.ndarray | None:
    """Canonical q4g32 qweight [N, K/2] -> torch int4pack bytes [N, K/2]; None if capability unknown."""
    n, half = qweight.shape
    if n % 16 or capability not in ("AVX2", "DEFAULT"):
        return None
    full = n // 32
    main = qweight[: full * 32]
    if capability == "AVX2":
        main = main.reshape(full, 2, 16, half)
        parts = [_pair_rows(main[:, 0], main[:, 1])]
    else:
        main = main.reshape(full, 16, 2, half)
        parts = [_pair_rows(main[:, :, 0], main[:, :, 1])]
    if n % 32:
        tail = qweight[full * 32 :].reshape(1, 8, 2, half)
        parts.append(_pair_rows(tail[:, :, 0], tail[:, :, 1]))
    return np.concatenate([p.reshape(-1) for p in parts]).reshape(n, half)


def prepack_q4(qt: QTensor, capability: str) -> QTensor:
    """A q4g32 weight with qweight moved into `capability`'s int4pack order (same bytes the torch
    backend's prepare would compute); other formats, odd shapes and unknown CPUs come back as they are."""
    fmt = Q4G32_PREPACKED.get(capability)
    if qt.fmt != Q4G32 or fmt is None or not kernel_shape_ok(*qt.shape):
        return qt
    packed = int4pack_layout(qt.arrays["qweight"], capability)
    return QTensor(fmt, qt.shape, {"qweight": packed, "scale_zero": qt.arrays["scale_zero"]})


# ----------------------------------------------------------------------------------------------
# torch backend

_PREPACKED_FORMATS = frozenset(Q4G32_PREPACKED.values())


@dataclass(frozen=True, eq=False)
class _TorchInt4:
    fmt: str
    kernel: str
    in_features: int
    out_features: int
    packed: object  # torch uint8 [N, K/2], kernel layout
    scale_zero: object  # torch bf16 [K/32, N, 2]
    mm: Callable

    def __call__(self, x):
        return self.mm(x, self.packed, GROUP, self.scale_zero)


@dataclass(frozen=True, eq=False)
class _TorchInt8:
    fmt: str
    kernel: str
    in_features: int
    out_features: int
    weight: object  # torch int8 [N, K]
    scale: object  # torch bf16 [N]
    mm: Callable

    def __call__(self, x):
        return self.mm(x, self.weight, self.scale)


@dataclass(frozen=True, eq=False)
class _TorchDense:
    fmt: str
    kernel: str
    in_features: int
    out_features: int
    weight: object  # torch bf16 [N, K]
    mm: Callable

    def __call__(self, x):
        return self.mm(x, self.weight)


class TorchBackend:
    """Packed int4/int8 torch CPU kernels; bf16 activations."""

    name = "torch"
    resident_nbytes = staticmethod(kernel_nbytes)  # what a prepared weight holds

    def __init__(self) -> None:
        import torch  # lazily: the numpy backend must work without torch

        self._torch = torch
        self.capability = torch.backends.cpu.get_cpu_capability()

    @staticmethod
    def available() -> bool:
        return torch_available()

    def _tensor(self, a: np.ndarray):
        """Zero-copy torch view of a numpy array (read-only mmaps included; kernels never write)."""
        a = np.ascontiguousarray(a)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return self._torch.from_numpy(a)

    def _bf16(self, bits: np.ndarray):
        return self._tensor(bits).view(self._torch.bfloat16)

    def kernel_form(self, qt: QTensor) -> QTensor:
        """What to store for this CPU so that prepare is zero-copy: converted, then int4-prepacked."""
        return prepack_q4(to_kernel_format(qt), self.capability)

    def concat(self, ys: list):
        return self._torch.cat(ys, dim=-1)

    def prepare(self, w: QTensor | np.ndarray) -> PreparedLinear:
        qt = to_kernel_format(w)
        if qt.fmt in _PREPACKED_FORMATS:
            return self._prepare_prepacked(qt)
        prepare_fmt = {Q4G32: self._prepare_q4, Q8: self._prepare_q8}.get(qt.fmt, self._prepare_dense)
        return prepare_fmt(qt)

    def _prepare_prepacked(self, qt: QTensor) -> PreparedLinear:
        """Zero-copy: the bytes are already in this CPU's int4pack order (no repack per block)."""
        if Q4G32_PREPACKED.get(self.capability) != qt.fmt:
            raise KernelBackendError(
                f"a weight packed as {qt.fmt} cannot run on this CPU (torch capability {self.capability}); "
                "delete the .kernel file beside the shard and tpi writes it again")
        return self._int4(qt, self._tensor(qt.arrays["qweight"]))

    def _int4(self, qt: QTensor, packed_t) -> PreparedLinear:
        n, k = qt.shape
        return _TorchInt4(qt.fmt, "int4pack", k, n, packed_t, self._bf16(qt.arrays["scale_zero"]),
                          self._torch._weight_int4pack_mm_for_cpu)

    def _prepare_q4(self, qt: QTensor) -> PreparedLinear:
        n, k = qt.shape
        if not kernel_shape_ok(n, k):
            return self._prepare_dense(qt)
        torch = self._torch
        packed = int4pack_layout(qt.arrays["qweight"], self.capability)
        if packed is None:  # a CPU whose packing we have not verified: let torch pack it
            q = torch.from_numpy(unpack_nibbles(qt.arrays["qweight"]).astype(np.int32))
            packed_t = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            packed_t = self._tensor(packed)
        return self._int4(qt, packed_t)

    def _prepare_q8(self, qt: QTensor) -> PreparedLinear:
        n, k = qt.shape
        if not kernel_shape_ok(n, k):
            return self._prepare_dense(qt)
        return _TorchInt8(qt.fmt, "int8pack", k, n, self._tensor(qt.arrays["qweight"]),
                          self._bf16(qt.arrays["scale"]), self._torch._weight_int8pack_mm)

    def _prepare_dense(self, qt: QTensor) -> PreparedLinear:
        n, k = qt.shape
        torch = self._torch
        if qt.fmt == BF16:
            weight, kernel = self._bf16(qt.arrays["weight"]), "dense"
        else:  # f32, or a packed format at a shape the packed kernels refuse
            weight = torch.from_numpy(dequantize(qt)).to(torch.bfloat16)
            kernel = "dense" if qt.fmt == F32 else "dense-fallback"
        return _TorchDense(qt.fmt, kernel, k, n, weight, torch.nn.functional.linear)

    def linear(self, x, w: PreparedLinear):
        return w(x)

    def activations(self, a: np.ndarray):
        """float32 numpy [T, K] -> this backend's activation type (bf16 tensor)."""
        return self._torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self._torch.bfloat16)

    def to_f32(self, y) -> np.ndarray:
        return y.float().numpy()


# ----------------------------------------------------------------------------------------------
# numpy backend (float32). q4g32 uses a grouped integer dot: per group g and row n,
#   y = scale * (sum_i q_i x_i - 8 * sum_i x_i) + zero * sum_i x_i
# so the scale/zero maths is per group, and only nibble -> float32 runs per weight.

@dataclass(frozen=True, eq=False)
class _NumpyQ4:
    fmt: str
    kernel: str
    in_features: int
    out_features: int
    qweight: np.ndarray  # uint8 [N, K/32, 16]
    scale_zero: np.ndarray  # uint16 [K/32, N, 2] bf16 bits

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._dot(x) if x.shape[0] <= NUMPY_Q4_DOT_MAX_T else self._dequant_matmul(x)

    def _dequant_matmul(self, x: np.ndarray) -> np.ndarray:
        n_all, k = self.out_features, self.in_features
        y = np.empty((x.shape[0], n_all), dtype=np.float32)
        for s in range(0, n_all, NUMPY_ROW_CHUNK):
            e = min(s + NUMPY_ROW_CHUNK, n_all)
            b = self.qweight[s:e]  # [n, G, 16]
            w = np.empty(b.shape + (2,), dtype=np.float32)  # [n, G, 16, 2]: nibble pairs in k order
            w[..., 0] = b & np.uint8(15)
            w[..., 1] = b >> np.uint8(4)
            w = w.reshape(e - s, k // GROUP, GROUP)
            sz = bf16_bits_to_f32(self.scale_zero[:, s:e])  # [G, n, 2]
            w -= 8.0
            w *= sz[..., 0].T[..., None]
            w += sz[..., 1].T[..., None]
            np.matmul(x, w.reshape(e - s, k).T, out=y[:, s:e])
        return y

    def _dot(self, x: np.ndarray) -> np.ndarray:
        t = x.shape[0]
        groups = self.in_features // GROUP
        xg = x.reshape(t, groups, 16, 2)
        x_even = np.ascontiguousarray(xg[..., 0].transpose(1, 2, 0))  # [G, 16, T]
        x_odd = np.ascontiguousarray(xg[..., 1].transpose(1, 2, 0))
        x_sum = x.reshape(t, groups, GROUP).sum(axis=-1).T  # [G, T]
        y = np.empty((self.out_features, t), dtype=np.float32)
        for s in range(0, self.out_features, NUMPY_ROW_CHUNK):
            e = min(s + NUMPY_ROW_CHUNK, self.out_features)
            b = self.qweight[s:e].transpose(1, 0, 2)  # [G, n, 16]
            dot = np.matmul((b & np.uint8(15)).astype(np.float32), x_even)  # [G, n, T]
            dot += np.matmul((b >> np.uint8(4)).astype(np.float32), x_odd)
            dot -= 8.0 * x_sum[:, None, :]
            sz = bf16_bits_to_f32(self.scale_zero[:, s:e])  # [G, n, 2]
            dot *= sz[..., 0:1]
            y[s:e] = dot.sum(axis=0) + sz[..., 1].T @ x_sum
        return y.T


@dataclass(frozen=True, eq=False)
class _NumpyRowScaled:
    """q8 (int8 rows times a per-row scale), bf16 bits, or f32: widen a chunk of rows, then BLAS."""

    fmt: str
    kernel: str
    in_features: int
    out_features: int
    weight: np.ndarray  # [N, K] int8 | uint16 bf16 bits | float32
    scale: np.ndarray | None  # float32 [N] for q8

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.weight.dtype == np.float32:
            return x @ self.weight.T
        y = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        widen = bf16_bits_to_f32 if self.weight.dtype == np.uint16 else (lambda a: a.astype(np.float32))
        for s in range(0, self.out_features, NUMPY_ROW_CHUNK):
            e = min(s + NUMPY_ROW_CHUNK, self.out_features)
            np.matmul(x, widen(self.weight[s:e]).T, out=y[:, s:e])
        if self.scale is not None:
            y *= self.scale
        return y


_NUMPY_PREPARE: dict[str, Callable[[QTensor, int, int], PreparedLinear]] = {
    Q4G32: lambda qt, n, k: _NumpyQ4(
        Q4G32, "numpy-q4", k, n, qt.arrays["qweight"].reshape(n, k // GROUP, 16), qt.arrays["scale_zero"]),
    Q8: lambda qt, n, k: _NumpyRowScaled(
        Q8, "numpy-q8", k, n, qt.arrays["qweight"], bf16_bits_to_f32(qt.arrays["scale"])),
    BF16: lambda qt, n, k: _NumpyRowScaled(BF16, "numpy-bf16", k, n, qt.arrays["weight"], None),
    F32: lambda qt, n, k: _NumpyRowScaled(F32, "numpy-f32", k, n, qt.arrays["weight"], None),
}


class NumpyBackend:
    """Pure numpy kernels for devices without torch; float32 activations."""

    name = "numpy"
    resident_nbytes = staticmethod(kernel_nbytes)  # what a prepared weight holds

    @staticmethod
    def available() -> bool:
        return True

    @staticmethod
    def kernel_form(qt: QTensor) -> QTensor:
        """What to store so that prepare converts nothing: ggml types in their kernel format."""
        return to_kernel_format(qt)

    @staticmethod
    def concat(ys: list) -> np.ndarray:
        return np.concatenate(ys, axis=-1)

    def prepare(self, w: QTensor | np.ndarray) -> PreparedLinear:
        qt = to_kernel_format(w)
        n, k = qt.shape
        return _NUMPY_PREPARE[qt.fmt](qt, n, k)

    def linear(self, x: np.ndarray, w: PreparedLinear) -> np.ndarray:
        return w(x)

    def activations(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_f32(self, y: np.ndarray) -> np.ndarray:
        return y


_BACKENDS: dict[str, Callable[[], object]] = {"ggml": GgmlBackend, "torch": TorchBackend, "numpy": NumpyBackend}


def available_backends() -> list[str]:
    """Backends that can run here, best first; ggml only when its libraries load and pass their checks."""
    return [name for name, cls in _BACKENDS.items() if cls.available()]


def backend_available(name: str) -> bool:
    """name in available_backends(), probing only that backend (a numpy device never looks for torch)."""
    cls = _BACKENDS.get(name)
    return cls is not None and cls.available()


def get_backend(name: str):
    """The kernel backend called name ("ggml", "torch" or "numpy")."""
    if name not in _BACKENDS:
        raise KernelBackendError(f"unknown kernel backend '{name}'; use one of {', '.join(_BACKENDS)}")
    if name == "torch" and not torch_available():
        raise KernelBackendError("the torch backend needs torch installed; install torch or use the numpy backend")
    if name == "ggml":
        ok, reason = ggml_available()
        if not ok:
            raise KernelBackendError(reason)
    return _BACKENDS[name]()
