"""GGUF file layout: header, typed key/values, tensor infos, then tensor data aligned to general.alignment.

Opening is cheap on purpose: metadata arrays (a tokenizer's ~50k tokens and merges) are walked by
their length prefixes and kept as (element type, count, offset) until someone asks for them, and
tensor data are views of one read-only mmap of the file. Little-endian GGUF versions 2 and 3.
"""
from __future__ import annotations

import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (32-bit counts and lengths) predates every model tpi can run
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9  # the two value types that are not fixed-size scalars

# value type id -> its little-endian encoding; ids 8 and 9 are STRING and ARRAY
_SCALARS = {
    t: struct.Struct(f"<{c}")
    for t, c in {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}.items()
}
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, key/value count
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_ARRAY_HEADER = struct.Struct("<IQ")  # element type, element count
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset

# tensor types stored as plain numbers; every other type is given as raw bytes, like gguf's reader
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (not a GGUF file, truncated, or corrupt)."""


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array left undecoded: element type id, element count, file offset of element 0."""

    elem_type: int
    count: int
    offset: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor: shape in GGUF order (fastest dimension first), data a view of the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute file offset
    data: np.ndarray  # numpy order; plain types as numbers, block-quantized types as uint8 rows of blocks


class _Cursor:
    """Bounds-checked little-endian reads from the start of a buffer."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def _past_end(self) -> GGUFFormatError:
        return GGUFFormatError(f"the metadata runs past the end of the file ({self.size} bytes)")

    def _need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise self._past_end()

    def unpack(self, fmt: struct.Struct) -> tuple:
        self._need(fmt.size)
        out = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return out

    def string(self) -> str:
        (n,) = self.unpack(_U64)
        self._need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"a metadata string at byte {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int):
        """A scalar or a string, decoded; an array, walked over and returned as a GGUFArray."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return self.unpack(scalar)[0]
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            elem_type, count = self.unpack(_ARRAY_HEADER)
            array = GGUFArray(elem_type, count, self.pos)
            self.skip(elem_type, count)
            return array
        raise GGUFFormatError(f"unknown metadata value type {vtype} at byte {self.pos}")

    def skip(self, elem_type: int, count: int) -> None:
        """Move past `count` array elements without building them."""
        scalar = _SCALARS.get(elem_type)
        if scalar is not None:
            self._need(count * scalar.size)
            self.pos += count * scalar.size
        elif elem_type == STRING:
            buf, pos, size, unpack_len = self.buf, self.pos, self.size, _U64.unpack_from
            for _ in range(count):  # one length prefix per string: ~50 ms for a 100k-entry vocabulary
                if pos + 8 > size:
                    raise self._past_end()
                pos += 8 + unpack_len(buf, pos)[0]
            if pos > size:
                raise self._past_end()
            self.pos = pos
        elif elem_type == ARRAY:
            for _ in range(count):
                self.skip(*self.unpack(_ARRAY_HEADER))
        else:
            raise GGUFFormatError(f"unknown metadata array element type {elem_type} at byte {self.pos}")

    def array(self, array: GGUFArray) -> list:
        """Decode an array's elements into Python values."""
        self.pos = array.offset
        scalar = _SCALARS.get(array.elem_type)
        if scalar is not None:
            self._need(array.count * scalar.size)
            dtype = np.dtype(scalar.format)
            return np.frombuffer(self.buf, dtype, array.count, self.pos).tolist()
        if array.elem_type == ARRAY:
            out = []
            for _ in range(array.count):
                elem_type, count = self.unpack(_ARRAY_HEADER)
                inner = GGUFArray(elem_type, count, self.pos)
                out.append(self.array(inner))
                self.pos = inner.offset
                self.skip(elem_type, count)
            return out
        if array.elem_type == STRING:
            return [self.string() for _ in range(array.count)]
        raise GGUFFormatError(f"unknown metadata array element type {array.elem_type}")


class GGUFFile:
    """A GGUF file opened for reading: `metadata` (arrays left as GGUFArray), `tensors`, `value(key)`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size == 0:
                raise GGUFFormatError("the file is empty")
            if f.read(4) != MAGIC:
                raise GGUFFormatError("it does not start with the GGUF magic bytes")
            if size < _HEADER.size:
                raise GGUFFormatError(f"the file has only {size} bytes, too few for the GGUF header")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = size
        cur = _Cursor(self._buf, size)
        _, self.version, n_tensors, n_kv = cur.unpack(_HEADER)
        if self.version not in VERSIONS:
            swapped = self.version & 0xFFFF == 0
            raise GGUFFormatError(
                "a big-endian GGUF file; tpi reads little-endian GGUF" if swapped
                else f"GGUF version {self.version}; tpi reads versions {' and '.join(map(str, VERSIONS))}"
            )
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > size:
            raise GGUFFormatError(
                f"the header lists {n_kv} key/values and {n_tensors} tensors, more than {size} bytes can hold"
            )
        self.metadata: dict[str, object] = {}
        self.value_types: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string()
            (vtype,) = cur.unpack(_U32)
            value = cur.value(vtype)
            if key in self.metadata:  # gguf's reader also keeps the first
                log.warning("%s: duplicate GGUF key %s; keeping the first value", self.path, key)
                continue
            self.metadata[key], self.value_types[key] = value, vtype
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        self.alignment = self._alignment()
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = [self._tensor(size, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise GGUFFormatError("two tensors have the same name")

    @staticmethod
    def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string()
        (n_dims,) = cur.unpack(_U32)
        dims = cur.unpack(struct.Struct(f"<{n_dims}Q"))
        type_id, offset = cur.unpack(_ARRAY_HEADER)
        return name, dims, type_id, offset

    def _alignment(self) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.value_types.get("general.alignment", 4) != 4 or not align:  # spec: a nonzero uint32
            raise GGUFFormatError(f"general.alignment is {align!r}, not a positive uint32")
        return int(align)

    def _tensor(self, size: int, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> GGUFTensor:
        try:
            ttype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFFormatError(f"tensor {name} has unknown type id {type_id}") from None
        if not dims:
            raise GGUFFormatError(f"tensor {name} has no dimensions")
        n_elements = math.prod(dims)
        block, block_bytes = GGML_QUANT_SIZES[ttype]
        np_shape = tuple(reversed(dims))  # numpy order: slowest dimension first
        if dims[0] % block:
            raise GGUFFormatError(f"tensor {name} has rows of {dims[0]} values, not whole {ttype.name} blocks")
        n_bytes = n_elements * block_bytes // block
        start = self.data_start + offset
        if start + n_bytes > size:
            raise GGUFFormatError(f"tensor {name} ends at byte {start + n_bytes} but the file has {size}")
        dtype = _PLAIN_DTYPES.get(ttype)
        if dtype is None:  # rows of whole blocks, as bytes
            dtype, np_shape = np.uint8, (*np_shape[:-1], np_shape[-1] // block * block_bytes)
        data = np.ndarray(np_shape, dtype=dtype, buffer=self._buf, offset=start)
        return GGUFTensor(name, ttype, tuple(dims), n_elements, n_bytes, start, data)

    def value(self, key: str, default=None):
        """A metadata value as Python data (arrays decoded to lists), or `default` if the key is absent."""
        v = self.metadata.get(key, default)
        return _Cursor(self._buf, self._size).array(v) if isinstance(v, GGUFArray) else v
