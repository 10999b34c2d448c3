"""Wire messages: frozen dataclasses, their msgpack+raw-buffer codec, and validation.

A message on the wire is multipart: ``[header, buffer...]``. The header is msgpack
``[version, type, seq, [field values...], [[dtype, shape], ...]]``; each buffer frame is the
raw little-endian bytes of one array. Nothing is ever pickled. ``decode`` checks everything
before building a message and raises only ``ProtocolError``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Sequence

import msgpack
import numpy as np

from tpi.errors import ProtocolError, VersionMismatch
from tpi.transport.wire import INT8_BLOCK, REDUCE_DTYPES, from_bf16, to_bf16  # noqa: F401 (re-exported)

# 2: the int8 block wire dtype (Partial/Reduced and Assign.wire_dtype)
# 3: typed controls (Step rows and flags, Truncate, Stop.rejoin, Probe/ProbeEcho, Assign's own fields)
# 4: Assign.slots (KV slots per rank) and steps over many slots (continuous batching)
# 5: two ranks on the f32 wire swap Partials (the worker sums; no Reduced comes back)
# 6: Assign.star_only (the master decides whether two ranks swap or use the star; TPI_STAR_ONLY)
# 7: Step.outputs (logits rows per sequence) replaces the step-wide ALL_LOGITS flag: one step carries
#    verify runs (every row), prompt chunks (none or the last) and decode rows (one) together
PROTOCOL_VERSION = 7
MAX_SLOTS = 1024  # KV slots per rank, and so sequences in one step: far above any --parallel
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_FRAME = 256 << 20
MAX_NDIM = 8
MAX_NESTING = 8

# Wire dtype name -> numpy storage. bf16 travels as its uint16 bit pattern, so a uint16
# array on our side always means bf16 (there is no plain u16 on the wire).
WIRE_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "bf16": np.dtype("<u2"),
    "f16": np.dtype("<f2"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u8": np.dtype("u1"),
    "i8": np.dtype("i1"),
    "int8": INT8_BLOCK,  # blocks of 32 int8 codes + a bf16 scale (transport/wire.py); shape counts blocks
}
_NAME_OF = {dt: name for name, dt in WIRE_DTYPES.items()}



def wire_dtype_of(a: np.ndarray) -> str:
    """Wire name of an array's dtype; raises ProtocolError for dtypes not on the whitelist."""
    name = _NAME_OF.get(a.dtype)
    if name is None:
        raise ProtocolError(
            f"dtype {a.dtype} cannot travel on the wire; use one of {', '.join(WIRE_DTYPES)}"
        )
    return name


# ---- field kinds: each validator returns the value or raises ProtocolError ----

def _is_plain(v: object, depth: int) -> bool:
    if depth > MAX_NESTING:
        return False
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return True
    if isinstance(v, list):
        return all(_is_plain(e, depth + 1) for e in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(e, depth + 1) for k, e in v.items())
    return False


_KIND_OK = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "uint": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, bytes),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict) and _is_plain(v, 0),
    "strs": lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v),
    "uints": lambda v: isinstance(v, list) and all(type(e) is int and e >= 0 for e in v),
}


def _check_kind(kind: str, name: str, v: object) -> None:
    if not _KIND_OK[kind](v):
        raise ProtocolError(f"field '{name}' must be {kind}, got {type(v).__name__}")


class Message:
    """Base of all wire messages; subclasses are frozen dataclasses with SPEC and TYPE."""

    TYPE: ClassVar[int]
    # (field name, kind) for header fields in wire order; kind "tensor" marks a buffer frame.
    SPEC: ClassVar[tuple[tuple[str, str], ...]]

    def check(self) -> None:
        """Type-specific invariants beyond field kinds; raise ProtocolError."""


def _msg(type_code: int, *spec: tuple[str, str]):
    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls.TYPE = type_code
        cls.SPEC = spec
        assert [n for n, _ in spec] == [f.name for f in fields(cls) if f.name != "seq"], cls
        MESSAGE_TYPES[type_code] = cls
        return cls

    return wrap


MESSAGE_TYPES: dict[int, type[Message]] = {}


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _check_reduce_tensor(x: np.ndarray) -> None:
    if x.dtype != np.float32 and x.dtype != np.uint16 and x.dtype != INT8_BLOCK:
        raise ProtocolError(f"allreduce tensors must be f32, bf16 or int8, got {wire_dtype_of(x)}")


