"""Inference over HTTP: JSON and binary tensors both ways, every model shape, every error class."""

from __future__ import annotations

import socket
import threading

import httpx
import modelzoo
import numpy as np
import orjson
import pytest

from appliance.protocol import codec


def infer(client: httpx.Client, model: str, inputs: dict[str, np.ndarray], **kwargs) -> httpx.Response:
    encoded = codec.encode_request(inputs, **kwargs)
    headers = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
    return client.post(f"/v2/models/{model}/infer", content=encoded.body(), headers=headers)


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    length = response.headers.get(codec.HEADER_LENGTH)
    return codec.decode_response(response.content, int(length) if length else None)


@pytest.mark.parametrize("binary", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_output", [False, True], ids=["json-out", "binary-out"])
def test_batchable_model_round_trips(client: httpx.Client, binary: bool, binary_output: bool) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    response = infer(client, "batchable", {"x": x}, binary=binary, binary_output=binary_output)
    out = outputs_of(response)
    np.testing.assert_array_equal(out["y"], x * 2 + 1)
    np.testing.assert_array_equal(out["s"], x.sum(axis=1, keepdims=True))
    is_binary = codec.HEADER_LENGTH in response.headers
    assert is_binary == binary_output
    assert response.headers["content-type"] == (
        "application/octet-stream" if is_binary else "application/json"
    )


def test_json_request_answers_in_v2_shape(client: httpx.Client) -> None:
    body = {
        "id": "r-1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}],
        "outputs": [{"name": "s"}],
    }
    response = client.post("/v2/models/batchable/infer", json=body)
    assert response.status_code == 200
    assert response.json() == {
        "model_name": "batchable",
        "model_version": "1",
        "id": "r-1",
        "outputs": [{"name": "s", "datatype": "FP32", "shape": [1, 1], "data": [10.0]}],
    }


def test_versioned_route_and_output_selection_mixed_binary(client: httpx.Client) -> None:
    x = np.ones((2, 4), np.float32)
    encoded = codec.encode_request({"x": x}, binary=True, outputs=["s"], binary_output=True)
    response = client.post(
        "/v2/models/batchable/versions/1/infer",
        content=encoded.body(),
        headers={codec.HEADER_LENGTH: str(encoded.header_length)},
    )
    out = outputs_of(response)
    assert list(out) == ["s"]
    np.testing.assert_array_equal(out["s"], [[4.0], [4.0]])


def test_fixed_batch_scalar_strings_mixed_and_half(client: httpx.Client) -> None:
    x = np.array([[1, -2, 3]], np.float32)
    np.testing.assert_array_equal(outputs_of(infer(client, "fixed", {"x": x}))["y"], -x)

    scalar = outputs_of(infer(client, "scalar", {"x": np.array(3.0, np.float32)}, binary=False))["y"]
    assert scalar.shape == () and scalar == 9.0

    text = np.array([b"caf\xc3\xa9", b"", b"line\nfeed"], dtype=object)
    for binary in (False, True):
        out = outputs_of(infer(client, "strings", {"text": text}, binary=binary, binary_output=binary))
        assert list(out["echo"]) == list(text)
        assert out["n"].tolist() == [3]

    a = np.array([[1, 2], [3, 4]], np.int64)
    b = np.array([[0.5, 0.5], [1.0, 1.0]], np.float32)
    m = np.array([[True, False], [False, True]])
    out = outputs_of(infer(client, "mixed", {"a": a, "b": b, "m": m}, binary=False, binary_output=False))
    np.testing.assert_array_equal(out["c"], np.where(m, a + b, 0).astype(np.float32))
    np.testing.assert_array_equal(out["k"], a * 3)
    assert out["k"].dtype == np.int64

    h = np.array([[1.5, -2.0]], np.float16)
    out = outputs_of(infer(client, "half", {"x": h}))
    assert out["y"].dtype == np.float16
    np.testing.assert_array_equal(out["y"], h + h)


def test_stock_http_client_without_content_type(client: httpx.Client) -> None:
    """tritonclient sends binary with no Content-Type header at all."""
    encoded = codec.encode_request({"x": np.zeros((1, 4), np.float32)}, binary=True)
    request = client.build_request(
        "POST",
        "/v2/models/batchable/infer",
        content=encoded.body(),
        headers={codec.HEADER_LENGTH: str(encoded.header_length)},
    )
    request.headers.pop("content-type", None)
    assert "content-type" not in request.headers
    assert client.send(request).status_code == 200


BAD_REQUESTS = [
    ("not json", "not valid JSON"),
    ('{"inputs": []}', "non-empty list"),
    ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}', "neither 'data' nor"),
    ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}', "has 2 values"),
    (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a", "b", "c", "d"]}]}',
        "numbers",
    ),
    (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}',
        "input 'x' has shape [1, 3]; model expects [N, 4] with N <= 8",
    ),
    (
        '{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}',
        "input 'x' has datatype INT32; model expects FP32",
    ),
    (
        '{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}',
        "unknown input 'z'",
    ),
    (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [9, 4], "data": ' + str([0] * 36) + "}]}",
        "has 9 rows; model expects [N, 4] with N <= 8",
    ),
    ('{"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 4], "data": [1, 2, 3, 4]}]}', "BF16"),
    ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -4], "data": [1]}]}', "non-negative"),
    (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], '
        '"outputs": [{"name": "nope"}]}',
        "unknown output 'nope'",
    ),
    (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], '
        '"parameters": {"timeout": -5}}',
        "parameter 'timeout'",
    ),
    ("[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
def test_bad_requests_get_400_naming_the_problem(client: httpx.Client, body: str, message: str) -> None:
    response = client.post("/v2/models/batchable/infer", content=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_binary_errors(client: httpx.Client) -> None:
    header = (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], '
        b'"parameters": {"binary_data_size": 16}}]}'
    )
    short = client.post(
        "/v2/models/batchable/infer",
        content=header + b"\0" * 8,
        headers={codec.HEADER_LENGTH: str(len(header))},
    )
    assert short.status_code == 400 and "only 8 bytes remain" in short.json()["error"]
    extra = client.post(
        "/v2/models/batchable/infer",
        content=header + b"\0" * 20,
        headers={codec.HEADER_LENGTH: str(len(header))},
    )
    assert extra.status_code == 400 and "4 bytes of binary data that no input claims" in extra.json()["error"]
    beyond = client.post("/v2/models/batchable/infer", content=header, headers={codec.HEADER_LENGTH: "9999"})
    assert beyond.status_code == 400 and "Inference-Header-Content-Length is 9999" in beyond.json()["error"]
    garbage = client.post("/v2/models/batchable/infer", content=header, headers={codec.HEADER_LENGTH: "abc"})
    assert garbage.status_code == 400
    no_header = client.post("/v2/models/batchable/infer", content=header + b"\0" * 16)
    assert no_header.status_code == 400 and "Inference-Header-Content-Length" in no_header.json()["error"]


def post_parts(
    client: httpx.Client, model: str, header: dict, blob: bytes = b""
) -> tuple[httpx.Response, dict | None, bytes]:
    """A request assembled by hand: its JSON header, then `blob`; the answer split the same way."""
    head = orjson.dumps(header)
    response = client.post(
        f"/v2/models/{model}/infer", content=head + blob, headers={codec.HEADER_LENGTH: str(len(head))}
    )
    length = response.headers.get(codec.HEADER_LENGTH)
    if response.status_code != 200 or length is None:
        return response, None, b""
    return response, orjson.loads(response.content[: int(length)]), response.content[int(length) :]


def test_mixed_binary_and_json_inputs_and_outputs(client: httpx.Client) -> None:
    a = np.array([[1, 2], [3, 4]], np.int64)
    m = np.array([[True, False], [False, True]])
    header = {
        "inputs": [
            {"name": "a", "datatype": "INT64", "shape": [2, 2], "parameters": {"binary_data_size": a.nbytes}},
            {"name": "b", "datatype": "FP32", "shape": [2, 2], "data": [0.5, 1.5, 2.5, 3.5]},
            {"name": "m", "datatype": "BOOL", "shape": [2, 2], "parameters": {"binary_data_size": m.nbytes}},
        ],
        "outputs": [{"name": "c", "parameters": {"binary_data": True}}, {"name": "k"}],
    }
    response, document, blob = post_parts(client, "mixed", header, a.tobytes() + m.tobytes())
    assert response.status_code == 200, response.text
    assert document is not None
    c, k = document["outputs"]
    assert (c["name"], c["parameters"], "data" in c) == ("c", {"binary_data_size": 16}, False)
    expected_c = np.where(m, a + np.array([[0.5, 1.5], [2.5, 3.5]]), 0).astype(np.float32)
    np.testing.assert_array_equal(np.frombuffer(blob, np.float32).reshape(2, 2), expected_c)
    assert (k["name"], k["data"], "parameters" in k) == ("k", [3, 6, 9, 12], False)
    assert len(blob) == 16  # only the binary output follows the header


def test_rank_0_tensors_in_and_out_as_binary(client: httpx.Client) -> None:
    header = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [], "parameters": {"binary_data_size": 4}}],
        "parameters": {"binary_data_output": True},
    }
    response, document, blob = post_parts(client, "scalar", header, np.float32(3.0).tobytes())
    assert document is not None, response.text
    assert document["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [], "parameters": {"binary_data_size": 4}}
    ]
    assert np.frombuffer(blob, np.float32).tolist() == [9.0]


