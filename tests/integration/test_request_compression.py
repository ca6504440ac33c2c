"""Request bodies in a Content-Encoding on the inference route: tritonclient's request_compression_algorithm
works, Inference-Header-Content-Length counts the inflated body, other codings get 415, a zip bomb 413
after inflating no more than the limit, a corrupt stream 400; and a GET on the route is a 405 with Allow.
The other routes that read a body (repository index and load, shared-memory registration) read it as
the inference route does: inflated under their limits, from the same server.max_inflating_bytes."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import pytest
import tritonclient.http as triton
from shm_objects import shm_object
from tests_support import strip_scheme

from appliance.server.encoding import InflatingBudget
from appliance.server.inference import InferenceRoute
from appliance.server.repository import MAX_INDEX_BODY_BYTES, MAX_LOAD_BODY_BYTES
from appliance.server.shm import MAX_REGISTER_BYTES

INFER = "/v2/models/batchable/infer"
JSON_BODY = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'


@pytest.fixture
def running(serve: Any, tmp_path: Path) -> Iterator[Any]:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    modelzoo.write(repo, "fixed", modelzoo.fixed_batch())
    with serve(repo, scheduler={"instances": 1}) as service:
        yield service


@pytest.fixture
def client(running: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running.url, timeout=30.0) as http:
        yield http


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_request_compression_is_inflated_before_parsing(
    running: Any, algorithm: str, binary: bool
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = triton.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    client = triton.InferenceServerClient(strip_scheme(running.url), network_timeout=30.0)
    try:
        result = client.infer("batchable", [tensor], request_compression_algorithm=algorithm)
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2 + 1)
    np.testing.assert_array_equal(result.as_numpy("s"), x.sum(axis=1, keepdims=True))


def test_a_coding_not_taken_is_415_naming_those_that_are(running: Any, client: httpx.Client) -> None:
    refused = client.post(INFER, content=JSON_BODY, headers={"Content-Encoding": "br"})
    assert refused.status_code == 415
    assert refused.headers["Accept-Encoding"] == "gzip, deflate"
    assert refused.json()["error"] == (
        "Content-Encoding 'br' is not supported: send the body as it is (identity) or in one of gzip, deflate"
    )
    assert refused.headers.get("Connection") != "close"  # the short body was read: the connection serves on
    counted = running.service.plane.refusals.of_model("batchable")
    assert counted == {"line": {"bad_request": 1}}
    assert client.post(INFER, content=JSON_BODY, headers={"Content-Encoding": "identity"}).status_code == 200


def test_a_zip_bomb_is_refused_with_413_once_past_the_models_limit(
    running: Any, client: httpx.Client
) -> None:
    bomb = gzip.compress(b"[" * (48 << 20))  # 48 MiB in 47 KiB: the model takes 66 KiB, sent or inflated
    assert len(bomb) < 66 * 1024
    refused = client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    assert refused.status_code == 413
    assert (
        "request body is too large once inflated (gzip): model 'batchable' takes at most"
        in (refused.json()["error"])
    )
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\x1f\x8b not really gzip", "request body is not valid gzip data (Content-Encoding)"),
        (gzip.compress(JSON_BODY)[:-9], "request body ends before its gzip stream does"),
        (gzip.compress(JSON_BODY) + b"{}", "request body has bytes after the end of its gzip stream"),
    ],
)
def test_a_corrupt_or_truncated_stream_is_400(client: httpx.Client, body: bytes, says: str) -> None:
    refused = client.post(INFER, content=body, headers={"Content-Encoding": "gzip"})
    assert refused.status_code == 400
    assert says in refused.json()["error"]


def test_the_header_length_counts_the_inflated_body(client: httpx.Client) -> None:
    tensor = b'{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}'
    header = b'{"inputs": [' + tensor + b"]}"
    body = header + np.ones(4, np.float32).tobytes()
    answer = client.post(
        INFER,
        content=zlib.compress(body),
        headers={"Content-Encoding": "deflate", "Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [3.0] * 4


def test_a_get_on_the_inference_route_is_405_with_allow_post(client: httpx.Client) -> None:
    refused = client.get(INFER)
    assert refused.status_code == 405
    assert refused.headers["Allow"] == "POST"


INDEX = "/v2/repository/index"
LOAD = "/v2/repository/models/fixed/load"
UNLOAD = "/v2/repository/models/fixed/unload"
REGISTER = "/v2/systemsharedmemory/region/r/register"
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}


def _compressed(client: httpx.Client, path: str, body: bytes, algorithm: str) -> httpx.Response:
    return client.post(path, content=COMPRESS[algorithm](body), headers={"Content-Encoding": algorithm})


def _budget(running: Any) -> InflatingBudget:
    """server.max_inflating_bytes: the inference route's budget (the service's app, no api_token)."""
    route = running.service.app
    assert isinstance(route, InferenceRoute)
    return route.inflating


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_repository_request_is_answered_as_the_plain_one(
    client: httpx.Client, algorithm: str
) -> None:
    def both(path: str, body: bytes) -> tuple[httpx.Response, httpx.Response]:
        plain = client.post(path, content=body)
        compressed = _compressed(client, path, body, algorithm)
        assert compressed.status_code == plain.status_code == 200, compressed.text
        return plain, compressed

    plain, compressed = both(UNLOAD, b'{"parameters": {"unload_dependents": false}}')
    assert compressed.json() == plain.json() == {"name": "fixed", "state": "UNAVAILABLE"}
    for body in (b"{}", b'{"ready": false}', b'{"ready": true}'):
        plain, compressed = both(INDEX, body)
        assert compressed.json() == plain.json(), body
    assert [m["name"] for m in compressed.json()] == ["batchable"]  # {"ready": true}: fixed is unloaded
    plain, compressed = both(LOAD, b'{"parameters": {}}')
    assert compressed.json() == plain.json()
    assert compressed.json()["state"] == "READY"
    override = b'{"parameters": {"config": "{}"}}'
    refused, compressed = client.post(LOAD, content=override), _compressed(client, LOAD, override, algorithm)
    assert compressed.status_code == refused.status_code == 400
    assert compressed.json() == refused.json()
    assert "load parameter 'config'" in compressed.json()["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_shared_memory_registration_is_accepted(client: httpx.Client, algorithm: str) -> None:
    with shm_object(64) as obj:
        body = b'{"key": "%s", "offset": 8, "byte_size": 32}' % obj.key.encode()
        registered = _compressed(client, REGISTER, body, algorithm)
        assert registered.status_code == 200, registered.text
        listed = {"name": "r", "key": obj.key, "offset": 8, "byte_size": 32}
        assert registered.json() == listed
        assert client.get("/v2/systemsharedmemory/status").json() == [listed]
        assert client.post("/v2/systemsharedmemory/region/r/unregister").status_code == 200
        refused = _compressed(client, REGISTER, b'{"key": 5, "byte_size": 1}', algorithm)  # parsed, refused
        assert refused.status_code == 400


@pytest.mark.parametrize(
    ("path", "limit"),
    [(INDEX, MAX_INDEX_BODY_BYTES), (LOAD, MAX_LOAD_BODY_BYTES), (REGISTER, MAX_REGISTER_BYTES)],
)
def test_a_zip_bomb_to_a_json_route_is_413_holding_no_more_than_its_limit(
    running: Any, client: httpx.Client, path: str, limit: int
) -> None:
    """What the body inflates to is taken from the inference route's budget as it comes: the most taken
    is the route's limit (zlib is asked for one byte past it, which is refused, never taken)."""
    budget = _budget(running)
    take, held = budget.take, [0]

    def recording(size: int) -> None:
        take(size)
        held[0] = max(held[0], budget.taken_bytes)

    bomb = gzip.compress(b" " * (48 << 20))  # 48 MiB in 47 KiB: under every limit here as sent
    assert len(bomb) < min(MAX_INDEX_BODY_BYTES, MAX_REGISTER_BYTES)
    budget.take = recording  # type: ignore[method-assign]
    try:
        refused = client.post(path, content=bomb, headers={"Content-Encoding": "gzip"})
    finally:
        del budget.take
    assert refused.status_code == 413, refused.text
    assert "request body is too large once inflated (gzip)" in refused.json()["error"]
    assert str(limit) in refused.json()["error"]
    assert held[0] == limit
    assert budget.taken_bytes == 0  # given back once refused
    assert client.post(INDEX).status_code == 200


