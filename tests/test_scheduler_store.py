"""Shard store: round trips, on-disk layout, and detection of damaged files."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from tpi.errors import ModelFormatError
from tpi.quant.formats import QTensor, quantize
from tpi.scheduler.store import ShardStore, write_store


def make_blocks(seed: int = 0, layers: int = 2) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(seed)
    hidden, inter = 64, 96
    blocks = []
    for i in range(layers):
        blocks.append((f"L{i}.attn", {
            "attn_norm": rng.standard_normal(hidden).astype(np.float32),
            "wqkv": quantize(rng.standard_normal((hidden + 64, hidden)), "q4g32"),
            "bqkv": rng.standard_normal(hidden + 64).astype(np.float32),
            "wo": quantize(rng.standard_normal((hidden, hidden)), "q8"),
        }))
        blocks.append((f"L{i}.mlp", {
            "mlp_norm": rng.standard_normal(hidden).astype(np.float32),
            "w_gate_up": quantize(rng.standard_normal((2 * inter, hidden)), "bf16"),
            "w_down": quantize(rng.standard_normal((hidden, inter)), "f32"),
        }))
    blocks.append(("globals", {
        "embed": quantize(rng.standard_normal((128, hidden)), "q8"),
        "norm": rng.standard_normal(hidden).astype(np.float32),
        "odd_int64": rng.integers(-5, 5, size=(3, 5, 7)),
        "f16": rng.standard_normal(33).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), np.int32),
        "flags": rng.random(9) > 0.5,
        "transposed": np.asfortranarray(rng.standard_normal((5, 6)).astype(np.float32)),
        "big_endian": np.arange(6, dtype=">i4"),
    }))
    return blocks


def assert_same_block(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        if isinstance(w, QTensor):
            assert isinstance(g, QTensor) and g.fmt == w.fmt and g.shape == w.shape
            assert list(g.arrays) == list(w.arrays)
            for an in w.arrays:
                assert g.arrays[an].dtype == w.arrays[an].dtype
                assert g.arrays[an].tobytes() == w.arrays[an].tobytes(), (name, an)
        else:
            assert g.shape == w.shape and g.dtype.kind == w.dtype.kind
            assert g.dtype.itemsize == w.dtype.itemsize
            np.testing.assert_array_equal(g, w)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "shard.tpis"
    write_store(path, {"model": "tiny", "rank": 1, "layers": [0, 1]}, make_blocks())
    return path


@pytest.mark.parametrize("copy", [True, False])
def test_round_trip_is_bit_exact(store_path, copy):
    with ShardStore.open(store_path, verify=True) as store:
        assert store.meta == {"model": "tiny", "rank": 1, "layers": [0, 1]}
        assert store.keys() == ("L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "globals")
        for key, want in make_blocks():
            assert_same_block(store.load(key, copy=copy), want)


def test_copy_owns_memory_and_outlives_the_store(store_path):
    store = ShardStore.open(store_path)
    copied = store.load("L0.mlp", copy=True)
    viewed = store.load("L0.mlp", copy=False)
    assert copied["mlp_norm"].flags.writeable and not viewed["mlp_norm"].flags.writeable
    assert copied["w_down"].arrays["weight"].ctypes.data % 64 == 0
    store.release("L0.mlp")  # dropping pages must not change what the views read
    assert_same_block(viewed, dict(make_blocks())["L0.mlp"])
    store.close()
    assert_same_block(copied, dict(make_blocks())["L0.mlp"])


def test_layout_matches_documented_format(store_path):
    # Parse the file independently of ShardStore, following docs/architecture.md.
    raw = store_path.read_bytes()
    magic, version, align, index_offset, index_nbytes, digest = struct.unpack_from("<8sIIQQ32s", raw)
    assert (magic, version, align) == (b"TPISTORE", 1, 65536)
    assert len(raw) == index_offset + index_nbytes
    index_bytes = raw[index_offset:]
    assert hashlib.sha256(index_bytes).digest() == digest
    index = json.loads(index_bytes)
    want = dict(make_blocks())
    for b in index["blocks"]:
        assert b["offset"] % 4096 == 0 and b["offset"] >= align
        region = raw[b["offset"]:b["offset"] + b["nbytes"]]
        assert hashlib.sha256(region).hexdigest() == b["hash"]
        for t in b["tensors"]:
            specs = t["arrays"] if "arrays" in t else {"": t["array"]}
            for an, spec in specs.items():
                w = want[b["key"]][t["name"]]
                w = w.arrays[an] if an else w
                start = spec["offset"]
                assert start % 64 == 0
                assert region[start:start + w.nbytes] == np.ascontiguousarray(w).astype(
                    w.dtype.newbyteorder("<")).tobytes()


def test_content_hash_is_stable_and_content_sensitive(tmp_path):
    a = write_store(tmp_path / "a", {"m": 1}, make_blocks(seed=0))
    b = write_store(tmp_path / "b", {"m": 1}, make_blocks(seed=0))
    c = write_store(tmp_path / "c", {"m": 1}, make_blocks(seed=1))
    d = write_store(tmp_path / "d", {"m": 2}, make_blocks(seed=0))
    assert a.content_hash == b.content_hash
    assert len({a.content_hash, c.content_hash, d.content_hash}) == 3
    assert a.nbytes == (tmp_path / "a").stat().st_size
    with ShardStore.open(tmp_path / "a") as store:
        assert store.content_hash == a.content_hash
        assert a.block_nbytes == dict(store.block_sizes())


def test_progress_reports_each_block(tmp_path):
    seen = []
    write_store(tmp_path / "s", {}, make_blocks(), progress=lambda key, done: seen.append((key, done)))
    assert [k for k, _ in seen] == [k for k, _ in make_blocks()]
    assert all(a[1] < b[1] for a, b in zip(seen, seen[1:]))


def test_bad_magic_is_refused(store_path):
    raw = bytearray(store_path.read_bytes())
    raw[0:8] = b"GGUF\0\0\0\0"
    store_path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="not a tpi shard store"):
        ShardStore.open(store_path)


def test_other_version_is_refused(store_path):
    raw = bytearray(store_path.read_bytes())
    struct.pack_into("<I", raw, 8, 99)
    store_path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="version 99.*reads version 1"):
        ShardStore.open(store_path)


@pytest.mark.parametrize("keep", [10, 70000, -1])
def test_truncated_file_is_refused(store_path, keep):
    raw = store_path.read_bytes()
    store_path.write_bytes(raw[:keep])
    with pytest.raises(ModelFormatError, match="truncated"):
        ShardStore.open(store_path)


def test_flipped_payload_byte_fails_verify_naming_the_block(store_path):
    with ShardStore.open(store_path) as store:
        entry = store._blocks["L1.attn"]
        where = entry["offset"] + entry["nbytes"] // 2
    raw = bytearray(store_path.read_bytes())
    raw[where] ^= 0x40
    store_path.write_bytes(bytes(raw))
    with ShardStore.open(store_path) as store:  # cheap open checks header and index only
        with pytest.raises(ModelFormatError, match="block 'L1.attn' does not match its hash"):
            store.verify()
    with pytest.raises(ModelFormatError, match="corrupted"):
        ShardStore.open(store_path, verify=True)


def test_flipped_index_byte_is_refused_on_open(store_path):
    raw = bytearray(store_path.read_bytes())
    raw[-5] ^= 0x01
    store_path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="index does not match the content hash"):
        ShardStore.open(store_path)


def test_missing_file_and_unknown_block_are_clear(tmp_path, store_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        ShardStore.open(tmp_path / "nope")
    with ShardStore.open(store_path) as store:
        with pytest.raises(ModelFormatError, match="no block 'L9.mlp'"):
            store.load("L9.mlp")


def test_failed_write_leaves_no_file(tmp_path):
    blocks = [("L0.attn", {"x": np.zeros(3)}), ("L0.attn", {"x": np.zeros(3)})]
    with pytest.raises(ModelFormatError, match="repeated"):
        write_store(tmp_path / "s", {}, blocks)
    with pytest.raises(ModelFormatError, match="dtype object"):
        write_store(tmp_path / "s", {}, [("g", {"x": np.array([None])})])
    assert list(tmp_path.iterdir()) == []


def test_scheduler_imports_without_torch_or_zmq():
    code = ("import sys; import tpi.scheduler.store, tpi.scheduler.window, tpi.scheduler.prefetch, "
            "tpi.scheduler.overhead; bad = {'torch', 'zmq'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
