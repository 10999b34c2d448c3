"""Wire codec and security primitives: round trips, fuzzing, bf16 rounding, tokens and keys."""
from __future__ import annotations

import os
import stat

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpi.errors import GroupError, ProtocolError
from tpi.transport import protocol as p
from tpi.transport import security

SAMPLES = [
    p.Hello("phone", {"gflops": 3.5, "cores": 8, "nested": {"a": [1, 2.0, None]}}, ["ab" * 32], b"\x01" * 32),
    p.Assign(rank=2, world=3, shard_hash="f" * 64, shard_size=123, wire_dtype="bf16", peer_id="abc",
             data_port=7701, heartbeat_s=0.5, timeout_s=3.0, config={"hidden": 64}, shard={"heads": [0, 4]},
             context=256),
    p.Refuse("wrong join token"),
    p.ShardRequest("f" * 64, 1 << 20, 4096, False),
    p.ShardChunk("f" * 64, 8, 5, 1234, np.frombuffer(b"hello", np.uint8)),
    p.ShardChunk("f" * 64, 8, 5, 1234, np.empty(0, np.uint8)),
    p.Ready(),
    p.Step(7, p.EXACT_ROWS, [0], [12], [3], [3], np.arange(12, dtype=np.float32).reshape(3, 4), seq=9),
    p.Partial(4, np.ones((1, 8), np.float32), seq=9),
    p.Partial(4, np.ones((1, 8), np.uint16), seq=9),
    p.Reduced(4, np.full((2, 3), 7.5, np.float32), seq=9),
    p.Logits(5, np.arange(10, dtype=np.uint16), seq=9),
    p.Heartbeat(),
    p.Truncate(0, 7),
    p.Stop("bye"),
    p.Stop("re-planned", rejoin=True),
    p.Probe(3, np.zeros(16, np.uint8)),
    p.ProbeEcho(3),
]


def _equal(a: p.Message, b: p.Message) -> bool:
    if type(a) is not type(b):
        return False
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg):
    frames = [bytes(f) for f in p.encode(msg)]
    assert _equal(p.decode(frames), msg)


def test_every_registered_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(p.MESSAGE_TYPES.values())


def _decode_only_protocol_error(frames, max_frame=p.DEFAULT_MAX_FRAME):
    try:
        p.decode(frames, max_frame)
    except ProtocolError:
        pass  # the one allowed failure


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_bytes_raise_only_protocol_error(frames):
    _decode_only_protocol_error(frames)


@settings(max_examples=200)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_valid_messages_raise_only_protocol_error(msg, data):
    frames = [bytearray(bytes(f)) for f in p.encode(msg)]
    i = data.draw(st.integers(0, len(frames) - 1))
    action = data.draw(st.sampled_from(["truncate", "flip", "drop", "extra"]))
    if action == "truncate" and frames[i]:
        frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i]) - 1))]
    elif action == "flip" and frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= data.draw(st.integers(1, 255))
    elif action == "drop":
        del frames[i]
    else:
        frames.append(bytearray(data.draw(st.binary(max_size=32))))
    _decode_only_protocol_error([bytes(f) for f in frames])


plain = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                     max_leaves=10)


@settings(max_examples=150)
@given(st.integers(-2, 20), st.integers(-5, 2**40), st.lists(plain, max_size=12),
       st.lists(st.lists(plain, max_size=3), max_size=3), st.integers(0, 3))
def test_well_formed_msgpack_with_wrong_fields_raises_only_protocol_error(type_code, seq, values, descs, nbuf):
    header = msgpack.packb([p.PROTOCOL_VERSION, type_code, seq, values, descs], use_bin_type=True)
    _decode_only_protocol_error([header] + [b"\0" * 8] * nbuf)


def _with_desc(msg: p.Message, desc: list, payload: bytes | None = None) -> list[bytes]:
    frames = [bytes(f) for f in p.encode(msg)]
    v, t, seq, values, _ = msgpack.unpackb(frames[0])
    return [msgpack.packb([v, t, seq, values, [desc]], use_bin_type=True), payload or frames[1]]


@pytest.mark.parametrize("desc", [["f64", [1, 8]], ["u16", [1, 8]], ["object", [1, 8]], [1, [8]],
                                  ["f32", [1, 9]], ["f32", [-1, 8]], ["f32", "8"], ["f32", [1] * 9]])
def test_bad_dtype_or_shape_is_refused(desc):
    with pytest.raises(ProtocolError):
        p.decode(_with_desc(p.Partial(1, np.ones((1, 8), np.float32)), desc))


def test_oversize_frame_is_refused_before_use():
    msg = p.Step.of_sequence(0, 1, np.zeros((1, 1024), np.float32), request_id=1)
    with pytest.raises(ProtocolError, match="frame limit"):
        p.decode([bytes(f) for f in p.encode(msg)], max_frame=1000)


def test_oversize_header_is_refused():
    with pytest.raises(ProtocolError, match="header exceeds"):
        p.decode([b"\x90" * (p.MAX_HEADER_BYTES + 1)])


def test_allreduce_tensors_must_be_f32_or_bf16():
    with pytest.raises(ProtocolError):
        p.decode([bytes(f) for f in p.encode(p.Partial(1, np.ones(4, np.int32)))])


def test_other_protocol_version_is_a_version_mismatch_but_refuse_still_reads():
    frames = [bytes(f) for f in p.encode(p.Hello("x", {}, [], b""))]
    _, t, seq, values, descs = msgpack.unpackb(frames[0])
    with pytest.raises(p.VersionMismatch):
        p.decode([msgpack.packb([99, t, seq, values, descs])])
    _, t, seq, values, descs = msgpack.unpackb(bytes(p.encode(p.Refuse("old"))[0]))
    assert p.decode([msgpack.packb([99, t, seq, values, descs])]) == p.Refuse("old")