def test_zero_size_tensors(client: httpx.Client) -> None:
    """An empty BYTES tensor runs (its outputs are empty too); zero rows for a batched model are refused."""
    header = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [0], "parameters": {"binary_data_size": 0}}
        ],
        "parameters": {"binary_data_output": True},
    }
    response, document, blob = post_parts(client, "strings", header)
    assert document is not None, response.text
    echo, n = document["outputs"]
    assert (echo["shape"], echo["parameters"]) == ([0], {"binary_data_size": 0})
    assert (n["shape"], n["parameters"]) == ([1], {"binary_data_size": 8})
    assert np.frombuffer(blob, np.int64).tolist() == [0]  # n: the length of the empty tensor
    for binary in (True, False):
        empty = np.zeros((0, 4), np.float32)
        refused = infer(client, "batchable", {"x": empty}, binary=binary)
        assert refused.status_code == 400
        assert refused.json()["error"] == "inputs have 0 rows; send at least one"


@pytest.mark.parametrize(
    ("model", "header", "blob", "message"),
    [
        (
            "batchable",
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "parameters": {"binary_data_size": -16},
                    }
                ]
            },
            b"\0" * 16,
            "input 'x' binary_data_size must be a non-negative integer",
        ),
        (
            "strings",
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}
                ]
            },
            (10).to_bytes(4, "little") + b"ab",
            "input 'text': BYTES tensor truncated: element 0 declares 10 bytes, 2 remain",
        ),
        (
            "strings",
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 3}}
                ]
            },
            b"\x01\x00\x00",
            "input 'text': BYTES tensor truncated: length prefix at byte 0 is incomplete",
        ),
        (
            "strings",
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 6}}
                ]
            },
            (2).to_bytes(4, "little") + b"ab",
            "input 'text': BYTES tensor has 1 elements; shape [2] needs 2",
        ),
    ],
    ids=["negative-binary-data-size", "bytes-prefix-past-the-end", "bytes-prefix-cut", "bytes-too-few"],
)
def test_malformed_binary_layouts_get_400(
    client: httpx.Client, model: str, header: dict, blob: bytes, message: str
) -> None:
    response, _, _ = post_parts(client, model, header, blob)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == message


