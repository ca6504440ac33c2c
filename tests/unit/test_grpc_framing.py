"""The gRPC framing of the data plane: ModelInferRequest to the codec's document (raw parts, typed
contents, shared memory, as Triton takes them) and back, every mismatch refused with its name."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from shm_objects import ShmObject, shm_object

from appliance import tensors
from appliance.dataplane.regions import SharedMemory
from appliance.errors import InvalidInput
from appliance.protocol import codec
from appliance.server.grpc import messages, wire
from appliance.server.grpc.framing import GrpcFraming


@pytest.fixture
def obj() -> Iterator[ShmObject]:
    with shm_object(8192) as made:
        yield made


@pytest.fixture
def regions(obj: ShmObject) -> Iterator[SharedMemory]:
    found = SharedMemory(max_regions=4, max_bytes=1 << 20)
    found.register("in", obj.key, 0, 4096)
    found.register("out", obj.key, 4096, 4096)
    yield found
    found.close()


def _shm(region: str, byte_size: int) -> dict:
    return {"shared_memory_region": region, "shared_memory_byte_size": byte_size}


def _grpc_request(**tensors: dict) -> messages.ModelInferRequest:
    request = messages.ModelInferRequest(model_name="m")
    for name, spec in tensors.items():
        tensor = request.inputs.add(name=name, datatype=spec["datatype"], shape=spec["shape"])
        for key, value in spec.get("parameters", {}).items():
            if isinstance(value, str):
                tensor.parameters[key].string_param = value
            else:
                tensor.parameters[key].int64_param = value
        if "contents" in spec:
            getattr(tensor.contents, spec["contents"][0]).extend(spec["contents"][1])
        if "raw" in spec:
            request.raw_input_contents.append(spec["raw"])
    return request


def _decode(
    message: messages.ModelInferRequest, regions: SharedMemory | None = None
) -> codec.InferenceRequest:
    framing = GrpcFraming(message)
    return framing.decode(b"", None, limits=tensors.ShapeLimits(), expect=lambda *_: None, regions=regions)


def test_grpc_raw_contents_and_regions(regions: SharedMemory, obj: ShmObject) -> None:
    obj.write(np.array([5, 6], np.int64).tobytes())
    message = _grpc_request(
        a={"datatype": "FP32", "shape": [2], "raw": np.array([1, 2], np.float32).tobytes()},
        b={"datatype": "INT64", "shape": [2], "parameters": _shm("in", 16)},
        c={"datatype": "INT32", "shape": [1], "raw": np.array([3], np.int32).tobytes()},
    )
    request = _decode(message, regions)
    assert [request.inputs[n].tolist() for n in "abc"] == [[1.0, 2.0], [5, 6], [3]]
    typed = _grpc_request(t={"datatype": "BYTES", "shape": [2], "contents": ("bytes_contents", [b"p", b"q"])})
    assert _decode(typed).inputs["t"].tolist() == [b"p", b"q"]
    ints = _grpc_request(i={"datatype": "INT8", "shape": [2], "contents": ("int_contents", [1, -2])})
    assert _decode(ints).inputs["i"].dtype == np.int8


def _x(datatype: str = "FP32", **spec: object) -> dict:
    return {"datatype": datatype, "shape": [1], **spec}


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (_grpc_request(x=_x(contents=("int_contents", [1]))), "go in fp32_contents"),
        (_grpc_request(x=_x("FP16", contents=("fp32_contents", [1.0]))), "in raw_input_contents"),
        (_grpc_request(x=_x("INT8", contents=("int_contents", [300]))), "outside INT8"),
        (_grpc_request(x=_x(parameters={"binary_data_size": 4}, raw=b"abcd")), "is HTTP's"),
        (_grpc_request(x=_x(raw=b"abc")), "3 bytes does not match"),
        (_grpc_request(x=_x()), "no raw_input_contents entry left"),
        (_grpc_request(x=_x(raw=b"abcd"), y=_x(contents=("fp32_contents", [1.0]))), "use one"),
    ],
)
def test_grpc_requests_that_do_not_add_up_are_refused(
    message: messages.ModelInferRequest, error: str
) -> None:
    with pytest.raises(InvalidInput, match=error):
        _decode(message)


def test_a_raw_part_no_input_takes_is_refused() -> None:
    message = _grpc_request(x={"datatype": "FP32", "shape": [1], "raw": b"abcd"})
    message.raw_input_contents.append(b"more")
    with pytest.raises(InvalidInput, match="carries 2 raw_input_contents; only 1 input"):
        _decode(message)


def test_grpc_answers_keep_raw_contents_aligned_with_outputs(regions: SharedMemory, obj: ShmObject) -> None:
    message = _grpc_request(x={"datatype": "FP32", "shape": [1], "raw": b"\x00" * 4})
    output = message.outputs.add(name="y")
    output.parameters["shared_memory_region"].string_param = "out"
    output.parameters["shared_memory_byte_size"].int64_param = 8
    message.outputs.add(name="s")
    request = _decode(message, regions)
    outputs = {"y": np.array([1.0, 2.0], np.float32), "s": np.array([3.0], np.float32)}
    encoded = GrpcFraming(message).encode(
        model_name="m", model_version="1", request=request, outputs=outputs, regions=regions
    )
    response = messages.ModelInferResponse.FromString(encoded.body())
    assert [o.name for o in response.outputs] == ["y", "s"]
    assert list(response.raw_output_contents) == [b"", outputs["s"].tobytes()]
    assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == 8
    assert obj.read(8, 4096) == outputs["y"].tobytes()


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    request = messages.ModelInferRequest(model_name=draw(st.text(max_size=5)), id=draw(st.text(max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.text(max_size=3)), shape=draw(st.lists(st.integers(-9, 2**40), max_size=4))
        )
        tensor.parameters[draw(st.text(max_size=3))].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    for _ in range(draw(st.integers(0, 3))):
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    request.parameters["timeout"].int64_param = draw(st.integers(0, 2**40))
    request.outputs.add(name=draw(st.text(max_size=3)))
    return request.SerializeToString()


@given(data=st.one_of(_requests(), st.binary(max_size=64)))
def test_raw_contents_are_views_of_the_bytes_and_the_rest_is_protobufs_parse(data: bytes) -> None:
    try:
        message, raw = wire.parse_infer_request(data)
    except DecodeError:
        return
    whole = messages.ModelInferRequest.FromString(data)  # what protobuf itself reads there
    assert [bytes(part) for part in raw] == list(whole.raw_input_contents)
    whole.ClearField("raw_input_contents")
    assert message == whole
    assert all(part.obj is data for part in raw)  # views of the received bytes, not copies


def test_valid_requests_always_split() -> None:
    request = messages.ModelInferRequest(model_name="m")
    request.raw_input_contents.extend([b"a" * 200, b"", b"b"])
    message, raw = wire.parse_infer_request(request.SerializeToString())
    assert message.model_name == "m" and [bytes(r) for r in raw] == [b"a" * 200, b"", b"b"]
    for bad in (
        b"\x3a\x05ab",
        b"\x3b",
        b"\xff" * 11,
        b"\x38\x01",
    ):  # truncated, a group, a varint, wrong type
        with pytest.raises(DecodeError):
            wire.parse_infer_request(bad)
