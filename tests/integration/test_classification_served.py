"""Triton's classification extension through a real service: the stock tritonclient.http (JSON and
binary) and tritonclient.grpc clients get the "<value>:<index>[:<label>]" strings Triton sends for
class_count, and a pool node signs the classes it sends, so that the gateway's check verifies them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import modelzoo
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from services import RunningService, make_settings, run_service
from tests_support import strip_scheme
from tritonclient.utils import InferenceServerException

from appliance.platform import verify
from appliance.platform.view import NodeView
from appliance.pool import signing
from appliance.pool.jobs import JobIntake
from appliance.pool.wire import Inbound, Outbound
from appliance.protocol import classification, codec

# y = x on every model below: the scores are what the test sends.
X = np.array([[1.0, 5.0, 10.0, 4.0], [2.0, 8.0, 0.5, 3.0]], np.float32)
LABELS = ["cat", "dog", "", "fish"]  # index 2 has an empty label: answered without one, as Triton
TOP_2 = [["10.000000:2", "5.000000:1:dog"], ["8.000000:1:dog", "3.000000:3:fish"]]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    tmp_path = tmp_path_factory.mktemp("classification")
    repo = tmp_path / "repo"
    batching = "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 1.0\n"
    labels = f"labels = {orjson.dumps(LABELS).decode()}\n"
    modelzoo.write(repo, "scores", modelzoo.batchable(1.0, 0.0), manifest=labels + batching)
    modelzoo.write(repo, "whole", modelzoo.batchable(1.0, 0.0), manifest="[batching]\nmax_batch_size = 0\n")
    modelzoo.write(repo, "strings", modelzoo.strings())
    with run_service(make_settings(tmp_path, repo)) as found:
        yield found


@pytest.fixture
def http(running: RunningService) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(strip_scheme(running.url), network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture
def grpc(running: RunningService) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.service.grpc.port}")
    yield client
    client.close()


def texts(array: np.ndarray) -> list[Any]:
    """The strings of a BYTES output (tritonclient reads str from JSON, bytes from binary data)."""

    def text(item: str | bytes) -> str:
        return item if isinstance(item, str) else item.decode()

    return np.vectorize(text, otypes=[object])(array).tolist()


def http_infer(client: Any, model: str, class_count: int, *, binary: bool = True) -> Any:
    tensor = triton_http.InferInput("x", list(X.shape), "FP32").set_data_from_numpy(X, binary_data=binary)
    outputs = [
        triton_http.InferRequestedOutput("y", binary_data=binary, class_count=class_count),
        triton_http.InferRequestedOutput("s", binary_data=binary),
    ]
    return client.infer(model, [tensor], outputs=outputs)


def grpc_infer(client: Any, model: str, class_count: int) -> Any:
    tensor = triton_grpc.InferInput("x", list(X.shape), "FP32").set_data_from_numpy(X)
    outputs = [
        triton_grpc.InferRequestedOutput("y", class_count=class_count),
        triton_grpc.InferRequestedOutput("s"),
    ]
    return client.infer(model, [tensor], outputs=outputs)


def test_the_server_advertises_the_extension_over_http_and_grpc(http: Any, grpc: Any) -> None:
    assert "classification" in http.get_server_metadata()["extensions"]
    assert "classification" in grpc.get_server_metadata().extensions


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_gets_the_top_classes_of_each_row_with_their_labels(
    http: Any, binary: bool
) -> None:
    result = http_infer(http, "scores", 2, binary=binary)
    assert (result.get_output("y")["datatype"], result.get_output("y")["shape"]) == ("BYTES", [2, 2])
    assert texts(result.as_numpy("y")) == TOP_2
    np.testing.assert_array_equal(result.as_numpy("s"), X.sum(axis=1, keepdims=True))  # not asked: raw


def test_the_classes_are_made_off_the_event_loop(
    http: Any, running: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranking and writing up to MAX_CLASSES strings per row is Python work a request (a pool peer's
    too) chooses the size of: it runs in a worker thread, never on the loop that serves the line."""
    threads = []
    real = classification.classified

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "classified", recorded)
    loop_thread = running.call(_loop_thread)
    assert texts(http_infer(http, "scores", 2).as_numpy("y")) == TOP_2
    assert len(threads) == 1 and threads[0] != loop_thread


async def _loop_thread() -> int:
    return threading.get_ident()


def test_tritonclient_grpc_gets_the_same_strings(grpc: Any) -> None:
    result = grpc_infer(grpc, "scores", 2)
    output = result.get_output("y")
    assert (output.datatype, list(output.shape)) == ("BYTES", [2, 2])
    assert texts(result.as_numpy("y")) == TOP_2
    np.testing.assert_array_equal(result.as_numpy("s"), X.sum(axis=1, keepdims=True))


def test_a_model_without_batching_is_ranked_over_its_whole_output(http: Any, grpc: Any) -> None:
    expected = ["10.000000:2", "8.000000:5", "5.000000:1", "4.000000:3", "3.000000:7"]
    over_http, over_grpc = http_infer(http, "whole", 5, binary=False), grpc_infer(grpc, "whole", 5)
    assert over_http.get_output("y")["shape"] == [5] and list(over_grpc.get_output("y").shape) == [5]
    assert texts(over_http.as_numpy("y")) == texts(over_grpc.as_numpy("y")) == expected