def test_runtime_rejection_of_input_values_is_a_400(client: httpx.Client) -> None:
    response = infer(client, "gather", {"idx": np.array([[7]], np.int64)})
    assert response.status_code == 400
    assert "indices element out of data bounds" in response.json()["error"]


def test_unknown_and_unavailable_models(client: httpx.Client) -> None:
    x = {"x": np.zeros((1, 4), np.float32)}
    missing = infer(client, "nope", x)
    assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]
    version = client.post("/v2/models/batchable/versions/7/infer", content=b"{}")
    assert version.status_code == 404 and "version 7 is not served" in version.json()["error"]
    for name, reason in [
        ("corrupt", "INVALID_PROTOBUF"),
        ("unknown_op", "NoSuchOperator"),
        ("future_opset", "Opset 99"),
        ("missing_weights", "weights.bin"),
        ("bad_digest", "model.toml expects 0000"),
    ]:
        response = infer(client, name, x)
        assert response.status_code == 503, name
        assert "UNAVAILABLE" in response.json()["error"] and reason in response.json()["error"], name
        assert response.headers["retry-after"]
    assert client.post("/v2/models/batchable/infer").status_code == 400
    assert client.get("/v2/nothing-here").status_code == 404
    assert client.get("/v2/nothing-here").json()["error"] == "no route GET /v2/nothing-here"
    assert client.get("/v2/models/batchable/infer").status_code == 405


