"""KServe v2 inference request/response codecs: JSON, the binary tensor extension and Triton's
shared-memory parameters, both ways (Triton's classification of outputs: classification.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import bulk_json, nonfinite
from appliance.protocol.classification import MAX_CLASSES
from appliance.protocol.shared_memory import RegionRef, Regions, region_ref, write_region
from appliance.protocol.tensor_data import from_json_data, json_data

# https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
# and Triton's binary tensor data extension (docs/protocol/extension_binary_data.md).
HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output
    region: RegionRef | None = None  # written into shared memory, answered without data
    class_count: int = 0  # answered as its top classes (Triton's classification); 0: as the model answers


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
    str.isdigit() also takes '²', which int() refuses); None when absent, InvalidInput when not one.
    Leading zeros are allowed, as HTTP allows them in Content-Length; 19 digits remain after them."""
    if raw is None:
        return None
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    text = text.strip(" \t")
    significant = text.lstrip("0") or text[-1:]
    if not text or len(significant) > 19 or not text.isascii() or not text.isdigit():
        raise InvalidInput(f"{what} {text[:40]!r} is not a non-negative integer in ASCII digits")
    return int(significant)


class Payload:
    """The binary tensor data inputs take in turn: after the JSON header (one part, each input taking
    its binary_data_size) or gRPC's raw_input_contents (one part per input, taken whole)."""

    def __init__(self, parts: Sequence[memoryview], *, is_split: bool = False) -> None:
        self._parts = list(parts)
        self._is_split = is_split  # one part per input (gRPC) rather than one to slice (HTTP)
        self._offset = 0

    def take(self, name: str, size: int) -> memoryview:
        if self._is_split:
            part = self._parts.pop(0) if self._parts else memoryview(b"")
            if len(part) != size:  # the gRPC framing declares each part's own size: never so
                raise InvalidInput(f"input {name!r} declares {size} bytes; its raw part has {len(part)}")
            return part
        part = self._parts[0] if self._parts else memoryview(b"")
        remaining = len(part) - self._offset
        if size > remaining:
            raise InvalidInput(
                f"input {name!r} declares binary_data_size {size}; only {remaining} bytes remain"
            )
        self._offset += size
        return part[self._offset - size : self._offset]

    def check_claimed(self) -> None:
        unclaimed = sum(len(p) for p in self._parts) - (0 if self._is_split else self._offset)
        if unclaimed or (self._is_split and self._parts):
            raise InvalidInput(f"request carries {unclaimed} bytes of binary data that no input claims")


