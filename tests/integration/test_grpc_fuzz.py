"""Hypothesis over every gRPC method: raw bytes and ModelInferRequests one mutation away from valid
(names, datatypes, shapes, raw parts, contents, shared-memory parameters) never get INTERNAL or
UNKNOWN, and the server serves after. The gRPC side of test_http_fuzz.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import modelzoo
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import make_settings, run_service
from shm_objects import shm_object

from appliance.server.grpc import messages

EXAMPLES = 1000
MODELS = ["batchable", "fixed", "scalar", "strings", "mixed", "half", "corrupt", "nosuch", ""]
DATATYPES = ["FP32", "FP16", "INT64", "BOOL", "BYTES", "UINT8", "BF16", "fp32", ""]
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


@pytest.fixture(scope="module")
def fuzz_channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, grpc.Channel]]:
    tmp = tmp_path_factory.mktemp("grpc-fuzz")
    repo = modelzoo.standard_repository(tmp / "repo")
    settings = make_settings(tmp, repo, server={"max_body_bytes": 1024 * 1024}, scheduler={"instances": 1})
    with run_service(settings) as running, shm_object(4096) as obj:
        running.service.plane.regions.register("r", obj.key, 0, 4096)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.service.grpc.port}")
        yield running, channel
        channel.close()


def _parameter(entries: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        entries[key].bool_param = value
    elif isinstance(value, int):
        entries[key].int64_param = value
    elif isinstance(value, float):
        entries[key].double_param = value
    else:
        entries[key].string_param = value


_VALUES = st.one_of(st.integers(-5, 2**40), st.booleans(), st.text(max_size=4), st.floats(allow_nan=True))
_KEYS = st.sampled_from(
    ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "binary_data_size",
     "priority", "timeout", "binary_data", "x"]
)  # fmt: skip


@st.composite
def infer_requests(draw: st.DrawFn) -> bytes:
    request = messages.ModelInferRequest(model_name=draw(st.sampled_from(MODELS)))
    request.model_version = draw(st.sampled_from(["", "", "", "1", "2", "x"]))
    for key, value in draw(st.dictionaries(_KEYS, _VALUES, max_size=2)).items():
        _parameter(request.parameters, key, value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["x", "a", "text", "y", ""])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.one_of(st.integers(-2, 6), st.just(2**40)), max_size=5)),
        )
        if draw(st.booleans()):
            _parameter(tensor.parameters, "shared_memory_region", draw(st.sampled_from(["r", "nosuch"])))
            _parameter(tensor.parameters, "shared_memory_byte_size", draw(st.integers(-1, 5000)))
            _parameter(tensor.parameters, "shared_memory_offset", draw(st.integers(-1, 5000)))
        for key, value in draw(st.dictionaries(_KEYS, _VALUES, max_size=2)).items():
            _parameter(tensor.parameters, key, value)
        if draw(st.integers(0, 4)) == 0:
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
            tensor.contents.int64_contents.extend(
                draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
            )
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["y", "s", "echo", "z"])))
        if draw(st.booleans()):
            _parameter(output.parameters, "shared_memory_region", draw(st.sampled_from(["r", "nosuch"])))
            _parameter(output.parameters, "shared_memory_byte_size", draw(st.integers(-1, 5000)))
            _parameter(output.parameters, "shared_memory_offset", draw(st.integers(-1, 5000)))
    return request.SerializeToString()


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from([*messages.METHODS, "ModelInfer", "ModelInfer", "ModelInfer"]))
    if method == "ModelInfer" and draw(st.integers(0, 4)):
        return method, draw(infer_requests())
    if method in ("ModelInfer", "ModelStreamInfer") or draw(st.booleans()):
        return method, draw(st.binary(max_size=96))
    request = messages.request_of(method)()
    names = [*MODELS, "r", "/dev/shm/x", "../x"]
    if method == "RepositoryModelUnload":
        names = ["nosuch", "corrupt", "zzz"]  # keep the served models served
    for field in request.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING and not field.is_repeated:
            setattr(request, field.name, draw(st.sampled_from(names)))
        elif field.type in (field.TYPE_UINT64, field.TYPE_INT64) and not field.is_repeated:
            setattr(request, field.name, draw(st.integers(0, 2**63 - 1)))
    return method, request.SerializeToString()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(call=calls())
def test_no_call_gets_internal_or_unknown(
    fuzz_channel: tuple[Any, grpc.Channel], call: tuple[str, bytes]
) -> None:
    _, channel = fuzz_channel
    method, body = call
    path = f"/{messages.SERVICE}/{method}"
    try:
        if messages.METHODS[method].server_streaming:
            list(channel.stream_stream(path)(iter([body]), timeout=60))
        else:
            channel.unary_unary(path)(body, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() not in NEVER, (method, exc.code(), exc.details())
        assert exc.details(), (method, exc.code())


def test_the_server_serves_after_the_fuzz(fuzz_channel: tuple[Any, grpc.Channel]) -> None:
    running, channel = fuzz_channel
    channel.unary_unary(f"/{messages.SERVICE}/RepositoryModelLoad")(
        messages.request_of("RepositoryModelLoad")(model_name="batchable").SerializeToString(), timeout=60
    )
    request = messages.ModelInferRequest(model_name="batchable")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    answer = channel.unary_unary(f"/{messages.SERVICE}/ModelInfer")(request.SerializeToString(), timeout=60)
    response = messages.ModelInferResponse.FromString(answer)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [3.0] * 4
    assert sum(count for _, count in running.service.plane.refusals) > EXAMPLES / 4
