"""ModelStreamInfer's responses as Triton writes them: triton_final_response true on each (every model
here answers once per request), and an error response naming the request's id, model and version, so
that a client with several requests on one stream knows which failed."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import modelzoo
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc


@pytest.fixture
def port(serve: Any, tmp_path: Path) -> Iterator[int]:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    with serve(repo, scheduler={"instances": 1}) as running:
        yield running.service.grpc.port


def _request(model: str, request_id: str, columns: int = 4, version: str = "") -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.inputs.add(name="x", datatype="FP32", shape=[2, columns])
    request.raw_input_contents.append(np.ones((2, columns), np.float32).tobytes())
    return request


def test_tritonclient_sees_the_final_flag_on_each_response(port: int) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = triton.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.ones((2, 4), np.float32))
        client.async_stream_infer("batchable", [x], request_id="f1", enable_empty_final_response=True)
        result, error = answers.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert error is None
    response = result.get_response()
    assert response.id == "f1"
    assert response.parameters["triton_final_response"].bool_param is True
    np.testing.assert_array_equal(result.as_numpy("y"), np.full((2, 4), 3.0, np.float32))


def test_an_error_response_names_its_request_and_is_final(port: int) -> None:
    requests = [
        _request("batchable", "ok-1"),
        _request("batchable", "bad-shape-2", columns=5, version="1"),
        _request("nosuch", "bad-model-3", version="7"),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"ok-1", "bad-shape-2", "bad-model-3"}
    for response in responses:
        assert response.infer_response.parameters["triton_final_response"].bool_param is True
    assert by_id["ok-1"].error_message == ""
    shape = by_id["bad-shape-2"]
    assert "model expects [N, 4]" in shape.error_message
    assert (shape.infer_response.model_name, shape.infer_response.model_version) == ("batchable", "1")
    unknown = by_id["bad-model-3"]
    assert unknown.error_message.startswith("unknown model 'nosuch'")
    assert (unknown.infer_response.model_name, unknown.infer_response.model_version) == ("nosuch", "7")


def test_a_request_that_does_not_parse_is_answered_final_without_a_name(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        [response] = list(stream(iter([b"\x0a\xff"]), timeout=60))
    assert response.error_message.startswith("request is not a valid inference.ModelInferRequest")
    assert response.infer_response.id == "" and response.infer_response.model_name == ""
    assert response.infer_response.parameters["triton_final_response"].bool_param is True
