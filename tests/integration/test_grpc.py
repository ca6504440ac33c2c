"""KServe v2 over gRPC with the stock tritonclient.grpc: health, metadata, config, statistics,
repository, inference (raw contents, BYTES, FP16, shared memory, streams), errors from the data
plane's table, the token, the message size bound, the port setting and the drain."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import modelzoo
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from services import make_settings, run_service
from tritonclient.utils import InferenceServerException

from appliance.server.grpc import messages, streams


def _client(running: Any) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{running.service.grpc.port}")


@pytest.fixture
def client(server: Any) -> Iterator[triton.InferenceServerClient]:
    found = _client(server)
    yield found
    found.close()


def _x(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 4), dtype=np.float32)


def _input(name: str, array: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_health_metadata_config_statistics_repository(client: Any) -> None:
    assert client.is_server_live()
    assert not client.is_server_ready()  # strict readiness, as over HTTP: 'corrupt' is UNAVAILABLE
    assert client.is_model_ready("batchable") and not client.is_model_ready("corrupt")
    assert not client.is_model_ready("nosuch")
    assert "system_shared_memory" in client.get_server_metadata().extensions
    metadata = client.get_model_metadata("batchable", as_json=True)
    assert metadata["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}
    config = client.get_model_config("batchable", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["provider"]["string_value"] == "cpu"
    client.infer("batchable", [_input("x", _x())])
    stats = client.get_inference_statistics("batchable", as_json=True)["model_stats"][0]
    assert stats["name"] == "batchable" and int(stats["inference_count"]) >= 3
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {"batchable", "corrupt"} <= {s["name"] for s in everything}
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["batchable"]["state"] == "READY" and "failed to load" in index["corrupt"]["reason"]
    client.unload_model("batchable")
    assert not client.is_model_ready("batchable")
    client.load_model("batchable")
    assert client.is_model_ready("batchable")
    assert "failed to load 'corrupt'" in str(_error(lambda: client.load_model("corrupt")))


@pytest.mark.parametrize("models", [["batchable"], []])
def test_statistics_of_every_model_ignore_a_version_as_tritons_do(
    serve: Any, tmp_path: Any, models: list[str]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in models:
        modelzoo.write(repo, name, modelzoo.batchable())
    with serve(repo) as running:
        client = _client(running)
        everything = client.get_inference_statistics(as_json=True).get("model_stats", [])
        assert [s["name"] for s in everything] == models
        assert client.get_inference_statistics("", "7", as_json=True).get("model_stats", []) == everything
        if models:
            named = _error(lambda: client.get_inference_statistics("batchable", "7"))
            assert named.status() == "StatusCode.NOT_FOUND"
            assert named.message() == "model 'batchable' version 7 is not served; serving version 1"
        client.close()


def test_infer_raw_contents_bytes_and_half(client: Any) -> None:
    x = _x()
    outputs = [triton.InferRequestedOutput("s")]
    result = client.infer(
        "batchable", [_input("x", x)], outputs=outputs, request_id="r1", priority=1, timeout=2_000_000
    )
    np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-6)
    assert result.as_numpy("y") is None and result.get_response().id == "r1"
    text = np.array([b"alpha", b"\xce\xb2eta", b""], dtype=np.object_)
    assert client.infer("strings", [_input("text", text, "BYTES")]).as_numpy("echo").tolist() == text.tolist()
    half = np.ones((2, 2), np.float16)
    assert client.infer("half", [_input("x", half, "FP16")]).as_numpy("y").dtype == np.float16


def test_messages_past_grpcios_4_mb_default_pass_and_the_models_bound_holds(client: Any) -> None:
    big = np.array([b"x" * (5 * 1024 * 1024)], dtype=np.object_)  # BYTES: bounded by max_body_bytes only
    assert len(client.infer("strings", [_input("text", big, "BYTES")]).as_numpy("echo")[0]) == len(big[0])
    error = _error(lambda: client.infer("batchable", [_input("x", np.zeros((20_000, 4), np.float32))]))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "model 'batchable' takes at most" in error.message()


def test_errors_come_from_the_data_planes_table(server: Any, client: Any) -> None:
    shape = _error(lambda: client.infer("batchable", [_input("x", np.zeros((1, 3), np.float32))]))
    assert shape.status() == "StatusCode.INVALID_ARGUMENT"
    assert shape.message() == "input 'x' has shape [1, 3]; model expects [N, 4] with N <= 8"
    unknown = _error(lambda: client.infer("nosuch", [_input("x", _x())]))
    assert unknown.status() == "StatusCode.NOT_FOUND" and "unknown model 'nosuch'" in unknown.message()
    assert _error(lambda: client.get_model_metadata("nosuch")).status() == "StatusCode.NOT_FOUND"
    channel = grpc.insecure_channel(f"127.0.0.1:{server.service.grpc.port}")
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as caught:
        infer(b"\xff\xff\xff", timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
            _request_bytes("corrupt"), timeout=30
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert dict(caught.value.trailing_metadata())["retry-after"] == "1"
    channel.close()
    counted = dict(server.service.plane.refusals)  # each refusal counted once, as HTTP's are
    assert counted[("batchable", "line", "bad_request")] == 1
    assert counted[("_unknown", "line", "not_found")] == 1
    assert counted[("", "line", "bad_request")] == 1
    assert counted[("corrupt", "line", "unavailable")] == 1


def _request_bytes(model: str) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    return request.SerializeToString()


def test_shared_memory_over_grpc(client: Any) -> None:
    x = _x(2)
    keys = [f"/appliance-test-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    inputs = shm.create_shared_memory_region("in", keys[0], x.nbytes)
    outputs = shm.create_shared_memory_region("out", keys[1], 64)
    try:
        shm.set_shared_memory_region(inputs, [x])
        client.register_system_shared_memory("in", keys[0], x.nbytes)
        client.register_system_shared_memory("out", keys[1], 64)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status["in"] == {"name": "in", "key": keys[0], "byte_size": "32"}
        tensor = triton.InferInput("x", [2, 4], "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        y, s = triton.InferRequestedOutput("y"), triton.InferRequestedOutput("s")
        y.set_shared_memory("out", 64)
        result = client.infer("batchable", [tensor], outputs=[y, s])
        np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-6)
        np.testing.assert_allclose(shm.get_contents_as_numpy(outputs, np.float32, [2, 4]), x * 2 + 1)
        tensor.set_shared_memory("in", x.nbytes, offset=8)
        past = _error(lambda: client.infer("batchable", [tensor]))
        assert (
            past.status() == "StatusCode.INVALID_ARGUMENT" and "past the end of region 'in'" in past.message()
        )
        path = _error(lambda: client.register_system_shared_memory("p", "/dev/shm/x", 8))
        assert "not a POSIX shared-memory name" in path.message()
        assert (
            "CUDA shared memory is not supported"
            in _error(lambda: client.register_cuda_shared_memory("c", b"", 0, 8)).message()
        )
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status(as_json=True) == {}
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)


def test_a_stream_answers_each_request_and_an_error_ends_only_its_own(client: Any) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("batchable", [_input("x", _x(1))], request_id="a")
        client.async_stream_infer("batchable", [_input("x", np.zeros((1, 3), np.float32))], request_id="b")
        client.async_stream_infer("batchable", [_input("x", _x(2))], request_id="c")
        got = [answers.get(timeout=60) for _ in range(3)]
    finally:
        client.stop_stream()
    ids = sorted(r.get_response().id for r, e in got if e is None)
    errors = [str(e) for r, e in got if e is not None]
    assert ids == ["a", "c"] and len(errors) == 1 and "model expects [N, 4]" in errors[0]


def test_a_stream_reads_no_further_while_its_answers_go_unsent() -> None:
    """A request takes a place of the stream's MAX_INFLIGHT_PER_STREAM until its answer is sent, not
    until it is computed: a client that reads no answers stops being read. Inference here is instant
    and the client slow (each answer's send takes turns of the loop, no time), so the stream is read as
    fast as places allow: the (k+1)th inference may start only once the client took k + 1 - MAX answers."""
    limit = streams.MAX_INFLIGHT_PER_STREAM
    taken = 0
    taken_at_each_inference: list[int] = []

    async def requests() -> AsyncIterator[bytes]:
        for i in range(4 * limit):
            yield str(i).encode()
        await asyncio.Event().wait()  # the client keeps its stream open

    async def infer(data: bytes) -> Any:
        taken_at_each_inference.append(taken)
        encoded = messages.ModelInferResponse(id=data.decode()).SerializeToString()
        return SimpleNamespace(encoded=SimpleNamespace(parts=[encoded]))

    async def scenario() -> None:
        nonlocal taken
        answers = streams.answer_each(requests(), infer)
        async with asyncio.timeout(60):
            for _ in range(2 * limit):
                await anext(answers)
                taken += 1
                for _turn in range(limit):  # the slow send: everything else runs meanwhile
                    await asyncio.sleep(0)
        await answers.aclose()

    asyncio.run(scenario())
    assert len(taken_at_each_inference) >= 2 * limit
    late = [(k, took) for k, took in enumerate(taken_at_each_inference) if k + 1 - limit > took]
    assert not late, f"(inference, answers taken) with more than {limit} answers unsent: {late}"


def test_the_token_is_read_from_authorization_metadata(serve: Any, repository: Any) -> None:
    with serve(repository, server={"api_token": "s3cret"}) as running:
        client = _client(running)
        assert client.is_server_live()  # health stays open, as over HTTP
        refused = _error(lambda: client.get_model_metadata("batchable"))
        assert refused.status() == "StatusCode.UNAUTHENTICATED"
        wrong = {"authorization": "Bearer nope"}
        refused = _error(lambda: client.infer("batchable", [_input("x", _x())], headers=wrong))
        assert refused.status() == "StatusCode.UNAUTHENTICATED"
        right = {"authorization": "Bearer s3cret"}
        assert client.infer("batchable", [_input("x", _x())], headers=right).as_numpy("y").shape == (3, 4)
        assert dict(running.service.plane.refusals)[("batchable", "line", "unauthorised")] == 2
        client.close()


def test_grpc_port_minus_one_turns_grpc_off_and_a_port_in_use_fails_the_start(
    tmp_path: Any, repository: Any
) -> None:
    with run_service(make_settings(tmp_path, repository, server={"grpc_port": -1})) as running:
        assert running.service.grpc is None
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another gRPC server's would be
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    in_use = rf"cannot listen on 127.0.0.1:{port} for gRPC: address already in use"
    try:
        with (
            pytest.raises(OSError, match=in_use),
            run_service(make_settings(tmp_path, repository, server={"grpc_port": port})),
        ):
            pass
    finally:
        holder.close()


def test_a_grpc_request_in_flight_is_answered_during_the_drain(
    serve: Any, repository: Any, batches: Any
) -> None:
    answers: list[Any] = []
    with serve(repository, server={"drain_timeout_s": 600.0}) as running:
        client = _client(running)
        with batches.holding(lambda batch: batch.model == "batchable"):
            thread = threading.Thread(
                target=lambda: answers.append(client.infer("batchable", [_input("x", _x())]))
            )
            thread.start()
            batches.wait_held()
            running.service.stop()
            stopping = running.service.hub
            while not stopping.is_draining:
                threading.Event().wait(0.005)
            late = _error(lambda: client.infer("batchable", [_input("x", _x())]))
        thread.join(60)
        client.close()
    assert late.status() == "StatusCode.UNAVAILABLE" and "draining" in late.message()
    assert answers and answers[0].as_numpy("y").shape == (3, 4)
