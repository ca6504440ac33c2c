"""KServe v2 inference request/response codecs: JSON and the binary tensor extension, both ways."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import bulk_json

# https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
# and Triton's binary tensor data extension (docs/protocol/extension_binary_data.md).
HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output


@dataclass(slots=True)
class InferenceRequest:
    """A decoded request: inputs as numpy arrays of their declared datatype and shape."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None = every output
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True

    @property
    def priority(self) -> int:
        return _non_negative_int(self.parameters, "priority", default=0)

    @property
    def timeout_us(self) -> int | None:
        value = _non_negative_int(self.parameters, "timeout", default=0)
        return value or None


@dataclass(slots=True)
class EncodedResponse:
    """Body parts ready to send, the header length when binary parts follow the JSON."""

    parts: list[bytes | memoryview]
    header_length: int | None

    @property
    def content_type(self) -> str:
        return JSON_TYPE if self.header_length is None else BINARY_TYPE

    def body(self) -> bytes:
        return b"".join(self.parts)


# Called with (input name, datatype, shape) as declared, before its data is decoded: the data plane
# checks them against the model, so that nothing is decoded for a request the model would refuse.
Expectation = Callable[[str, str, list[int]], None]
_NO_LIMITS = tensors.ShapeLimits()


def decimal(raw: str | bytes | None, what: str) -> int | None:
    """A header or property holding a non-negative decimal count, parsed strictly (ASCII digits only:
    str.isdigit() also takes '²', which int() refuses); None when absent, InvalidInput when not one."""
    if raw is None:
        return None
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    text = text.strip(" \t")
    if not text or len(text) > 19 or not text.isascii() or not text.isdigit():
        raise InvalidInput(f"{what} {text[:40]!r} is not a non-negative integer in ASCII digits")
    return int(text)


def decode_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None = None,
    *,
    limits: tensors.ShapeLimits = _NO_LIMITS,
    expect: Expectation | None = None,
) -> InferenceRequest:
    """Decode a v2 request; `header_length` is the Inference-Header-Content-Length header, if sent.

    Every input's declared shape passes `limits`, then `expect`, before its data is touched.
    """
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[len(view) :]
    else:
        if header_length < 0 or header_length > len(view):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length}; body has {len(view)} bytes"
            )
        header, binary = view[:header_length], view[header_length:]
    try:
        document = bulk_json.loads(header)
    except orjson.JSONDecodeError as exc:
        hint = "" if header_length is not None else " (binary data needs Inference-Header-Content-Length)"
        raise InvalidInput(f"request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"request must be a JSON object, got {type(document).__name__}")
    return _request_from_document(document, binary, limits, expect)


def _request_from_document(
    document: dict[str, Any],
    binary: memoryview,
    limits: tensors.ShapeLimits = _NO_LIMITS,
    expect: Expectation | None = None,
) -> InferenceRequest:
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {request_id!r}")
    parameters = _parameters(document.get("parameters"), "request")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request 'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _decode_input(raw, binary[offset:], limits, expect)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears more than once")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InvalidInput(
            f"request carries {len(binary) - offset} bytes of binary data that no input claims"
        )
    return InferenceRequest(
        inputs=inputs,
        id=request_id,
        outputs=_requested_outputs(document.get("outputs")),
        parameters=parameters,
    )


def _decode_input(
    raw: Any,
    binary: memoryview,
    limits: tensors.ShapeLimits = _NO_LIMITS,
    expect: Expectation | None = None,
) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"each input must be a JSON object, got {raw!r:.80}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("every input needs a 'name' string")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r} needs a 'datatype' string")
    tensors.numpy_dtype(datatype)
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(
            f"input {name!r} 'shape' must be a list of non-negative integers, got {shape!r:.80}"
        )
    limits.check(name, shape)
    if expect is not None:
        expect(name, datatype, shape)
    parameters = _parameters(raw.get("parameters"), f"input {name!r}")
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
        if type(size) is not int or size < 0:
            raise InvalidInput(f"input {name!r} binary_data_size must be a non-negative integer")
        if size > len(binary):
            raise InvalidInput(
                f"input {name!r} declares binary_data_size {size}; only {len(binary)} bytes remain"
            )
        try:
            return name, tensors.from_buffer(binary[:size], datatype, shape), size
        except InvalidInput as exc:
            raise InvalidInput(f"input {name!r}: {exc}") from None
    if "data" not in raw:
        raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return name, _from_json_data(name, raw["data"], datatype, shape), 0