def test_a_class_count_above_the_classes_answers_every_class(http: Any) -> None:
    result = http_infer(http, "scores", 1000)
    assert result.get_output("y")["shape"] == [2, 4]
    assert texts(result.as_numpy("y"))[1] == [
        "8.000000:1:dog",
        "3.000000:3:fish",
        "2.000000:0:cat",
        "0.500000:2",
    ]


def test_a_bytes_output_is_refused_with_400_over_http_and_invalid_argument_over_grpc(
    http: Any, grpc: Any
) -> None:
    text = np.array([b"a", b"b"], dtype=np.object_)
    message = "output 'echo' is BYTES; classification ranks numeric outputs only"
    tensor = triton_http.InferInput("text", [2], "BYTES").set_data_from_numpy(text)
    with pytest.raises(InferenceServerException) as caught:
        http.infer("strings", [tensor], outputs=[triton_http.InferRequestedOutput("echo", class_count=1)])
    assert caught.value.status() == "400" and message in caught.value.message()
    tensor = triton_grpc.InferInput("text", [2], "BYTES").set_data_from_numpy(text)
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer("strings", [tensor], outputs=[triton_grpc.InferRequestedOutput("echo", class_count=1)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and message in caught.value.message()


def test_a_negative_class_count_over_grpc_is_refused(grpc: Any) -> None:
    with pytest.raises(InferenceServerException) as caught:
        grpc_infer(grpc, "scores", -1)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "output 'y' classification must be an integer from 0 to 1000" in caught.value.message()


def pool_answer(running: RunningService, model: str, message: Inbound) -> tuple[Outbound, JobIntake]:
    """The one answer the service's pool intake sends to `message`, a job for `model`, and the intake."""
    sent: list[Outbound] = []
    intake = JobIntake(
        running.service.plane, running.service.settings, send=sent.append, emit=lambda *_, **__: None
    )

    async def serve() -> None:
        intake.submit(model, message)
        async with asyncio.timeout(30):
            assert await intake.wait(30)

    running.call(serve)
    [answer] = sent
    return answer, intake


@pytest.mark.parametrize("mqtt_5", [True, False], ids=["mqtt5-binary", "mqtt3-json"])
def test_a_pool_nodes_signed_classes_verify_as_the_gateway_checks_them(
    running: RunningService, mqtt_5: bool
) -> None:
    """The node signs the classes it sends, not the scores it computed: the gateway digests the decoded
    answer. Over MQTT 3.1.1 the answer is JSON only, and the classification must survive that too."""
    parameters = {"classification": 2, "binary_data": mqtt_5}
    document = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}],
        "outputs": [{"name": "y", "parameters": parameters}, {"name": "s"}],
    }
    if mqtt_5:
        message = Inbound(
            "jobs", orjson.dumps(document), response_topic="buyer/b1/answers", correlation=b"job-7"
        )
    else:
        message = Inbound(
            "jobs", orjson.dumps({**document, "reply_to": "buyer/b1/answers", "corr_id": "job-7"})
        )

    answer, intake = pool_answer(running, "scores", message)
    header_length = int(answer.user[codec.HEADER_LENGTH]) if codec.HEADER_LENGTH in answer.user else None
    assert (header_length is not None) == mqtt_5
    node = NodeView("site", running.service.settings.pool.node_id, birth={"public_key": intake.public_key})
    x_sha256 = signing.tensor_digest({"x": X})
    proof = verify.check(node, "job-7", answer.payload, header_length, input_sha256=x_sha256, files=None)
    assert texts(proof.outputs["y"]) == TOP_2 and proof.outputs["s"].dtype == np.float32
    # Break it on purpose: the scores the model computed are not what the node signed.
    scores = {"y": X, "s": proof.outputs["s"]}
    assert proof.statement.output_sha256 != signing.tensor_digest(scores)


def test_a_pool_job_may_ask_for_fewer_classes_than_the_line(
    running: RunningService, http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stranger's pool job is held to MAX_ANSWERED_CLASSES["pool"] (its strings cost the loop), the
    line to the larger "line" bound: the same request is answered locally and refused as a pool job
    (the pool's bound set to 3 here, under the request's 2 rows x 2 classes)."""
    monkeypatch.setitem(classification.MAX_ANSWERED_CLASSES, "pool", 3)
    assert texts(http_infer(http, "scores", 2).as_numpy("y")) == TOP_2
    document = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}],
        "outputs": [{"name": "y", "parameters": {"classification": 2}}],
    }
    message = Inbound("jobs", orjson.dumps(document), response_topic="buyer/b1/answers", correlation=b"job-8")
    answer, _ = pool_answer(running, "scores", message)
    assert answer.user["status"] == "400", answer.payload
    assert (
        b"would answer 4 classes" in answer.payload and b"at most 3 for a request of this" in answer.payload
    )
