"""Datatypes (Open Inference Protocol <-> numpy <-> ONNX), shape checks and zero-copy tensor views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from appliance.errors import InvalidInput, RequestTooLarge

# OIP datatype -> numpy dtype; BYTES is an object array of `bytes`. Little-endian as the protocol says.
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
NUMPY_TO_OIP: dict[np.dtype, str] = {dtype: name for name, dtype in OIP_TO_NUMPY.items()}

# ONNX's tensor(...) type strings as ONNX Runtime reports them.
ONNX_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}

DYNAMIC = -1


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype name; InvalidInput for names we cannot carry."""
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInput(
            f"datatype {datatype!r} is not supported; expected one of {', '.join(OIP_TO_NUMPY)}"
        ) from None


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (str/bytes/object arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no inference-protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


@dataclass(frozen=True, slots=True)
class ShapeLimits:
    """Bounds on a declared tensor shape, checked before anything is allocated for it."""

    max_rank: int = 16
    max_elements: int = 64 * 1024 * 1024
    max_bytes_elements: int = 1024 * 1024  # BYTES: one Python object of 33 bytes or more per element

    def check(self, name: str, shape: Sequence[int], datatype: str | None = None) -> None:
        """InvalidInput for too many dimensions; RequestTooLarge for too many elements. A zero
        dimension counts as 1, so that [0, 1e10, 1e10] cannot ask for a huge per-row buffer."""
        if len(shape) > self.max_rank:
            raise InvalidInput(
                f"input {name!r} has {len(shape)} dimensions; at most {self.max_rank} are accepted "
                "(server.max_tensor_rank)"
            )
        count = 1
        for dim in shape:
            count *= max(dim, 1)
            if count > self.max_elements:
                raise RequestTooLarge(
                    f"input {name!r} shape {list(shape)} has more than {self.max_elements} elements "
                    "(server.max_tensor_elements)"
                )
        if datatype == "BYTES" and count > self.max_bytes_elements:
            raise RequestTooLarge(
                f"input {name!r} shape {list(shape)} has more than {self.max_bytes_elements} BYTES "
                "elements (server.max_bytes_elements); each is a separate object in memory"
            )


def format_shape(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join("N" if d == DYNAMIC else str(d) for d in shape) + "]"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model: name, OIP datatype and shape (-1 = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return OIP_TO_NUMPY[self.datatype]

    def check(self, datatype: str, shape: Sequence[int], *, max_rows: int | None = None) -> None:
        """Raise InvalidInput naming this input, the value sent and what the model expects."""
        if datatype != self.datatype:
            raise InvalidInput(f"input {self.name!r} has datatype {datatype}; model expects {self.datatype}")
        expected = self.describe(max_rows)
        if len(shape) != len(self.shape) or any(
            want != DYNAMIC and got != want for got, want in zip(shape, self.shape, strict=False)
        ):
            raise InvalidInput(
                f"input {self.name!r} has shape {format_shape(shape)}; model expects {expected}"
            )
        if any(dim < 0 for dim in shape):
            raise InvalidInput(f"input {self.name!r} has negative dimension in {list(shape)}")
        if max_rows is not None and shape and shape[0] > max_rows:
            raise InvalidInput(f"input {self.name!r} has {shape[0]} rows; model expects {expected}")

    def describe(self, max_rows: int | None = None) -> str:
        text = format_shape(self.shape)
        if max_rows is not None and self.shape and self.shape[0] == DYNAMIC:
            text += f" with N <= {max_rows}"
        return text


def from_buffer(data: bytes | bytearray | memoryview, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """A read-only zero-copy view of raw little-endian tensor bytes (BYTES are decoded, not viewed)."""
    if datatype == "BYTES":
        return decode_bytes_tensor(data, shape)
    dtype = numpy_dtype(datatype)
    expected = element_count(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"binary data of {len(data)} bytes does not match {datatype} shape {list(shape)}, "
            f"which needs {expected} bytes"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_bytes_tensor(data: bytes | bytearray | memoryview, shape: Sequence[int]) -> np.ndarray:
    """BYTES binary form: each element is a 4-byte little-endian length followed by its bytes.

    The walk stops at the shape's count: data that holds more elements (or any byte after the last) is
    refused then, not after every element of it has been made, so the work is bounded by the shape the
    model's limits checked, never by the data (8 MiB of empty elements were 2 Mi objects, 3.6 s)."""
    view = memoryview(data)
    count = element_count(shape)
    items: list[bytes] = []
    offset = 0
    while len(items) < count:
        if offset == len(view):
            raise InvalidInput(f"BYTES tensor has {len(items)} elements; shape {list(shape)} needs {count}")
        if offset + 4 > len(view):
            raise InvalidInput(f"BYTES tensor truncated: length prefix at byte {offset} is incomplete")
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(
                f"BYTES tensor truncated: element {len(items)} declares {length} bytes, "
                f"{len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InvalidInput(
            f"BYTES tensor has more data than shape {list(shape)} holds: {len(view) - offset} bytes "
            f"remain after its {count} elements"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    """The BYTES binary form of an array of bytes or str."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def to_bytes(array: np.ndarray) -> bytes | memoryview:
    """Raw little-endian bytes of a tensor for the binary extension; zero-copy when contiguous."""
    if array.dtype.kind in "OSU":
        return encode_bytes_tensor(array)
    if array.size == 0:
        return b""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