def test_oversized_body_is_refused_and_the_refusal_always_arrives(serve, repository) -> None:
    with (
        serve(repository, server={"max_body_bytes": 1024}) as running,
        httpx.Client(base_url=running.url) as http,
    ):
        big = infer(http, "batchable", {"x": np.zeros((8, 4), np.float32)}, binary=False)
        assert big.status_code == 200
        # A body up to body.DRAIN_BYTES is read and dropped before the 413: closing on unread bytes
        # would send a reset, which can beat the answer to the client. The connection stays open.
        declared = http.post("/v2/models/batchable/infer", content=b"x" * 2048)
        assert declared.status_code == 413 and "at most 1024 bytes" in declared.json()["error"]
        assert declared.headers.get("connection") != "close"

        def chunks():
            for _ in range(64):
                yield b"y" * 64

        streamed = http.post("/v2/models/batchable/infer", content=chunks())
        assert streamed.status_code == 413 and streamed.headers.get("connection") != "close"
        assert infer(http, "batchable", {"x": np.zeros((1, 4), np.float32)}).status_code == 200
        # A longer one is never read: the 413 comes at once, from the declared length, and the
        # connection closes (here the body is never sent: the server must not wait for it).
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = (
                f"POST /v2/models/batchable/infer HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Length: {64 * 1024 * 1024}\r\n\r\n"
            )
            sock.sendall(head.encode())
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()


def test_metadata_config_stats_and_index(client: httpx.Client) -> None:
    assert client.get("/v2").json()["name"] == "appliance"
    assert client.get("/v2/health/live").status_code == 200
    not_ready = client.get("/v2/health/ready")  # strict readiness: the repository has broken models
    assert not_ready.status_code == 503 and "corrupt (UNAVAILABLE)" in not_ready.json()["error"]
    meta = client.get("/v2/models/batchable").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["provider"] == "cpu"
    assert client.get("/v2/models/batchable/versions/1").status_code == 200
    assert client.get("/v2/models/batchable/ready").json() == {"name": "batchable", "ready": True}
    not_ready = client.get("/v2/models/corrupt/ready")
    assert not_ready.status_code == 503 and "INVALID_PROTOBUF" in not_ready.json()["error"]
    assert client.get("/v2/models/nope/ready").status_code == 404
    config = client.get("/v2/models/batchable/config").json()
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000
    assert config["appliance"]["provider"] == "cpu"
    assert client.get("/v2/models/fixed/config").json()["max_batch_size"] == 0
    infer(client, "batchable", {"x": np.zeros((3, 4), np.float32)})
    stats = client.get("/v2/models/batchable/stats").json()["model_stats"][0]
    assert stats["inference_count"] >= 3 and stats["inference_stats"]["success"]["count"] >= 1
    assert stats["latency_profile"]["observations"] > 0
    index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
    assert index["batchable"]["state"] == "READY"
    assert index["corrupt"]["state"] == "UNAVAILABLE" and "INVALID_PROTOBUF" in index["corrupt"]["reason"]


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    infer(client, "batchable", {"x": np.zeros((2, 4), np.float32)})
    infer(client, "batchable", {"x": np.zeros((2, 3), np.float32)})
    for name in ("nosuch-1", "nosuch-2"):
        infer(client, name, {"x": np.zeros((2, 4), np.float32)})
    text = client.get("/metrics").text
    assert 'appliance_requests_total{model="batchable",outcome="success",priority="line"}' in text
    assert 'appliance_model_ready{model="corrupt",provider=""} 0' in text
    assert 'appliance_batch_rows_bucket{le="2",model="batchable"}' in text
    assert 'appliance_refusals_total{model="batchable",priority="line",reason="bad_request"} 1.0' in text
    assert 'appliance_refusals_total{model="_unknown",priority="line",reason="not_found"} 2.0' in text
    assert "nosuch" not in text
    assert "process_resident_memory_bytes" in text
    assert 'python_gc_collections_total{generation="2"}' in text  # full collections hold the GIL
    stats = client.get("/v2/models/batchable/stats").json()["model_stats"][0]
    assert stats["refusals"] == {"line": {"bad_request": 1}}
    assert "# TYPE appliance_compute_duration_seconds histogram" in text
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))


def test_capacity_report(client: httpx.Client) -> None:
    report = client.get("/capacity").json()
    batchable = report["models"]["batchable"]
    assert batchable["provider"] == "cpu" and batchable["max_ips_at_slo"] > 0
    assert batchable["spare_ips_at_slo"] <= batchable["max_ips_at_slo"]
    assert report["models"]["corrupt"]["state"] == "UNAVAILABLE"


def _posting(url: str, x: np.ndarray, **parameters: int) -> tuple[threading.Thread, list[httpx.Response]]:
    """POST an inference from a thread of its own; its answer lands in the list."""
    body = codec.encode_request({"x": x}, binary=False, binary_output=False, parameters=parameters).body()
    answers: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{url}/v2/models/batchable/infer", content=body, timeout=60)
        )
    )
    thread.start()
    return thread, answers


