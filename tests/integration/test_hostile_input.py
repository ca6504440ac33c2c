"""Regression tests of issue 13's client-input defects: each was a 500 or an unbounded allocation."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import pytest

from appliance.errors import ModelLoading, ModelNotFound
from appliance.protocol import codec


def _declared(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    ).encode()


def test_a_70_dimension_shape_is_a_400(client: httpx.Client) -> None:
    response = client.post("/v2/models/batchable/infer", content=_declared("x", "FP32", [1] * 70, [1.0]))
    assert response.status_code == 400
    assert "has 70 dimensions; at most 16" in response.json()["error"]


def test_a_shape_of_1e20_elements_behind_a_zero_is_refused_before_any_allocation(
    client: httpx.Client,
) -> None:
    response = client.post(
        "/v2/models/batchable/infer", content=_declared("x", "FP32", [0, 10**10, 10**10], [])
    )
    assert response.status_code == 413
    assert "server.max_tensor_elements" in response.json()["error"]


def test_a_bytes_tensor_of_more_strings_than_the_cap_is_refused_before_its_data_is_read(
    client: httpx.Client,
) -> None:
    # 8 MiB of binary empty strings would be 2 Mi objects; each is refused before one is made
    header = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2 << 20], "parameters": {}}]}
    header["inputs"][0]["parameters"]["binary_data_size"] = 4 * (2 << 20)
    encoded = json.dumps(header).encode()
    response = client.post(
        "/v2/models/strings/infer",
        content=encoded + bytes(4 * (2 << 20)),
        headers={codec.HEADER_LENGTH: str(len(encoded))},
    )
    assert response.status_code == 413, response.text
    assert "more than 1048576 BYTES elements (server.max_bytes_elements)" in response.json()["error"]


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "-1", "1e3", "99999999999999999999999"])
def test_header_lengths_are_parsed_as_ascii_digits(client: httpx.Client, value: str) -> None:
    encoded = codec.encode_request({"x": np.ones((1, 4), np.float32)})
    response = client.post(
        "/v2/models/batchable/infer", content=encoded.body(), headers={codec.HEADER_LENGTH: value.encode()}
    )
    assert response.status_code == 400, response.text
    assert "Inference-Header-Content-Length" in response.json()["error"]


def test_deeply_nested_json_over_64_kb_is_a_400(client: httpx.Client) -> None:
    depth = 40_000  # simdjson's own depth limit raises a RuntimeError on this, which nothing caught
    body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) > 64 * 1024
    # 'strings' has a BYTES input, so its body bound is server.max_body_bytes: the body is parsed
    response = client.post("/v2/models/strings/infer", content=body)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_a_bytes_tensor_aimed_at_a_float_input_is_refused_before_its_data_is_decoded(
    client: httpx.Client,
) -> None:
    body = _declared("x", "BYTES", [2, 4], ["a"] * 7)  # the wrong count would fail decoding: not reached
    response = client.post("/v2/models/batchable/infer", content=body)
    assert response.status_code == 400
    assert response.json()["error"] == "input 'x' has datatype BYTES; model expects FP32"


def test_a_body_bigger_than_the_model_can_take_is_refused_from_its_declared_length(server) -> None:
    """batchable takes at most 8 rows of 4 floats: 40 MB is refused before a byte of it is read."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            "POST /v2/models/batchable/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {40_000_000}\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"inputs": [')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer
    assert b"connection: close" in rest.lower()
    assert b"model 'batchable' takes at most" in rest


def test_a_chunked_body_stops_being_read_past_what_the_model_can_take(client: httpx.Client) -> None:
    def chunks():
        for _ in range(200):
            yield b" " * 65536  # 13 MB of whitespace: valid JSON padding, far past the model's bound

    response = client.post("/v2/models/batchable/infer", content=chunks())
    assert response.status_code == 413 and "takes at most" in response.json()["error"]


def test_unknown_names_on_load_and_unload_keep_nothing(server, client: httpx.Client) -> None:
    hub = server.service.hub
    before = len(hub._locks)
    for index in range(64):  # each name would have left a lock behind
        assert client.post(f"/v2/repository/models/nosuch-{index}/load").status_code == 404
        assert client.post(f"/v2/repository/models/nosuch-{index}/unload").status_code == 404
    assert len(hub._locks) == before


def test_every_model_on_disk_is_loading_until_it_is_loaded(tmp_path: Path, settings_factory) -> None:
    """While the first model loads, the second answers 503 LOADING (not 404); unknown names stay 404."""
    from appliance.engine.repository import Repository
    from appliance.providers.registry import Registry
    from appliance.scheduler.hub import ModelHub

    repo = tmp_path / "repo"
    modelzoo.write(repo, "a_first", modelzoo.batchable())
    modelzoo.write(repo, "b_second", modelzoo.batchable())
    settings = settings_factory(repo)
    hub = ModelHub(settings, Registry.discover(), Repository(repo))
    seen: dict[str, type[Exception]] = {}

    def before_each(name: str) -> None:
        if name != "a_first":
            return
        for other in ("b_second", "nosuch"):
            try:
                hub.scheduler(other)
            except (ModelLoading, ModelNotFound) as exc:
                seen[other] = type(exc)

    async def scenario() -> None:
        await hub.load_all(before_each=before_each)
        assert hub.scheduler("b_second") is not None
        await hub.close()

    asyncio.run(scenario())
    assert seen == {"b_second": ModelLoading, "nosuch": ModelNotFound}


def test_draining_answers_close_keep_alive_connections(server, client: httpx.Client) -> None:
    server.call(lambda: server.service.hub.drain(5.0))
    try:
        response = client.post(
            "/v2/models/batchable/infer", content=_declared("x", "FP32", [1, 4], [1, 2, 3, 4])
        )
        assert response.status_code == 503 and response.headers["connection"] == "close"
        assert int(response.headers["retry-after"]) >= 1
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.headers["connection"] == "close"
    finally:
        server.service.hub.resume()


@pytest.mark.parametrize("is_padded", [True, False])
def test_a_content_length_of_20_digits_while_draining_is_a_503(server, is_padded: bool) -> None:
    """Leading zeros (valid HTTP) are read; 20 significant digits (llhttp takes up to 2**64 - 1) mean
    the body is not drained: either way the answer is the drain's 503, never a 500."""
    body = _declared("x", "FP32", [1, 4], [1, 2, 3, 4])
    length = f"{len(body):020d}" if is_padded else str(2**64 - 1)
    head = f"POST /v2/models/batchable/infer HTTP/1.1\r\nHost: box\r\nContent-Length: {length}"
    server.call(lambda: server.service.hub.drain(5.0))
    try:
        with socket.create_connection(("127.0.0.1", server.port), 30.0) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        server.service.hub.resume()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"connection: close\r\n" in answer and b"draining" in answer


@pytest.mark.parametrize(
    ("strict", "models", "status"),
    [
        (True, ["batchable", "fixed"], 200),
        (True, ["batchable", "corrupt"], 503),
        (False, ["batchable", "corrupt"], 200),
        (False, ["corrupt"], 503),
        (True, [], 503),
    ],
)
def test_readiness_is_strict_or_not_and_never_ready_without_a_model(
    serve, tmp_path: Path, strict: bool, models: list[str], status: int
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in models:
        modelzoo.write(repo, name, b"junk" if name == "corrupt" else modelzoo.batchable())
    with serve(repo, server={"strict_readiness": strict}) as running:
        response = httpx.get(f"{running.url}/v2/health/ready")
    assert response.status_code == status, response.text
    if status == 503:
        assert response.headers["retry-after"]


def test_a_size_the_graph_cannot_compute_with_is_a_400_where_the_client_chose_it(
    tmp_path: Path, serve
) -> None:
    """x is [N, D] with D left open, and the graph multiplies it by a [4, 3] weight: D = 5 is the
    request's fault (ORT reports it as FAIL, as it reports a model's own): a 400 naming it, and D = 4
    is still answered."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = modelzoo._model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [weight],
    )
    repo = tmp_path / "repo"
    modelzoo.write(repo, "open", graph, manifest="[batching]\nmax_batch_size = 8\n")
    with serve(repo) as running, httpx.Client(base_url=running.url, timeout=30.0) as http:
        wrong = http.post("/v2/models/open/infer", content=_declared("x", "FP32", [1, 5], [1.0] * 5))
        assert wrong.status_code == 400, wrong.text
        assert "cannot compute with the input's sizes" in wrong.json()["error"]
        assert "MatMul dimension mismatch" in wrong.json()["error"]
        right = http.post("/v2/models/open/infer", content=_declared("x", "FP32", [1, 4], [1.0] * 4))
        assert right.status_code == 200 and right.json()["outputs"][0]["data"] == [4.0, 4.0, 4.0]


def test_a_size_failure_of_a_graph_whose_sizes_are_all_fixed_stays_the_models_fault() -> None:
    from appliance.engine import failures
    from appliance.errors import InferenceFailed, InvalidInput

    class Fail(Exception):  # the name ORT's pybind layer gives its FAIL status
        pass

    failure = Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code ... MatMul dimension mismatch")
    assert isinstance(failures.translate("m", failure, has_open_shapes=False), InferenceFailed)
    assert isinstance(failures.translate("m", failure, has_open_shapes=True), InvalidInput)


def test_memory_a_run_could_not_get_is_a_503_not_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.dataplane.outcomes import outcome_of
    from appliance.engine import failures

    class Fail(Exception):
        pass

    monkeypatch.setattr(failures, "total_memory_bytes", lambda: 16 << 30)  # a 16 GiB box
    arena = Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation: std::bad_alloc while running MatMul")
    for failure in (arena, Fail("Failed to allocate memory for requested buffer of size 8589934592")):
        refusal = failures.translate("m", failure)
        assert outcome_of(refusal).http_status == 503 and refusal.retry_after_s > 0, refusal
    assert outcome_of(failures.translate("m", MemoryError())).http_status == 503


def test_a_buffer_larger_than_all_of_the_machines_memory_is_a_413_not_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attention over an open sequence of 400,000 tokens asks ORT for a 640 GB buffer: no box of this
    size will ever have it, so the answer is the request's fault (413), not a 503 to retry."""
    from appliance.dataplane.outcomes import outcome_of
    from appliance.engine import failures
    from appliance.errors import Overloaded, RequestTooLarge

    class Fail(Exception):
        pass

    status = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running FusedMatMul node. "
        "Status Message: bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, "
        "onnxruntime::Stream*) Failed to allocate memory for requested buffer of size {}\n"
    )
    monkeypatch.setattr(failures, "total_memory_bytes", lambda: 16 << 30)
    never = failures.translate("m", Fail(status.format(640_000_000_000)), has_open_shapes=True)
    assert type(never) is RequestTooLarge and outcome_of(never).http_status == 413
    assert "needs a buffer of 640000000000 bytes, more than all of this machine's memory" in str(never)
    assert "(17179869184 bytes)" in str(never)
    within = failures.translate("m", Fail(status.format(16 << 30)), has_open_shapes=True)  # not more than all
    assert type(within) is Overloaded and outcome_of(within).http_status == 503
    monkeypatch.setattr(failures, "total_memory_bytes", lambda: None)  # the system does not say: try again
    assert type(failures.translate("m", Fail(status.format(640_000_000_000)))) is Overloaded
    monkeypatch.undo()
    total = failures.total_memory_bytes()
    assert total is not None and total > 0  # this machine's, as the service reads it
