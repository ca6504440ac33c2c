"""Request bodies in a Content-Encoding on the inference route: tritonclient's request_compression_algorithm
works, Inference-Header-Content-Length counts the inflated body, other codings get 415, a zip bomb 413
after inflating no more than the limit, a corrupt stream 400; and a GET on the route is a 405 with Allow."""

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
from tests_support import strip_scheme

INFER = "/v2/models/batchable/infer"
JSON_BODY = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'


@pytest.fixture
def running(serve: Any, tmp_path: Path) -> Iterator[Any]:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
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
