"""QuantLinear: the nn.Linear interface over a prepared kernel weight, for any native format."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from tpi.quant.formats import QTensor


@dataclass(frozen=True)
class WeightInfo:
    """What nn.Linear.weight would tell a caller, without materialising the weight."""

    fmt: str
    shape: tuple[int, int]  # (out_features, in_features)
    nbytes: int
    bits_per_weight: float


class QuantLinear:
    """y = x @ W.T (+ bias) through a backend's PreparedLinear; drop-in for nn.Linear in the model.

    Format dispatch happens once, in backend.prepare (a registry keyed by fmt); calls go straight
    to the bound kernel.
    """

    __slots__ = ("in_features", "out_features", "weight", "bias", "_w", "_call")

    def __init__(self, qt: QTensor, backend, bias: np.ndarray | None = None) -> None:
        self.out_features, self.in_features = qt.shape
        self.weight = WeightInfo(qt.fmt, qt.shape, qt.nbytes, 8.0 * qt.nbytes / max(1, qt.shape[0] * qt.shape[1]))
        self._w = backend.prepare(qt)
        # Bias in the backend's activation type, added in one op; none means a single kernel call.
        self.bias = None if bias is None else backend.activations(np.asarray(bias, dtype=np.float32)[None, :])
        self._call = self._w if self.bias is None else self._with_bias

    @property
    def kernel(self) -> str:
        return self._w.kernel

    def _with_bias(self, x):
        return self._w(x) + self.bias

    def forward(self, x):
        return self._call(x)

    def __call__(self, x):
        return self._call(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.weight.fmt}, kernel={self.kernel}, bias={self.bias is not None}")

    def __repr__(self) -> str:
        return f"QuantLinear({self.extra_repr()})"