ONE_WORKER = "slo_p99_ms = 600000.0\ninstances = 1\n[batching]\nmax_batch_size = 1\n"


def test_overload_is_a_503_with_retry_after_never_a_500(serve, tmp_path, batches) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=ONE_WORKER)
    with serve(repo, scheduler={"line_queue_max_requests": 1}) as running:
        with batches.holding(lambda batch: batch.marks == (0.0,)):
            first = _posting(running.url, np.zeros((1, 4), np.float32))
            batches.wait_held()  # running
            second = _posting(running.url, np.ones((1, 4), np.float32))
            running.wait_inflight("batchable", 2)  # queued ahead on the busy worker
            third = _posting(running.url, np.full((1, 4), 2.0, np.float32))
            running.wait_inflight("batchable", 3)  # in the line queue, which holds one
            with httpx.Client(base_url=running.url, timeout=60) as client:
                refused = [infer(client, "batchable", {"x": np.ones((1, 4), np.float32)}) for _ in range(3)]
        for thread, _ in (first, second, third):
            thread.join(60)
    assert [answers[0].status_code for _, answers in (first, second, third)] == [200, 200, 200]
    assert [r.status_code for r in refused] == [503, 503, 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all("line queue is full (1 requests waiting)" in r.json()["error"] for r in refused)
    assert [batch.marks for batch in batches.of("batchable")] == [(0.0,), (1.0,), (2.0,)]


def test_a_request_whose_timeout_passes_in_the_queue_is_a_503_and_never_runs(
    serve, tmp_path, batches
) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=ONE_WORKER)
    with serve(repo) as running:
        with batches.holding(lambda batch: batch.marks == (0.0,)):
            first = _posting(running.url, np.zeros((1, 4), np.float32))
            batches.wait_held()
            second = _posting(running.url, np.ones((1, 4), np.float32))
            running.wait_inflight("batchable", 2)  # queued ahead on the busy worker: the line queue is empty
            # parameters.timeout (us, as Triton): 100 ms, which it spends waiting in the line queue.
            with httpx.Client(base_url=running.url, timeout=60) as client:
                late = infer(
                    client,
                    "batchable",
                    {"x": np.full((1, 4), 2.0, np.float32)},
                    parameters={"timeout": 100_000},
                )
        for thread, _ in (first, second):
            thread.join(60)
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
    assert (
        "expired in the queue" in late.json()["error"]
        and "(deadline 100.0 ms); it was not run" in late.json()["error"]
    )
    assert [answers[0].status_code for _, answers in (first, second)] == [200, 200]
    assert [batch.marks for batch in batches.of("batchable")] == [(0.0,), (1.0,)]


def test_inputs_that_share_a_symbolic_dimension_must_agree_on_it(serve, tmp_path) -> None:
    """input_ids / attention_mask: both [batch, seq]. Unequal seqs are the client's error (a 400 that
    names both inputs and the dimension), not the runtime's (a 500); equal ones of any length serve."""
    repo = tmp_path / "pair-repo"
    modelzoo.write(repo, "paired", modelzoo.paired(), manifest="[batching]\nmax_batch_size = 4\n")
    with serve(repo) as running, httpx.Client(base_url=running.url, timeout=30.0) as client:
        metadata = client.get("/v2/models/paired").json()
        assert [i["shape"] for i in metadata["inputs"]] == [[-1, -1], [-1, -1]]
        for seq in (4, 3):
            ids, mask = np.arange(2 * seq, dtype=np.float32).reshape(2, seq), np.ones((2, seq), np.float32)
            np.testing.assert_array_equal(
                outputs_of(infer(client, "paired", {"ids": ids, "mask": mask}))["out"], ids
            )
        for binary in (False, True):
            unequal = {"ids": np.ones((1, 4), np.float32), "mask": np.ones((1, 3), np.float32)}
            refused = infer(client, "paired", unequal, binary=binary)
            assert refused.status_code == 400, refused.text
            assert refused.json() == {"error": "inputs 'ids' and 'mask' share dimension 'seq': 4 and 3"}
        rows = infer(
            client, "paired", {"ids": np.ones((2, 4), np.float32), "mask": np.ones((1, 4), np.float32)}
        )
        assert rows.status_code == 400 and "has 1 rows; other inputs have 2" in rows.json()["error"]
        ids = np.ones((1, 5), np.float32)
        np.testing.assert_array_equal(
            outputs_of(infer(client, "paired", {"ids": ids, "mask": ids}))["out"], ids
        )
