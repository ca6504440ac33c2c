"""A tensor's data as JSON values, both ways: typed, range-checked arrays from JSON lists (or the
arrays bulk_json and gRPC's typed contents hand over), and flat JSON-serialisable views back."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import nonfinite

# Numeric data of more elements than this is written a slice of this many at a time, each slice one
# orjson call, and the slices' text joined. One call holds the GIL from start to end (25 ms for a
# million FP32 elements on 2 EPYC vCPUs), and every other thread waits: the event loop that serves the
# line, or a gateway's buyers. Between two calls the GIL can pass (after sys.getswitchinterval()). A
# slice takes at most about 0.45 ms (FP16 and FP32 at 26 ns an element, INT64 15, BOOL 3; 0.6 ms with
# NaN tokens); more slices cost no more orjson time, only the join (bench/json_gil.py).
SLICE_ELEMENTS = 16 * 1024


def from_json_data(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    count = tensors.element_count(shape)
    if not isinstance(data, list | np.ndarray):  # bulk_json hands big numeric data over as an array
        data = [data]
    try:
        if datatype == "BYTES":
            array = np.array(data, dtype=object).reshape(-1)
            for index, item in enumerate(array):
                if type(item) is not bytes:
                    array[index] = _to_bytes(name, item)
        elif datatype == "BOOL":
            array = np.asarray(data)
            if array.dtype != np.bool_ and array.size:
                raise InvalidInput(f"input {name!r} is BOOL; data must be true/false")
        elif datatype.startswith(("INT", "UINT")):
            array = _integers(name, data, datatype)
        else:
            array = _floats(name, data, datatype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r} data does not fit {datatype} shape {shape}: {exc}") from None
    if array.size != count:
        raise InvalidInput(f"input {name!r} has {array.size} values; shape {shape} needs {count}")
    return array.astype(tensors.numpy_dtype(datatype), copy=False).reshape(shape)


def _integers(name: str, data: list[Any], datatype: str) -> np.ndarray:
    array = np.asarray(data)
    if array.dtype.kind not in "iu" and array.size:
        # numpy falls back to float or object above int64's range; accept only real integers there
        flat = np.array(data, dtype=object).reshape(-1)
        if not all(type(item) is int for item in flat):
            raise InvalidInput(f"input {name!r} is {datatype}; data must be integers")
        array = flat
    info = np.iinfo(tensors.numpy_dtype(datatype))
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise InvalidInput(f"input {name!r} has values outside {datatype}'s range [{info.min}, {info.max}]")
    return array


def _floats(name: str, data: list[Any], datatype: str) -> np.ndarray:
    array = np.asarray(data)
    if array.dtype.kind not in "fiu" and array.size:
        raise InvalidInput(f"input {name!r} is {datatype}; data must be numbers")
    with np.errstate(over="ignore"):
        converted = array.astype(tensors.numpy_dtype(datatype), copy=False)
    if converted.dtype != array.dtype and np.isinf(converted).sum() != np.isinf(array).sum():
        limit = np.finfo(converted.dtype).max
        raise InvalidInput(f"input {name!r} has values outside {datatype}'s range (|x| <= {limit:g})")
    return converted


def _to_bytes(name: str, item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytes):  # gRPC's bytes_contents
        return item
    raise InvalidInput(f"input {name!r} is BYTES; data must be strings, got {item!r:.40}")


def json_data(array: np.ndarray) -> Any:
    """A flat row-major JSON-serialisable view (orjson serialises numpy natively), or past
    SLICE_ELEMENTS numbers the same text written a slice at a time; a float array that holds NaN or an
    infinity is written with the tokens Triton writes, where orjson would write null."""
    if array.dtype.kind in "OSU":
        return [_text(item) for item in array.reshape(-1)]
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.size > SLICE_ELEMENTS:
        return _sliced(flat)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return nonfinite.fragment(flat)
    return flat


def _sliced(flat: np.ndarray) -> orjson.Fragment:
    """`flat` written a slice at a time (see SLICE_ELEMENTS): the bytes one call writes, since orjson
    writes each element on its own, "[a,b]" and "[c]" joined as "[a,b,c]"."""
    write = _numbers
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        write = nonfinite.written
    inner = [
        write(flat[start : start + SLICE_ELEMENTS])[1:-1] for start in range(0, flat.size, SLICE_ELEMENTS)
    ]
    inner[0] = b"[" + inner[0]
    inner[-1] += b"]"
    # Only bytes in the list, no memoryview: bytes.join then lets the GIL go while it copies more
    # than a megabyte (CPython's stringlib/join.h), where a memoryview makes it keep the GIL.
    return orjson.Fragment(b",".join(inner))


def _numbers(flat: np.ndarray) -> bytes:
    return orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)


def _text(item: Any) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                "a BYTES output holds bytes that are not UTF-8 text; request it with binary_data: true"
            ) from None
    return str(item)