@_msg(1, ("name", "str"), ("profile", "dict"), ("cached_hashes", "strs"), ("proof", "bytes"))
class Hello(Message):
    """Worker -> master: who I am, what I measured, which shards I cache, token proof."""

    name: str
    profile: dict
    cached_hashes: list
    proof: bytes

    def check(self) -> None:
        _need(0 < len(self.name) <= 128, "device name must be 1..128 characters")
        _need(len(self.proof) <= 64, "join proof is longer than 64 bytes")


@_msg(2, ("rank", "uint"), ("world", "uint"), ("shard_hash", "str"), ("shard_size", "uint"),
      ("wire_dtype", "str"), ("config", "dict"), ("shard", "dict"), ("context", "uint"),
      ("peer_id", "str"), ("data_port", "uint"), ("heartbeat_s", "float"), ("timeout_s", "float"),
      ("slots", "uint"), ("star_only", "bool"))
class Assign(Message):
    """Master -> worker: admitted; your rank, world, shard and data channel (link fills the last four).

    shard_hash is the shard store's content hash (tpi.scheduler.store, computed once when it is
    written); config is tpi.model.config.config_to_dict, shard tpi.devices.slicing.shard_to_dict.
    """

    rank: int
    world: int
    shard_hash: str
    shard_size: int
    wire_dtype: str = "f32"
    config: dict = field(default_factory=dict)
    shard: dict = field(default_factory=dict)
    context: int = 0
    peer_id: str = ""
    data_port: int = 0
    heartbeat_s: float = 1.0
    timeout_s: float = 10.0
    slots: int = 1  # KV slots of `context` positions each: sequences the group runs at once
    star_only: bool = False  # two ranks use the star too, no partial swap (the master's TPI_STAR_ONLY)

    def check(self) -> None:
        _need(0 < self.slots <= MAX_SLOTS, f"KV slots must be 1..{MAX_SLOTS}, got {self.slots}")
        _need(0 < self.rank < self.world, f"rank {self.rank} out of range for world {self.world}")
        _need(self.data_port < 65536, "data port out of range")
        _need(self.wire_dtype in REDUCE_DTYPES,
              f"wire dtype must be one of {', '.join(REDUCE_DTYPES)}, got {self.wire_dtype!r}")
        _need(self.heartbeat_s > 0 and self.timeout_s > 0, "heartbeat interval and timeout must be > 0")
        _need(0 < len(self.peer_id) <= 64, "peer id must be 1..64 characters")


@_msg(3, ("reason", "str"))
class Refuse(Message):
    """Master -> worker: not admitted (or no longer), with the reason for the user."""

    reason: str


@_msg(4, ("shard_hash", "str"), ("offset", "uint"), ("length", "uint"), ("checksum_only", "bool"))
class ShardRequest(Message):
    """Worker -> master: send (or only checksum) bytes [offset, offset+length) of my shard."""

    shard_hash: str
    offset: int
    length: int
    checksum_only: bool


@_msg(5, ("shard_hash", "str"), ("offset", "uint"), ("length", "uint"), ("crc32", "uint"),
      ("data", "tensor"))
class ShardChunk(Message):
    """Master -> worker: a shard byte range and its crc32 (data empty when checksum only)."""

    shard_hash: str
    offset: int
    length: int
    crc32: int
    data: np.ndarray

    def check(self) -> None:
        _need(self.data.dtype == np.uint8 and self.data.ndim == 1, "shard chunk data must be 1-D u8")
        _need(self.data.size in (0, self.length), "shard chunk data length disagrees with its header")
        _need(self.crc32 < 2**32, "crc32 out of range")


@_msg(6)
class Ready(Message):
    """Worker -> master on the data channel: connected and loaded, ready for steps."""


EXACT_ROWS = 2  # (bit 1 was ALL_LOGITS before v7) Step flag: verify runs computed as their one-row decode steps would, bit for bit (tpi.model.rows)
STEP_FLAGS = EXACT_ROWS


@_msg(7, ("request_id", "int"), ("flags", "uint"), ("slots", "uints"), ("starts", "uints"), ("counts", "uints"),
      ("outputs", "uints"), ("x", "tensor"))