def decode_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None = None,
    *,
    limits: tensors.ShapeLimits = _NO_LIMITS,
    expect: Expectation | None = None,
    regions: Regions | None = None,
) -> InferenceRequest:
    """Decode a v2 request; `header_length` is the Inference-Header-Content-Length header, if sent.

    Every input's declared shape passes `limits`, then `expect`, before its data is touched. Inputs
    and outputs may name shared-memory regions only where `regions` is given.
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
        document = nonfinite.loads(header, bulk_json.loads)
    except orjson.JSONDecodeError as exc:
        hint = "" if header_length is not None else " (binary data needs Inference-Header-Content-Length)"
        raise InvalidInput(f"request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"request must be a JSON object, got {type(document).__name__}")
    return decode_document(document, Payload([binary]), limits=limits, expect=expect, regions=regions)


def decode_document(
    document: dict[str, Any],
    payload: Payload,
    *,
    limits: tensors.ShapeLimits = _NO_LIMITS,
    expect: Expectation | None = None,
    regions: Regions | None = None,
) -> InferenceRequest:
    """A request from its JSON document (or gRPC's, in the same shape) and its binary data."""
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {request_id!r}")
    parameters = _parameters(document.get("parameters"), "request")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request 'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        name, array = _decode_input(raw, payload, limits, expect, regions)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears more than once")
        inputs[name] = array
    payload.check_claimed()
    return InferenceRequest(
        inputs=inputs,
        id=request_id,
        outputs=_requested_outputs(document.get("outputs"), regions),
        parameters=parameters,
    )


def _decode_input(
    raw: Any,
    payload: Payload,
    limits: tensors.ShapeLimits = _NO_LIMITS,
    expect: Expectation | None = None,
    regions: Regions | None = None,
) -> tuple[str, np.ndarray]:
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
    limits.check(name, shape, datatype)
    if expect is not None:
        expect(name, datatype, shape)
    owner = f"input {name!r}"
    parameters = _parameters(raw.get("parameters"), owner)
    size = parameters.get("binary_data_size")
    region = region_ref(parameters, owner, regions)
    if ("data" in raw) + (size is not None) + (region is not None) > 1:
        raise InvalidInput(f"{owner} has more than one of 'data', binary_data_size and shared_memory_region")
    if region is not None:
        assert regions is not None
        return name, _from_buffer(owner, regions.read(region), datatype, shape)  # a copy: see Regions
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInput(f"{owner} binary_data_size must be a non-negative integer")
        return name, _from_buffer(owner, payload.take(name, size), datatype, shape)
    if "data" not in raw:
        raise InvalidInput(
            f"{owner} has neither 'data' nor parameters.binary_data_size nor shared_memory_region"
        )
    return name, from_json_data(name, raw["data"], datatype, shape)


def _from_buffer(owner: str, data: memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    try:
        return tensors.from_buffer(data, datatype, shape)
    except InvalidInput as exc:
        raise InvalidInput(f"{owner}: {exc}") from None


def _requested_outputs(raw: Any, regions: Regions | None) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("request 'outputs' must be a list")
    outputs = []
    class_counts: dict[str, int] = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"each requested output needs a 'name' string, got {item!r:.80}")
        owner = f"output {item['name']!r}"
        parameters = _parameters(item.get("parameters"), owner)
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"{owner} binary_data must be true or false")
        region = region_ref(parameters, owner, regions)
        class_count = _class_count(parameters, owner)
        if region is not None:
            if binary:  # tritonclient sends binary_data false beside a region
                raise InvalidInput(f"{owner} sets both shared_memory_region and binary_data true")
            if class_count:
                raise InvalidInput(
                    f"{owner} sets both shared_memory_region and classification; a region holds the "
                    "tensor as the model answers it (as Triton), ask for its classes without one"
                )
            assert regions is not None
            regions.check(region, writable=True)  # a region that cannot take it fails before compute
        asked = class_counts.setdefault(item["name"], class_count)
        if asked != class_count:
            raise InvalidInput(
                f"{owner} is requested twice, with classification {asked} and {class_count}; "
                "an answer holds one tensor of each name"
            )
        outputs.append(RequestedOutput(item["name"], binary, region, class_count))
    return outputs


def named_once(outputs: list[RequestedOutput] | None) -> frozenset[str] | None:
    """The names of the outputs asked for (None: all), or InvalidInput for one asked twice: where only
    one answer of each name may come back (a node's answer to a gateway: decode_response), or where
    each copy would be written (a pool job, so that a few bytes of request could make a node write any
    multiple of its largest output). One pass: a request may name thousands."""
    if not outputs:
        return None
    seen: set[str] = set()
    for output in outputs:
        if output.name in seen:
            raise InvalidInput(
                f"output {output.name!r} is requested twice; an answer holds one tensor of each name"
            )
        seen.add(output.name)
    return frozenset(seen)