def test_bool_is_not_accepted_as_an_integer_field():
    frames = [bytes(f) for f in p.encode(p.Truncate(0, 3))]
    v, t, seq, _, descs = msgpack.unpackb(frames[0])
    with pytest.raises(ProtocolError):
        p.decode([msgpack.packb([v, t, seq, [0, True], descs])])


def test_unencodable_field_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        p.encode(p.Hello("x", {"big": 2**70}, [], b""))


def test_unencodable_dtype_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="cannot travel"):
        p.encode(p.Step.of_sequence(0, 1, np.zeros((1, 3), np.float64)))


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.3895314e38, 1.00390625, 1.01171875],
                                 np.float32)])
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(p.to_bf16(x), ref)
    assert np.array_equal(p.from_bf16(ref), torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy())


def test_bf16_keeps_nan_a_nan():
    x = np.array([np.nan, np.float32(1.0)], np.float32)
    x.view(np.uint32)[0] = 0x7F800001  # signalling NaN whose rounding would carry into inf
    assert np.isnan(p.from_bf16(p.to_bf16(x))[0])


# ---- security primitives ----

def test_token_round_trips_and_pins_the_master_key(tmp_path):
    token = security.master_token(tmp_path)
    parsed = security.parse_token(token)
    keys = security.load_or_create_keypair(tmp_path, "master")
    assert parsed.master_public == keys.public
    assert parsed.secret == security.load_or_create_join_secret(tmp_path)
    assert security.master_token(tmp_path) == token  # stable across restarts


@pytest.mark.parametrize("bad", ["", "abc", "!!!!", "A" * 90])
def test_malformed_token_is_a_group_error(bad):
    with pytest.raises(GroupError, match="token"):
        security.parse_token(bad)


def test_secret_files_are_private(tmp_path):
    security.master_token(tmp_path / "keys")
    for f in (tmp_path / "keys").iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700


def test_rotate_token_changes_secret_but_not_master_key(tmp_path):
    old = security.parse_token(security.master_token(tmp_path))
    new = security.parse_token(security.rotate_token(tmp_path))
    assert new.master_public == old.master_public and new.secret != old.secret


def test_proof_is_bound_to_secret_and_device_key():
    mk, dk, other = b"m" * 40, b"d" * 40, b"o" * 40
    proof = security.join_proof(b"s" * 16, mk, dk)
    assert security.proof_is_valid(proof, b"s" * 16, mk, dk)
    assert not security.proof_is_valid(proof, b"t" * 16, mk, dk)
    assert not security.proof_is_valid(proof, b"s" * 16, mk, other)


def test_a_step_names_its_rows_and_flags_and_may_carry_several_slots():
    step = p.decode([bytes(f) for f in p.encode(p.Step.of_sequence(12, 3, np.zeros((3, 4), np.float32),
                                                                      all_logits=True, request_id=7))])
    assert (step.request_id, step.start_pos, step.n_tokens, step.all_logits, step.slots) == (7, 12, 3, True, [0])
    x = np.zeros((3, 4), np.float32)
    # one step: slot 2's decode row (its logits), slot 0's verify run of 2 rows (both rows' logits)
    many = p.decode([bytes(f) for f in p.encode(p.Step(0, p.EXACT_ROWS, [2, 0], [40, 0], [1, 2], [1, 2], x))])
    assert (many.slots, many.starts, many.counts, many.outputs, many.exact) == ([2, 0], [40, 0], [1, 2], [1, 2], True)
    chunk = p.decode([bytes(f) for f in p.encode(p.Step(0, 0, [1, 3], [5, 9], [2, 1], [0, 1], x))])
    assert (chunk.outputs, chunk.all_logits) == ([0, 1], False)  # an earlier prompt chunk returns nothing
    for bad, why in ((p.Step(0, 0, [1, 1], [0, 0], [1, 2], [1, 1], x), "slot twice"),
                     (p.Step(0, 0, [0, 1], [0, 0], [3, 0], [1, 0], x), "at least one row"),
                     (p.Step(0, 0, [0], [0], [2], [1], x), "rows its header lists"),
                     (p.Step(0, 0, [0, 1], [0, 0], [1, 2], [1], x), "output count each"),
                     (p.Step(0, 0, [0, 1], [0, 0], [1, 2], [2, 1], x), "at most its rows"),
                     (p.Step(0, 1, [0], [0], [3], [1], x), "unknown step flags")):
        with pytest.raises(ProtocolError, match=why):
            p.decode([bytes(f) for f in p.encode(bad)])


def test_an_assign_names_its_kv_slots():
    a = p.Assign(rank=1, world=2, shard_hash="f" * 64, shard_size=1, peer_id="abc", slots=4)
    assert p.decode([bytes(f) for f in p.encode(a)]).slots == 4
    with pytest.raises(ProtocolError, match="KV slots"):
        p.decode([bytes(f) for f in p.encode(p.Assign(rank=1, world=2, shard_hash="f" * 64, shard_size=1,
                                                       peer_id="abc", slots=0))])


def test_rejoin_is_a_field_of_stop_not_a_prefix_of_its_reason():
    stop = p.decode([bytes(f) for f in p.encode(p.Stop("rejoin: the group is re-planned", rejoin=False))])
    assert stop.rejoin is False
    assert p.decode([bytes(f) for f in p.encode(p.Stop("re-planned", rejoin=True))]).rejoin is True