def test_the_json_routes_draw_on_the_inference_routes_inflating_budget(
    running: Any, client: httpx.Client
) -> None:
    """Compressed bodies being read on any route share server.max_inflating_bytes: with it spent (as
    inference bodies being read would spend it), a compressed body elsewhere is 503 + Retry-After, a
    plain one is read as ever."""
    budget = _budget(running)

    async def spend() -> None:
        budget.take(budget.limit_bytes)

    async def give_back() -> None:
        budget.give(budget.limit_bytes)

    running.call(spend)
    try:
        for path, body in ((INDEX, b"{}"), (LOAD, b"{}"), (REGISTER, b'{"key": "/x", "byte_size": 1}')):
            refused = _compressed(client, path, body, "gzip")
            assert refused.status_code == 503, (path, refused.text)
            assert "server.max_inflating_bytes" in refused.json()["error"]
            assert "Retry-After" in refused.headers
        assert client.post(INDEX, content=b"{}").status_code == 200
    finally:
        running.call(give_back)
    assert _compressed(client, INDEX, b"{}", "gzip").status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [(INDEX, b"{}"), (LOAD, b"{}"), (REGISTER, b'{"key": "/x", "byte_size": 1}')],
)
def test_a_coding_not_taken_by_a_json_route_is_415_naming_those_that_are(
    client: httpx.Client, path: str, body: bytes
) -> None:
    refused = client.post(path, content=body, headers={"Content-Encoding": "br"})
    assert refused.status_code == 415
    assert refused.headers["Accept-Encoding"] == "gzip, deflate"
    assert refused.json()["error"] == (
        "Content-Encoding 'br' is not supported: send the body as it is (identity) or in one of gzip, deflate"
    )
    assert refused.headers.get("Connection") != "close"  # the short body was read: the connection serves on
    layered = client.post(
        path, content=gzip.compress(gzip.compress(body)), headers={"Content-Encoding": "gzip, gzip"}
    )
    assert layered.status_code == 415
    assert client.post(INDEX, content=b"{}", headers={"Content-Encoding": "identity"}).status_code == 200
