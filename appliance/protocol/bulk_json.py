"""Big numeric JSON tensors without a Python object per number.

orjson turns every number of an input's `"data": [...]` into a Python float or int, which numpy then copies
into an array: about 70 ns a number, 11 ms for one 3x224x224 FP32 image on the event loop. simdjson parses
the document into its tape and exports a numeric array straight into a buffer: 3.8 ms for the same image
(`bench/README.md`). `loads` returns what `orjson.loads` would, except that the `data` of each input whose
datatype is numeric is already a flat numpy array (float64, int64 or uint64) in row-major order; the codec
checks its count against the shape and converts it to the datatype as it does a list.

Anything unusual (invalid JSON, booleans or strings among the numbers, values out of range) goes back to
orjson and the ordinary path, so error messages are the same whichever path a document took.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

try:
    import simdjson
except ImportError:  # pragma: no cover - pysimdjson ships wheels for x86_64 and aarch64 Linux
    simdjson = None

# Below this orjson is as fast and the whole document is plain Python.
BULK_BYTES = 64 * 1024

_FLOATS = ("d", np.float64)
_SIGNED = ("i", np.int64)
_BUFFER_TYPES: dict[str, tuple[str, type[np.generic]]] = {
    "FP16": _FLOATS,
    "FP32": _FLOATS,
    "FP64": _FLOATS,
    "INT8": _SIGNED,
    "INT16": _SIGNED,
    "INT32": _SIGNED,
    "INT64": _SIGNED,
    "UINT8": _SIGNED,
    "UINT16": _SIGNED,
    "UINT32": _SIGNED,
    "UINT64": ("u", np.uint64),
}


def loads(text: bytes | bytearray | memoryview) -> Any:
    """The JSON document, numeric input data as numpy arrays when the document is big enough to matter."""
    if simdjson is None or len(text) < BULK_BYTES:
        return orjson.loads(text)
    try:
        parsed = simdjson.Parser().parse(bytes(text))
    except (ValueError, TypeError, RuntimeError):  # RuntimeError: simdjson's DEPTH_ERROR and kin
        return orjson.loads(text)  # raises with orjson's message, as for a small document
    if not isinstance(parsed, simdjson.Object):
        return _plain(parsed)
    document = {key: _plain(parsed[key]) for key in parsed if key != "inputs"}
    if "inputs" in parsed:
        inputs = parsed["inputs"]
        document["inputs"] = (
            [_input(item) for item in inputs] if isinstance(inputs, simdjson.Array) else _plain(inputs)
        )
    return document


def _input(item: Any) -> Any:
    if not isinstance(item, simdjson.Object):
        return _plain(item)
    entry = {key: _plain(item[key]) for key in item if key != "data"}
    if "data" in item:
        entry["data"] = _data(item["data"], entry.get("datatype"))
    return entry


def _data(data: Any, datatype: Any) -> Any:
    if datatype == "BYTES" and isinstance(data, simdjson.Array):
        return _texts(data)
    buffer_type = _BUFFER_TYPES.get(datatype) if isinstance(datatype, str) else None
    if buffer_type is None or not isinstance(data, simdjson.Array):
        return _plain(data)
    code, dtype = buffer_type
    try:
        return np.frombuffer(data.as_buffer(of_type=code), dtype=dtype)
    except (ValueError, TypeError):
        return data.as_list()  # booleans, strings, nulls or out-of-range values: the codec names them


def _texts(data: Any) -> Any:
    """BYTES data as the bytes the codec makes of its strings, each string dropped as soon as it is
    encoded: a list of str and then one of bytes would hold both at once (a 2-byte string costs 51 bytes
    as a str, 35 as bytes). Anything else (nested lists, numbers, a lone surrogate) goes as a list."""
    texts = []
    try:
        for item in data:
            if not isinstance(item, str):
                return data.as_list()
            texts.append(item.encode())
    except UnicodeEncodeError:
        return data.as_list()
    return texts


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Array):
        return value.as_list()
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    return value
