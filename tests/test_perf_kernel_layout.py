"""Streaming from a kernel-layout copy of the shard (tpi.model.weights.kernel_layout_store).

A streamed torch engine reads q4g32 blocks whose qweight is already in torch's int4pack order,
so a block prepares zero-copy instead of being repacked every time it is loaded. The copy must
give exactly the kernel inputs the repack gives, be written once and reused, be rewritten when
stale or corrupt, keep the embedding in the canonical layout (it is read by row on the host),
and never be used on a CPU it was not packed for.
"""
from __future__ import annotations

import numpy as np
import pytest

from tpi.quant import formats as F
from tpi.scheduler.store import ShardStore, write_store

torch = pytest.importorskip("torch")

from tpi.quant.kernels import KernelBackendError, TorchBackend, prepack_q4  # noqa: E402
from tpi.model.blocks import EMBED, GLOBALS  # noqa: E402
from tpi.model.weights import kernel_layout_store  # noqa: E402


def _q4(rng, n: int, k: int) -> F.QTensor:
    return F.quantize(rng.standard_normal((n, k)).astype(np.float32), F.Q4G32)


class _Layers:
    """What kernel_layout_store reads of a layers object: its kernel backend."""

    def __init__(self):
        self.kernels = TorchBackend()


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(7)
    blocks = [("L0.attn", {"wqkv": _q4(rng, 96, 64), "wo": _q4(rng, 64, 64), "attn_norm": np.ones(64, np.float32)}),
              ("L0.mlp", {"wgu": _q4(rng, 256, 64), "wdown": _q4(rng, 64, 128), "odd": _q4(rng, 40, 64)}),
              (GLOBALS, {EMBED: _q4(rng, 128, 64), "lm_head": _q4(rng, 128, 64)})]
    path = tmp_path / "abc.tpis"
    write_store(path, {"config": {}}, blocks)
    store = ShardStore.open(path)
    yield store
    store.close()


def test_prepacked_weights_give_the_repacked_kernel_inputs_exactly():
    backend = TorchBackend()
    if backend.capability not in F.Q4G32_PREPACKED:
        pytest.skip(f"no verified int4pack layout for {backend.capability}")
    qt = _q4(np.random.default_rng(1), 256, 128)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)).bfloat16()
    canonical, packed = backend.prepare(qt), backend.prepare(prepack_q4(qt, backend.capability))
    assert packed.fmt == F.Q4G32_PREPACKED[backend.capability] and packed.kernel == "int4pack"
    assert torch.equal(canonical.packed, packed.packed)
    assert torch.equal(canonical(x), packed(x))
    stored = prepack_q4(qt, backend.capability)
    assert backend.prepare(stored).packed.data_ptr() == stored.arrays["qweight"].ctypes.data  # zero-copy


def test_kernel_copy_is_written_once_then_reused_and_rewritten_when_stale(shard, caplog):
    layers = _Layers()
    if layers.kernels.capability not in F.Q4G32_PREPACKED:
        pytest.skip(f"no verified int4pack layout for {layers.kernels.capability}")
    fmt = F.Q4G32_PREPACKED[layers.kernels.capability]
    packed = kernel_layout_store(shard, layers)
    try:
        assert packed is not shard and packed.path.name == f"abc.tpis.{layers.kernels.capability.lower()}.kernel"
        assert packed.meta["source_hash"] == shard.content_hash
        assert packed.keys() == shard.keys() and packed.block_sizes() == shard.block_sizes()
        for key in shard.keys():
            ours, theirs = packed.load(key), shard.load(key)
            for name, t in theirs.items():
                if isinstance(t, np.ndarray):
                    np.testing.assert_array_equal(ours[name], t)
                elif name == EMBED or t.shape[0] % 16:  # read by row on the host / not kernel-able
                    assert ours[name].fmt == F.Q4G32
                    np.testing.assert_array_equal(ours[name].arrays["qweight"], t.arrays["qweight"])
                else:
                    assert ours[name].fmt == fmt
                    np.testing.assert_array_equal(ours[name].arrays["qweight"],
                                                  prepack_q4(t, layers.kernels.capability).arrays["qweight"])
        stamp = packed.path.stat().st_mtime_ns
    finally:
        packed.close()
    again = kernel_layout_store(shard, layers)
    assert again.path.stat().st_mtime_ns == stamp  # reused, not rewritten
    again.close()

    # corrupt: rewritten, with a log line naming the file
    data = bytearray(again.path.read_bytes())
    data[-5] ^= 0xFF
    again.path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        fixed = kernel_layout_store(shard, layers)
    assert str(again.path) in caplog.text
    assert fixed.meta["source_hash"] == shard.content_hash
    fixed.close()


def test_a_copy_that_cannot_be_written_leaves_streaming_on_the_shard(shard, caplog):
    layers = _Layers()
    if layers.kernels.capability not in F.Q4G32_PREPACKED:
        pytest.skip(f"no verified int4pack layout for {layers.kernels.capability}")
    blocker = shard.path.with_name(f"{shard.path.name}.{layers.kernels.capability.lower()}.kernel")
    blocker.mkdir()  # the copy's name is taken by a directory (as root, permissions would not stop it)
    with caplog.at_level("WARNING"):
        got = kernel_layout_store(shard, layers)
    assert got is shard and "repacks every block" in caplog.text and str(blocker) in caplog.text


def test_weights_packed_for_another_cpu_are_refused_with_the_fix():
    backend = TorchBackend()
    other = next(c for c in F.Q4G32_PREPACKED if c != backend.capability)
    qt = prepack_q4(_q4(np.random.default_rng(3), 64, 64), other)
    with pytest.raises(KernelBackendError, match=r"cannot run on this CPU .*delete the \.kernel file"):
        backend.prepare(qt)
