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


@pytest.mark.parametrize("binary_input", [True, False])
def test_non_finite_values_cross_json_as_with_triton(triton_client, binary_input: bool) -> None:
    """NaN, Infinity and -Infinity are JSON tokens both ways, as Triton writes and reads them: not null,
    which tritonclient reads as NaN whatever the value was."""
    x = np.array([[np.nan, np.inf, -np.inf, 3e38]], np.float32)  # y = 2x + 1: 2 * 3e38 overflows
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_input)
    outputs = [triton.InferRequestedOutput("y", binary_data=False)]
    result = triton_client.infer("batchable", [tensor], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("y"), [[np.nan, np.inf, -np.inf, np.inf]])


def test_infer_default_outputs_bytes(triton_client) -> None:
    text = np.array([b"alpha", b"\xce\xb2eta"], dtype=np.object_)
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(text)
    result = triton_client.infer("strings", [tensor])
    assert result.as_numpy("echo").tolist() == [b"alpha", b"\xce\xb2eta"]


@pytest.mark.parametrize(("priority", "expected"), [(0, "line"), (1, "line"), (2, "pool"), (9, "pool")])
def test_priority_picks_the_class_the_request_runs_in(triton_client, batches, priority, expected) -> None:
    """Triton's `priority`: 0 and 1 are line traffic; 2 and above run as pool work, on pool threads."""
    x = np.full((1, 4), float(priority), np.float32)
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = triton_client.infer("batchable", [tensor], priority=priority, timeout=60_000_000)
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2 + 1)
    [batch] = batches.wait_for(lambda b: b.model == "batchable" and b.marks == (float(priority),))
    assert (batch.priority, batch.is_background) == (expected, expected == "pool")
    stats = triton_client.get_inference_statistics("batchable")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 1


def test_a_timeout_that_cannot_be_met_is_a_503_and_never_runs(triton_client, batches) -> None:
    """Triton's `timeout` (microseconds) is the request's deadline: 1 us cannot be met."""
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), 3.0, np.float32))
    with pytest.raises(InferenceServerException, match="after its deadline") as refused:
        triton_client.infer("batchable", [tensor], timeout=1)
    assert refused.value.status() == "503"
    result = triton_client.infer("batchable", [tensor], timeout=60_000_000)  # the same, with time to run
    np.testing.assert_array_equal(result.as_numpy("s"), [[12.0]])
    assert [batch.marks for batch in batches.of("batchable")] == [(3.0,)]  # the refused one never ran


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