def _from_json_data(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    count = tensors.element_count(shape)
    if not isinstance(data, list | np.ndarray):  # bulk_json hands big numeric data over as an array
        data = [data]
    try:
        if datatype == "BYTES":
            flat = np.array(data, dtype=object).reshape(-1)
            array = np.empty(flat.size, dtype=object)
            array[:] = [_to_bytes(name, item) for item in flat]
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
    raise InvalidInput(f"input {name!r} is BYTES; data must be strings, got {item!r:.40}")


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("request 'outputs' must be a list")
    outputs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"each requested output needs a 'name' string, got {item!r:.80}")
        parameters = _parameters(item.get("parameters"), f"output {item['name']!r}")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output {item['name']!r} binary_data must be true or false")
        outputs.append(RequestedOutput(item["name"], binary))
    return outputs


def _parameters(raw: Any, owner: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{owner} 'parameters' must be a JSON object")
    return raw


def _non_negative_int(parameters: Mapping[str, Any], key: str, *, default: int) -> int:
    value = parameters.get(key, default)
    if type(value) is not int or value < 0:
        raise InvalidInput(f"parameter {key!r} must be a non-negative integer, got {value!r}")
    return value


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request: InferenceRequest,
    outputs: Mapping[str, np.ndarray],
) -> EncodedResponse:
    """Encode outputs in the order the client asked for them (or the model's order)."""
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    wanted = request.outputs or [RequestedOutput(name) for name in outputs]
    entries: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for requested in wanted:
        array = outputs[requested.name]
        entry: dict[str, Any] = {
            "name": requested.name,
            "datatype": tensors.oip_datatype(array.dtype),
            "shape": list(array.shape),
        }
        binary = request.binary_output if requested.binary is None else requested.binary
        if binary:
            blob = tensors.to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(array)
        entries.append(entry)
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return EncodedResponse([header], None)
    return EncodedResponse([header, *blobs], len(header))


def json_data(array: np.ndarray) -> Any:
    """A flat row-major JSON-serialisable view (orjson serialises numpy natively)."""
    if array.dtype.kind in "OSU":
        return [_text(item) for item in array.reshape(-1)]
    return np.ascontiguousarray(array).reshape(-1)


def _text(item: Any) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                "a BYTES output holds bytes that are not UTF-8 text; request it with binary_data: true"
            ) from None
    return str(item)


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: Sequence[str] | None = None,
    binary_output: bool = True,
    parameters: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> EncodedResponse:
    """Encode a request (the client side: pool jobs, `pool submit`, benchmarks and tests)."""
    document: dict[str, Any] = {}
    if request_id is not None:
        document["id"] = request_id
    if parameters:
        document["parameters"] = dict(parameters)
    entries, blobs = [], []
    for name, array in inputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": tensors.oip_datatype(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            blob = tensors.to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(array)
        entries.append(entry)
    document["inputs"] = entries
    if outputs is not None:
        document["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_output}} for name in outputs
        ]
    elif binary_output:
        document.setdefault("parameters", {})["binary_data_output"] = True
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return EncodedResponse([header, *blobs], len(header) if blobs else None)


def decode_response(body: bytes | memoryview, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Decode a v2 response into arrays (the client side); raises InvalidInput on a malformed one."""
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    binary = view[len(view) :] if header_length is None else view[header_length:]
    document = orjson.loads(header)
    if "error" in document:
        raise InvalidInput(str(document["error"]))
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for raw in document.get("outputs", []):
        name, array, used = _decode_input(raw, binary[offset:])
        arrays[name] = array
        offset += used
    return arrays