class Step(Message):
    """Master -> workers: run one forward step on these hidden states.

    The rows of x (T, hidden) belong to sequences in order: sequence i has counts[i] rows at
    positions starts[i].., cached in KV slot slots[i], and its last outputs[i] rows return logits
    (tpi.model.rows.Rows on the model's side): 1 for a decode row or a prompt's last chunk, 0 for an
    earlier chunk, counts[i] for a speculative check of k+1 rows (issue 18). Continuous batching
    (issue 17) puts several sequences, of any of these kinds, in one step.
    """

    request_id: int
    flags: int
    slots: list
    starts: list
    counts: list
    outputs: list
    x: np.ndarray
    seq: int = 0

    @classmethod
    def of_sequence(cls, start: int, n_tokens: int, x: np.ndarray, *, all_logits: bool = False,
                    exact: bool = False, slot: int = 0, request_id: int = 0) -> "Step":
        return cls(request_id, EXACT_ROWS if exact else 0, [slot], [start], [n_tokens],
                   [n_tokens if all_logits else 1], x)

    @property
    def start_pos(self) -> int:
        return self.starts[0]

    @property
    def n_tokens(self) -> int:
        return self.counts[0]

    @property
    def all_logits(self) -> bool:
        """Whether every row returns logits."""
        return self.outputs == self.counts

    @property
    def exact(self) -> bool:
        return bool(self.flags & EXACT_ROWS)

    def check(self) -> None:
        n = len(self.slots)
        _need(0 < n <= MAX_SLOTS and len(self.starts) == len(self.counts) == len(self.outputs) == n,
              f"a step needs 1..{MAX_SLOTS} sequences with one slot, start, count and output count each")
        _need(len(set(self.slots)) == n, f"a step lists a KV slot twice: {self.slots}")
        _need(all(c > 0 for c in self.counts), "every sequence in a step needs at least one row")
        _need(all(o <= c for o, c in zip(self.outputs, self.counts)), "a sequence returns logits of at most its rows")
        _need(self.x.ndim == 2 and self.x.shape[0] == sum(self.counts) > 0,
              f"step hidden states {list(self.x.shape)} do not hold the {sum(self.counts)} rows its header lists")
        _need(self.flags & ~STEP_FLAGS == 0, f"unknown step flags {self.flags:#x}")


@_msg(8, ("op", "uint"), ("x", "tensor"))
class Partial(Message):
    """A rank's partial sum for allreduce ``op`` of step ``seq``: worker -> master (both ways in a swap)."""

    op: int
    x: np.ndarray
    seq: int = 0

    def check(self) -> None:
        _check_reduce_tensor(self.x)


@_msg(9, ("op", "uint"), ("x", "tensor"))
class Reduced(Message):
    """Master -> workers: the full sum for allreduce ``op``."""

    op: int
    x: np.ndarray
    seq: int = 0

    def check(self) -> None:
        _check_reduce_tensor(self.x)


@_msg(10, ("op", "uint"), ("x", "tensor"))
class Logits(Message):
    """Worker -> master: my slice for gather ``op`` (logits, usually)."""

    op: int
    x: np.ndarray
    seq: int = 0


@_msg(11)
class Heartbeat(Message):
    """Either direction on the control channel: I am alive."""


@_msg(12, ("slot", "uint"), ("keep", "uint"))
class Truncate(Message):
    """Master -> workers: forget positions keep.. of a KV slot (keep 0: a new conversation); a step in
    flight is abandoned. The KV rollback of speculative steps (issue 18) and of a freed slot (17)."""

    slot: int
    keep: int


@_msg(13, ("reason", "str"), ("rejoin", "bool"))
class Stop(Message):
    """Master -> workers: leave the step loop, and with rejoin join again at once (the group is re-planned
    and each gets a new Assign); worker -> master: I am leaving."""

    reason: str
    rejoin: bool = False


@_msg(14, ("offset", "uint"), ("payload", "tensor"))
class Probe(Message):
    """Master -> joined device on the control channel: echo this at once (link round trip and bandwidth)."""

    offset: int
    payload: np.ndarray

    def check(self) -> None:
        _need(self.payload.dtype == np.uint8 and self.payload.ndim == 1, "probe payload must be 1-D u8")


@_msg(15, ("offset", "uint"))
class ProbeEcho(Message):
    """Device -> master: the echo of Probe `offset`, without its payload."""

    offset: int


# ---- codec ----

def encode_header(msg_type: int, seq: int, values: list, descs: list) -> bytes:
    """The msgpack header frame; hot paths precompute it to compare received headers byte for byte."""
    return msgpack.packb([PROTOCOL_VERSION, msg_type, seq, values, descs], use_bin_type=True)


def header_packer() -> Callable[[int, int, list, list], bytes]:
    """encode_header with one reused msgpack Packer (half the cost); for a single thread's use."""
    pack = msgpack.Packer(use_bin_type=True).pack
    return lambda msg_type, seq, values, descs: pack([PROTOCOL_VERSION, msg_type, seq, values, descs])


