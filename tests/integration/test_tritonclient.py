"""The stock tritonclient.http client works unchanged: binary by default, JSON on request."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tests_support import strip_scheme
from tritonclient.utils import InferenceServerException


@pytest.fixture
def triton_client(server):
    client = triton.InferenceServerClient(strip_scheme(server.url), network_timeout=30.0)
    yield client
    client.close()


def test_health_and_metadata(triton_client) -> None:
    assert triton_client.is_server_live()
    assert not triton_client.is_server_ready()  # strict readiness, as Triton: 'corrupt' is UNAVAILABLE
    assert triton_client.is_model_ready("batchable")
    assert not triton_client.is_model_ready("corrupt")
    metadata = triton_client.get_model_metadata("batchable")
    assert metadata["inputs"][0]["shape"] == [-1, 4]
    config = triton_client.get_model_config("batchable")
    assert config["max_batch_size"] == 8
    stats = triton_client.get_inference_statistics("batchable")
    assert stats["model_stats"][0]["name"] == "batchable"
    index = triton_client.get_model_repository_index()
    assert {m["name"] for m in index} >= {"batchable", "corrupt"}


@pytest.mark.parametrize("binary", [True, False])
def test_infer_binary_and_json(triton_client, binary: bool) -> None:
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("y", binary_data=binary),
        triton.InferRequestedOutput("s", binary_data=binary),
    ]
    result = triton_client.infer("batchable", [tensor], outputs=outputs, request_id="abc")
    np.testing.assert_allclose(result.as_numpy("y"), x * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-6)
    assert result.get_response()["id"] == "abc"


def test_infer_default_outputs_bytes_and_priority(triton_client) -> None:
    text = np.array([b"alpha", b"\xce\xb2eta"], dtype=np.object_)
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(text)
    result = triton_client.infer("strings", [tensor], priority=1, timeout=2_000_000)
    assert result.as_numpy("echo").tolist() == [b"alpha", b"\xce\xb2eta"]


def test_errors_surface_as_exceptions(triton_client) -> None:
    tensor = triton.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match=r"model expects \[N, 4\]"):
        triton_client.infer("batchable", [tensor])
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton_client.infer("nope", [tensor])


def test_repository_load_unload(triton_client) -> None:
    triton_client.unload_model("batchable")
    assert not triton_client.is_model_ready("batchable")
    triton_client.load_model("batchable")
    assert triton_client.is_model_ready("batchable")
