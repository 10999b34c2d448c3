"""Repacked weights streamed from a file: mapped (zero copy) or copied, never repacked again, and
computing exactly what ggml's own repack computes."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ggml_source import quantize_rows
from tpi.quant.formats import QTensor
from tpi.quant.ggml_backend import GgmlBackend, GgmlLinear
from tpi.quant.ggml_graph import GgmlShapeError
from tpi.quant.ggml_lib import ggml_available
from tpi.quant.ggml_stream import copied_repacked, mapped_repacked, remap_supported, repacked_rows

pytestmark = [pytest.mark.skipif(not ggml_available()[0], reason="ggml not loadable here"),
              pytest.mark.skipif(not remap_supported(), reason="mapping weights is Linux-only")]


@dataclass(frozen=True)
class _Mislabelled:
    """A weight whose bytes are not what its shape says (a damaged kernel-layout file)."""

    fmt: str
    shape: tuple[int, int]
    arrays: dict


def _mappings_of(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.fixture
def repacked_file(tmp_path):
    """A file with two repacked weights at offsets that are not page multiples, and their sources."""
    be = GgmlBackend(threads=1)
    rng = np.random.default_rng(0)
    sources = [quantize_rows(rng.standard_normal((64, 256)).astype(np.float32), name) for name in ("Q4_0", "Q4_K")]
    path, offsets = tmp_path / "weights.bin", []
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
        for qt in sources:
            offsets.append(f.tell())
            f.write(repacked_rows(be, qt).arrays["data"].tobytes())
            f.write(b"y" * 77)
    fd = os.open(path, os.O_RDONLY)
    yield be, sources, path, fd, offsets
    os.close(fd)


def _from_file(path: Path, qt: QTensor, offset: int) -> QTensor:
    data = np.fromfile(path, np.uint8, qt.arrays["data"].nbytes, offset=offset).reshape(qt.arrays["data"].shape)
    return QTensor(qt.fmt, qt.shape, {"data": data})


def test_mapped_and_copied_repacked_weights_compute_what_ggml_repack_computes(repacked_file):
    be, sources, path, fd, offsets = repacked_file
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    for qt, offset in zip(sources, offsets):
        want = GgmlLinear(be.weight(qt, repack=True), be)(x)
        mapped = mapped_repacked(be, _from_file(path, qt, offset), fd, offset)
        copied = copied_repacked(be, _from_file(path, qt, offset))
        assert mapped.repacked and copied.repacked
        assert np.array_equal(GgmlLinear(mapped, be)(x), want)
        assert np.array_equal(GgmlLinear(copied, be)(x), want)
        plain = GgmlLinear(be.weight(qt, repack=False), be)(x)
        assert not np.array_equal(_from_file(path, qt, offset).arrays["data"], qt.arrays["data"])  # really repacked bytes
        assert np.abs(plain - want).max() <= 1e-5 * np.abs(want).max()


def test_a_released_mapped_weight_leaves_no_mapping_of_the_file(repacked_file):
    be, sources, path, fd, offsets = repacked_file
    before = _mappings_of(path)
    w = mapped_repacked(be, _from_file(path, sources[0], offsets[0]), fd, offsets[0])
    assert _mappings_of(path) == before + 1
    del w
    gc.collect()
    assert _mappings_of(path) == before
    junk = [np.ones(1 << 16, np.uint8) for _ in range(64)]  # the freed room is ordinary memory again
    assert all(int(j.sum()) == 1 << 16 for j in junk)


def test_weights_ggml_does_not_repack_are_refused(repacked_file):
    be, _, path, fd, _ = repacked_file
    q8 = quantize_rows(np.ones((64, 256), np.float32), "Q8_0")
    with pytest.raises(GgmlShapeError, match="no repacked layout"):
        mapped_repacked(be, q8, fd, 0)
    mislabelled = _Mislabelled("ggml:Q4_0", (64, 256), {"data": np.zeros((64, 126), np.uint8)})  # 224 columns' bytes
    with pytest.raises(GgmlShapeError, match="corrupt"):
        copied_repacked(be, mislabelled)