def encode(msg: Message) -> list:
    """Message -> multipart frames [header, buffers...]; arrays go out without copying."""
    values, bufs, descs = [], [], []
    for name, kind in msg.SPEC:
        v = getattr(msg, name)
        if kind == "tensor":
            a = np.ascontiguousarray(v)
            descs.append([wire_dtype_of(a), list(a.shape)])
            bufs.append(a.data if a.size else b"")
        else:
            values.append(v)
    try:
        header = encode_header(msg.TYPE, getattr(msg, "seq", 0), values, descs)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{type(msg).__name__} cannot be encoded: {e}; send plain numbers, "
                            "strings, lists and dicts") from e
    return [header, *bufs]


def _nbytes(frame: object) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


_MAX_DIM = 1 << 40


def _decode_tensor(desc: object, frame: object, max_frame: int) -> np.ndarray:
    # Plain ifs, not _need(): error texts are built only on failure (hot path).
    if not (isinstance(desc, list) and len(desc) == 2):
        raise ProtocolError("buffer descriptor must be [dtype, shape]")
    dt_name, shape = desc
    dt = WIRE_DTYPES.get(dt_name) if isinstance(dt_name, str) else None
    if dt is None:
        raise ProtocolError(f"dtype {dt_name!r} is not on the wire whitelist ({', '.join(WIRE_DTYPES)})")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise ProtocolError(f"shape {shape!r} must be a list of <= {MAX_NDIM} non-negative ints")
    count = 1
    for d in shape:  # type() is int also rules out bool
        if type(d) is not int or d < 0 or d > _MAX_DIM:
            raise ProtocolError(f"shape {shape!r} must be a list of <= {MAX_NDIM} non-negative ints")
        count *= d
    n = frame.nbytes if type(frame) is memoryview else len(frame)
    if n > max_frame:
        raise ProtocolError(f"buffer of {n} bytes exceeds the {max_frame}-byte frame limit")
    if count * dt.itemsize != n:
        raise ProtocolError(f"shape {shape} of {dt_name} needs {math.prod(shape) * dt.itemsize} bytes, frame has {n}")
    return np.frombuffer(frame, dtype=dt).reshape(shape)


def _fail(what: str) -> None:
    raise ProtocolError(what)


def decode(frames: Sequence[object], max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """Multipart frames (bytes-like) -> validated Message; raises only ProtocolError."""
    if not frames:
        _fail("empty message")
    raw = frames[0]
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        _fail("header frame is not bytes")
    if _nbytes(raw) > MAX_HEADER_BYTES:
        _fail(f"header exceeds {MAX_HEADER_BYTES} bytes")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many types for bad input; all mean the same here
        raise ProtocolError(f"header is not valid msgpack ({type(e).__name__}: {e})") from e
    if not (isinstance(header, list) and len(header) == 5):
        _fail("header must be a 5-element list")
    version, type_code, seq, values, descs = header
    cls = MESSAGE_TYPES.get(type_code) if isinstance(type_code, int) else None
    if cls is None:
        _fail(f"unknown message type {type_code!r}")
    if version != PROTOCOL_VERSION and cls is not Refuse:
        raise VersionMismatch(version, PROTOCOL_VERSION)
    if not (type(seq) is int and seq >= 0):
        _fail(f"sequence number must be a non-negative int, got {seq!r}")
    if not (isinstance(values, list) and isinstance(descs, list)):
        _fail("header fields and buffers must be lists")
    scalars, tensors = _LAYOUT[cls]
    if len(values) != len(scalars):
        _fail(f"{cls.__name__} needs {len(scalars)} fields, got {len(values)}")
    if not len(descs) == len(tensors) == len(frames) - 1:
        _fail(f"{cls.__name__} needs {len(tensors)} buffers, header lists {len(descs)}, "
              f"got {len(frames) - 1} frames")
    kwargs = {}
    for (name, kind), v in zip(scalars, values):
        if not _KIND_OK[kind](v):
            _check_kind(kind, name, v)  # raises with the field named
        kwargs[name] = v
    for name, desc, frame in zip(tensors, descs, frames[1:]):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            _fail("buffer frame is not bytes")
        kwargs[name] = _decode_tensor(desc, frame, max_frame)
    if cls in _HAS_SEQ:
        kwargs["seq"] = seq
    msg = cls(**kwargs)
    msg.check()
    return msg


# Per-type layout computed once: (header fields with kinds, tensor field names).
_LAYOUT = {
    cls: (tuple((n, k) for n, k in cls.SPEC if k != "tensor"), tuple(n for n, k in cls.SPEC if k == "tensor"))
    for cls in MESSAGE_TYPES.values()
}
_HAS_SEQ = frozenset(cls for cls in MESSAGE_TYPES.values() if any(f.name == "seq" for f in fields(cls)))
