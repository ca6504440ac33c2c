"""ModelInferRequest and ModelInferResponse <-> the codec: the gRPC framing of the data plane.

A request becomes the same document an HTTP body holds (inputs, outputs, parameters) with its
raw_input_contents as the binary parts, so it meets the same checks in the same order; the answer
carries every output in raw_output_contents (empty for one written into shared memory, as Triton).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import codec
from appliance.protocol.shared_memory import Regions, write_region
from appliance.server.grpc import messages

# InferTensorContents' field for each datatype (FP16 and BF16 have none: they travel raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters(entries: Mapping[str, Any]) -> dict[str, Any]:
    """A map<string, InferParameter> as plain values (what JSON would carry)."""
    found = {}
    for key, value in entries.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            found[key] = getattr(value, choice)
    return found


def set_parameters(entries: Any, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            entries[key].bool_param = value
        elif isinstance(value, int):
            entries[key].int64_param = value
        else:
            entries[key].string_param = str(value)


class GrpcFraming:
    """One parsed ModelInferRequest as the data plane's Framing (the plane has already bounded the
    serialised size it came in); `raw` holds its raw_input_contents when wire.py took them out."""

    def __init__(self, message: Any, raw: list[memoryview] | None = None) -> None:
        self.message = message
        self.raw = raw

    def decode(
        self,
        body: bytes | bytearray | memoryview,
        header_length: int | None,
        *,
        limits: tensors.ShapeLimits,
        expect: codec.Expectation,
        regions: Regions | None,
    ) -> codec.InferenceRequest:
        message = self.message
        raw = self.raw if self.raw is not None else [memoryview(p) for p in message.raw_input_contents]
        inputs, taken = [], 0
        for tensor in message.inputs:
            entry, takes_raw = _input(tensor, has_raw=bool(raw))
            if takes_raw:  # Triton's rule: the next part, in input order
                if taken == len(raw):
                    raise InvalidInput(
                        f"input {tensor.name!r} has no data: no contents, no shared_memory_region and "
                        f"no raw_input_contents entry left ({len(raw)} for {len(message.inputs)} inputs)"
                    )
                entry["parameters"]["binary_data_size"] = len(raw[taken])
                taken += 1
            inputs.append(entry)
        if taken < len(raw):
            raise InvalidInput(
                f"request carries {len(raw)} raw_input_contents; only {taken} input(s) take one"
            )
        document: dict[str, Any] = {"inputs": inputs, "parameters": parameters(message.parameters)}
        if message.id:
            document["id"] = message.id
        if message.outputs:
            document["outputs"] = [
                {"name": o.name, "parameters": parameters(o.parameters)} for o in message.outputs
            ]
        payload = codec.Payload(raw, is_split=True)
        return codec.decode_document(document, payload, limits=limits, expect=expect, regions=regions)

    def encode(
        self,
        *,
        model_name: str,
        model_version: str,
        request: codec.InferenceRequest,
        outputs: Mapping[str, np.ndarray],
        regions: Regions | None,
    ) -> codec.EncodedResponse:
        response = messages.ModelInferResponse(
            model_name=model_name, model_version=model_version, id=request.id or ""
        )
        for requested in codec.wanted_outputs(request, outputs):
            array = outputs[requested.name]
            tensor = response.outputs.add(
                name=requested.name, datatype=tensors.oip_datatype(array.dtype), shape=array.shape
            )
            if requested.region is not None:
                assert regions is not None
                written = write_region(regions, requested.region, requested.name, array)
                set_parameters(tensor.parameters, written)
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(bytes(tensors.to_bytes(array)))
        return codec.EncodedResponse([response.SerializeToString()], None)


def _input(tensor: Any, *, has_raw: bool) -> tuple[dict[str, Any], bool]:
    """One input as a JSON-shaped entry (contents as 'data'), and whether its data is a raw part."""
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    given = parameters(tensor.parameters)
    if "binary_data_size" in given:
        raise InvalidInput(
            f"input {tensor.name!r}: binary_data_size is HTTP's; over gRPC send raw_input_contents"
        )
    entry["parameters"] = given
    if tensor.HasField("contents"):
        if has_raw:
            raise InvalidInput(
                f"input {tensor.name!r} has contents while the request has raw_input_contents; use one"
            )
        entry["data"] = _contents(tensor.name, tensor.datatype, tensor.contents)
        return entry, False
    return entry, "shared_memory_region" not in given


def _contents(name: str, datatype: str, contents: Any) -> Any:
    expected = CONTENTS.get(datatype)
    used = [field.name for field, _ in contents.ListFields()]
    if expected is None or any(field != expected for field in used):
        where = f"in {expected}" if expected else "in raw_input_contents (no contents field has it)"
        raise InvalidInput(f"input {name!r} is {datatype}; its values go {where}, got {', '.join(used)}")
    values = getattr(contents, expected)
    return list(values) if datatype == "BYTES" else np.asarray(values)
