"""Device profiles: wire round trip, strict validation of untrusted dicts, cache, measurement."""
from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.devices.profile import (
    _kernel_seam_matmuls,
    CACHE_FILE, DeviceProfile, load_profile, measure_profile, save_profile,
)
from tpi.errors import ProtocolError
from tpi.quant.kernels import available_backends

GOOD = DeviceProfile(name="laptop-1", os="Linux x86_64", cores=8, total_memory_bytes=8 << 30,
                     free_memory_bytes=6 << 30, backend="torch", int4_gflops=120.5, bf16_gflops=40.0,
                     prefill_gflops=300.0, memory_gbs=20.0, disk_mb_s=900.0, measured_at=1.7e9)


def test_round_trip_through_dict_and_json():
    d = GOOD.to_dict()
    assert DeviceProfile.from_dict(d) == GOOD
    assert DeviceProfile.from_dict(json.loads(json.dumps(d))) == GOOD


def test_integral_floats_from_the_wire_are_accepted_as_floats():
    d = dict(GOOD.to_dict(), memory_gbs=20)
    p = DeviceProfile.from_dict(d)
    assert p.memory_gbs == 20.0 and isinstance(p.memory_gbs, float)


@pytest.mark.parametrize("key, value", [
    ("cores", True), ("cores", 0), ("cores", 2.0), ("total_memory_bytes", -1),
    ("free_memory_bytes", 9 << 30),  # more than total
    ("int4_gflops", float("nan")), ("bf16_gflops", float("inf")), ("disk_mb_s", 0.0),
    ("memory_gbs", "fast"), ("backend", "cuda"), ("name", ""), ("name", "x" * 500),
    ("name", "evil\x1b[2J"), ("os", 3), ("measured_at", -5.0),
])
def test_bad_field_values_raise_protocol_error(key, value):
    with pytest.raises(ProtocolError):
        DeviceProfile.from_dict(dict(GOOD.to_dict(), **{key: value}))


def test_missing_or_extra_fields_and_non_maps_are_refused():
    d = GOOD.to_dict()
    del d["disk_mb_s"]
    with pytest.raises(ProtocolError, match="missing"):
        DeviceProfile.from_dict(d)
    with pytest.raises(ProtocolError, match="unexpected"):
        DeviceProfile.from_dict(dict(GOOD.to_dict(), gpu="yes"))
    for not_a_map in (None, [], "profile", 3, [("name", "x")]):
        with pytest.raises(ProtocolError):
            DeviceProfile.from_dict(not_a_map)


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=4,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=20), wire_values, max_size=14))
def test_fuzzed_dicts_only_raise_protocol_error(data):
    try:
        DeviceProfile.from_dict(data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries({k: wire_values for k in GOOD.to_dict()}))
def test_fuzzed_values_under_the_right_keys_only_raise_protocol_error(data):
    try:
        DeviceProfile.from_dict(data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(GOOD.to_dict())), wire_values)
def test_one_fuzzed_field_in_a_valid_profile_validates_or_raises_protocol_error(key, value):
    try:
        p = DeviceProfile.from_dict(dict(GOOD.to_dict(), **{key: value}))
    except ProtocolError:
        return
    # Accepted values must be sane enough for the planner to divide by.
    assert p.cores >= 1 and p.free_memory_bytes <= p.total_memory_bytes
    assert all(math.isfinite(v) and v > 0 for v in (p.int4_gflops, p.bf16_gflops, p.prefill_gflops,
                                                       p.memory_gbs, p.disk_mb_s))


def test_cache_saves_and_loads(tmp_path):
    save_profile(GOOD, tmp_path)
    assert load_profile(tmp_path) == GOOD
    assert load_profile(tmp_path, backend="torch") == GOOD
    assert load_profile(tmp_path, backend="numpy") is None
    assert load_profile(tmp_path, max_age_s=60, now=GOOD.measured_at + 30) == GOOD
    assert load_profile(tmp_path, max_age_s=60, now=GOOD.measured_at + 120) is None
    assert load_profile(tmp_path / "absent") is None


def test_corrupt_cache_is_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / CACHE_FILE).write_text('{"name": 3')
    with caplog.at_level(logging.WARNING):
        assert load_profile(tmp_path) is None
    assert "unreadable device profile" in caplog.text
    (tmp_path / CACHE_FILE).write_text(json.dumps(dict(GOOD.to_dict(), cores=-1)))
    assert load_profile(tmp_path) is None


def _check_measured(p: DeviceProfile, backend: str):
    assert DeviceProfile.from_dict(p.to_dict()) == p  # a measured profile passes its own validation
    assert p.backend == backend and p.cores >= 1
    assert 0 < p.free_memory_bytes <= p.total_memory_bytes
    for v in (p.int4_gflops, p.bf16_gflops, p.prefill_gflops, p.memory_gbs, p.disk_mb_s):
        assert math.isfinite(v) and v > 0


def test_measure_numpy_profile_quick(tmp_path):
    steps = []
    p = measure_profile(((256, 512),), backend="numpy", scratch_dir=tmp_path, quick=True,
                        progress=lambda what, frac: steps.append(frac), name="probe")
    _check_measured(p, "numpy")
    assert p.name == "probe"
    assert steps == sorted(steps) and steps[-1] == 1.0
    assert list(tmp_path.iterdir()) == []  # the disk probe file is removed


@pytest.mark.slow
def test_measure_torch_profile_quick(tmp_path):
    pytest.importorskip("torch")
    _check_measured(measure_profile(((256, 512),), backend="torch", scratch_dir=tmp_path, quick=True), "torch")


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "torch"])
def test_every_auto_backend_is_measured_through_the_kernel_seam(backend):
    """The seam bench (how ggml is profiled) times real matmuls: slower for 64 tokens than for one."""
    one_int4, one_bf16, prefill = _kernel_seam_matmuls(backend, 256, 512, 0.01)
    assert 0 < one_int4 < prefill and one_bf16 > 0


def test_bench_shapes_must_fit_the_kernels(tmp_path):
    with pytest.raises(AssertionError, match="K % 32"):
        measure_profile(((256, 100),), backend="numpy", scratch_dir=tmp_path, quick=True)


def test_measure_ggml_profile_quick(tmp_path):
    from tpi.quant.ggml_lib import ggml_available

    if not ggml_available()[0]:
        pytest.skip("ggml not loadable here")
    p = measure_profile(((256, 512),), backend="ggml", scratch_dir=tmp_path, quick=True, threads=1)
    _check_measured(p, "ggml")
    assert 0 < p.cpu_share <= 1.0
