"""The codec's shared-memory parameters: inputs read in place from a region, outputs written into
one, and every malformed combination refused with a message naming it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from shm_objects import ShmObject, shm_object

from appliance.dataplane.regions import SharedMemory
from appliance.errors import InvalidInput
from appliance.protocol import codec


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


def _body(inputs: list[dict], outputs: list[dict] | None = None) -> bytes:
    document: dict = {"inputs": inputs}
    if outputs is not None:
        document["outputs"] = outputs
    return orjson.dumps(document)


def _shm(region: str, byte_size: int, offset: int = 0) -> dict:
    return {
        "shared_memory_region": region,
        "shared_memory_byte_size": byte_size,
        "shared_memory_offset": offset,
    }


def test_an_input_is_copied_out_of_its_region_when_decoded(regions: SharedMemory, obj: ShmObject) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    obj.write(x.tobytes(), 64)
    body = _body([{"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": _shm("in", 32, 64)}])
    request = codec.decode_request(body, regions=regions)
    obj.write(np.full(8, 7, np.float32).tobytes(), 64)  # the client reuses its buffer while queued
    obj.truncate(0)  # or shrinks its object: the worker's later read touches none of it
    np.testing.assert_array_equal(request.inputs["x"], x)


def test_an_output_is_written_into_its_region_and_answered_without_data(
    regions: SharedMemory, obj: ShmObject
) -> None:
    x = np.zeros((1, 4), np.float32)
    body = _body(
        [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}],
        [{"name": "y", "parameters": _shm("out", 64, 16)}, {"name": "s"}],
    )
    request = codec.decode_request(body, regions=regions)
    y, s = np.arange(4, dtype=np.float32).reshape(1, 4), np.ones((1, 1), np.float32)
    encoded = codec.encode_response(
        model_name="m", model_version="1", request=request, outputs={"y": y, "s": s}, regions=regions
    )
    document = orjson.loads(encoded.body())
    assert document["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [1, 4],
        "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 16},
    }
    assert document["outputs"][1]["data"] == [1.0]
    assert obj.read(16, 4096 + 16) == y.tobytes()


@pytest.mark.parametrize(
    ("parameters", "error"),
    [
        ({"shared_memory_region": "in"}, "needs shared_memory_byte_size"),
        ({**_shm("in", 16), "shared_memory_offset": -4}, "shared_memory_offset must be a non-negative"),
        (_shm("in", 12), "binary data of 12 bytes does not match FP32 shape \\[1, 4\\]"),
        (_shm("nosuch", 16), "no shared-memory region 'nosuch' is registered"),
        (_shm("in", 16, 4090), "offset 4090 \\+ shared_memory_byte_size 16 is past the end of region 'in'"),
        ({**_shm("in", 16), "binary_data_size": 16}, "more than one of 'data', binary_data_size and shared"),
        ({"shared_memory_byte_size": 16}, "shared_memory_byte_size or _offset but no shared_memory_region"),
        ({**_shm("in", 16), "shared_memory_region": 3}, "shared_memory_region must be a string"),
    ],
)
def test_bad_region_parameters_are_refused(regions: SharedMemory, parameters: dict, error: str) -> None:
    body = _body([{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": parameters}])
    with pytest.raises(InvalidInput, match=error):
        codec.decode_request(body, regions=regions)


def test_outputs_that_cannot_go_where_asked_fail_before_compute_or_precisely_after(
    regions: SharedMemory,
) -> None:
    x = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    both = {"name": "y", "parameters": {**_shm("out", 4), "binary_data": True}}
    with pytest.raises(InvalidInput, match="sets both shared_memory_region and binary_data"):
        codec.decode_request(_body([x], [both]), regions=regions)
    with pytest.raises(InvalidInput, match="past the end of region 'out'"):
        codec.decode_request(_body([x], [{"name": "y", "parameters": _shm("out", 8, 4092)}]), regions=regions)
    request = codec.decode_request(_body([x], [{"name": "y", "parameters": _shm("out", 8)}]), regions=regions)
    with pytest.raises(
        InvalidInput, match="output 'y' takes 16 bytes; its shared_memory_byte_size in region"
    ):
        codec.encode_response(
            model_name="m", model_version="1", request=request, outputs={"y": np.zeros(4, np.float32)},
            regions=regions,
        )  # fmt: skip


def test_a_transport_without_regions_refuses_them() -> None:
    body = _body([{"name": "x", "datatype": "FP32", "shape": [1], "parameters": _shm("in", 4)}])
    with pytest.raises(InvalidInput, match="names shared-memory region 'in'; this transport has none"):
        codec.decode_request(body)


def test_requests_and_responses_describe_tensors_the_same_way() -> None:
    arrays = {"a": np.ones((2, 2), np.int64), "t": np.array([b"x", b"yz"], dtype=object)}
    for binary in (True, False):
        sent = orjson.loads(codec.encode_request(arrays, binary=binary, outputs=[]).parts[0])["inputs"]
        request = codec.InferenceRequest({}, parameters={"binary_data_output": binary})
        answered = codec.encode_response(model_name="m", model_version="1", request=request, outputs=arrays)
        assert orjson.loads(answered.parts[0])["outputs"] == sent