def _class_count(parameters: Mapping[str, Any], owner: str) -> int:
    """parameters.classification: how many classes to answer, 0 (or absent) for the tensor itself, as
    Triton's HTTP endpoint reads it (its gRPC endpoint refuses 0; tritonclient never sends 0)."""
    value = parameters.get("classification", 0)
    if type(value) is not int or not 0 <= value <= MAX_CLASSES:
        raise InvalidInput(
            f"{owner} classification must be an integer from 0 to {MAX_CLASSES} (the number of classes to "
            f"answer), got {value!r:.40}"
        )
    return value


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
    regions: Regions | None = None,
) -> EncodedResponse:
    """Encode outputs in the order the client asked for them (or the model's order); those it placed
    in shared memory are written there and answered without data."""
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    blobs: list[bytes | memoryview] = []
    entries = []
    for requested in wanted_outputs(request, outputs):
        array = outputs[requested.name]
        binary = request.binary_output if requested.binary is None else requested.binary
        if requested.region is not None:
            assert regions is not None
            entry = tensor_entry(requested.name, array, binary=False, blobs=blobs, is_described=True)
            entry["parameters"] = write_region(regions, requested.region, requested.name, array)
        else:
            entry = tensor_entry(requested.name, array, binary=binary, blobs=blobs)
        entries.append(entry)
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return EncodedResponse([header], None)
    return EncodedResponse([header, *blobs], len(header))


def wanted_outputs(request: InferenceRequest, outputs: Mapping[str, np.ndarray]) -> list[RequestedOutput]:
    """What the client asked for, in its order; every output, in the model's order, if it asked none."""
    return request.outputs or [RequestedOutput(name) for name in outputs]


def tensor_entry(
    name: str,
    array: np.ndarray,
    *,
    binary: bool,
    blobs: list[bytes | memoryview],
    is_described: bool = False,
) -> dict[str, Any]:
    """One tensor of a request or response document: name, datatype, shape, then its data as JSON or,
    binary, as `binary_data_size` with the bytes appended to `blobs`; none when only `is_described`."""
    entry: dict[str, Any] = {
        "name": name,
        "datatype": tensors.oip_datatype(array.dtype),
        "shape": list(array.shape),
    }
    if is_described:
        return entry
    if binary:
        blob = tensors.to_bytes(array)
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    else:
        entry["data"] = json_data(array)
    return entry


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
    blobs: list[bytes | memoryview] = []
    document["inputs"] = [tensor_entry(n, a, binary=binary, blobs=blobs) for n, a in inputs.items()]
    if outputs is not None:
        document["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_output}} for name in outputs
        ]
    elif binary_output:
        document.setdefault("parameters", {})["binary_data_output"] = True
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return EncodedResponse([header, *blobs], len(header) if blobs else None)


def decode_response(body: bytes | memoryview, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Decode a v2 response into arrays (the client side: a pool node's or a box's answer, both
    untrusted); raises InvalidInput on a malformed one, whatever its JSON holds.

    An output named twice is malformed: readers disagree on which one counts (tritonclient takes the
    first, a dict built in order the last), so a node could have one checked and the other read."""
    view = memoryview(body)
    if header_length is not None and not 0 <= header_length <= len(view):
        raise InvalidInput(f"response header length is {header_length}; the answer has {len(view)} bytes")
    header = view if header_length is None else view[:header_length]
    binary = view[len(view) :] if header_length is None else view[header_length:]
    try:
        document = nonfinite.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"response is not valid JSON: {exc}") from None
    return response_outputs(response_entries(document), binary)


def response_entries(document: Any) -> list[Any]:
    """The `outputs` entries of a parsed v2 response (not yet decoded); InvalidInput for a document that
    is not a response, or one that says `error`."""
    if not isinstance(document, dict):
        raise InvalidInput(f"response must be a JSON object, got {type(document).__name__}")
    if "error" in document:
        error = document["error"]
        raise InvalidInput(error[:1000] if isinstance(error, str) else "the response is an error")
    raw_outputs = document.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidInput(f"response 'outputs' must be a list, got {type(raw_outputs).__name__}")
    return raw_outputs


def response_outputs(raw_outputs: list[Any], binary: memoryview) -> dict[str, np.ndarray]:
    """A response's `outputs` entries decoded into arrays (binary ones as views of `binary`, the bytes
    after its header), each as an input is decoded."""
    payload = Payload([binary])
    arrays: dict[str, np.ndarray] = {}
    for raw in raw_outputs:
        name, array = _decode_input(raw, payload)
        if name in arrays:
            raise InvalidInput(f"output {name!r} appears more than once in the response")
        arrays[name] = array
    return arrays
