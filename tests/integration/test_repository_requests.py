"""The repository extension's requests as Triton's clients send them: a load with Triton's overrides
(config, file:) is refused over HTTP and gRPC rather than answered OK for what is on disk, the index's
{"ready": true} filters over HTTP as over gRPC, and strict readiness skips a model unloaded on request."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import modelzoo
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tests_support import strip_scheme
from tritonclient.utils import InferenceServerException

from appliance.server.grpc import messages

OVERRIDES = "config and file: overrides are not supported; edit the model folder"


def repository(root: Path, *, with_corrupt: bool = False) -> Path:
    modelzoo.write(root, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    modelzoo.write(root, "fixed", modelzoo.fixed_batch())
    if with_corrupt:
        modelzoo.write(root, "corrupt", b"this is not an onnx file")
    return root


@pytest.fixture
def running(serve: Any, tmp_path: Path) -> Iterator[Any]:
    with serve(repository(tmp_path / "repo"), scheduler={"instances": 1}) as service:
        yield service


@pytest.fixture
def clients(running: Any) -> Iterator[tuple[Any, Any, httpx.Client]]:
    http = triton_http.InferenceServerClient(strip_scheme(running.url), network_timeout=30.0)
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{running.service.grpc.port}")
    with httpx.Client(base_url=running.url, timeout=30.0) as raw:
        yield http, grpc_client, raw
    http.close()
    grpc_client.close()


def _refusal(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value)


def test_a_load_with_a_config_or_file_override_is_refused_over_http_and_grpc(clients: Any) -> None:
    http, grpc_client, _ = clients
    config = json.dumps({"max_batch_size": 2})
    files = {"file:1/model.onnx": b"not an onnx file"}
    assert _refusal(lambda: http.load_model("batchable", config=config)) == (
        f"[400] load parameter 'config': {OVERRIDES}"
    )
    assert _refusal(lambda: http.load_model("batchable", config=config, files=files)) == (
        f"[400] load parameter 'config', 'file:1/model.onnx': {OVERRIDES}"
    )
    assert _refusal(lambda: grpc_client.load_model("batchable", config=config)) == (
        f"[StatusCode.INVALID_ARGUMENT] load parameter 'config': {OVERRIDES}"
    )
    assert _refusal(lambda: grpc_client.load_model("batchable", config=config, files=files)) == (
        f"[StatusCode.INVALID_ARGUMENT] load parameter 'config', 'file:1/model.onnx': {OVERRIDES}"
    )
    assert http.get_model_config("batchable")["max_batch_size"] == 8  # what is on disk, untouched
    assert http.is_model_ready("batchable")
    http.load_model("batchable")  # a plain load ({} over HTTP) still reloads
    grpc_client.load_model("batchable")
    assert http.is_model_ready("batchable")


def test_any_other_load_parameter_is_refused_as_tritons_grpc_refuses_it(running: Any, clients: Any) -> None:
    _, _, raw = clients
    refused = raw.post("/v2/repository/models/batchable/load", json={"parameters": {"foo": "1"}})
    assert refused.status_code == 400
    assert (
        refused.json()["error"] == f"unrecognized load parameter 'foo': a load here takes none ({OVERRIDES})"
    )
    request = messages.request_of("RepositoryModelLoad")(model_name="batchable")
    request.parameters["foo"].bool_param = True
    with grpc.insecure_channel(f"127.0.0.1:{running.service.grpc.port}") as channel:
        load = channel.unary_unary(f"/{messages.SERVICE}/RepositoryModelLoad")
        with pytest.raises(grpc.RpcError) as caught:
            load(request.SerializeToString(), timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (
        caught.value.details() == f"unrecognized load parameter 'foo': a load here takes none ({OVERRIDES})"
    )


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"[]", 400, "load request body is an array; expected a JSON object"),
        (b"{", 400, "load request body is not valid JSON"),
        (b'{"parameters": "config"}', 400, "load request's 'parameters' is a string; expected an object"),
        (b'{"parameters": {"file:' + b"p" * 5000 + b'": ""}}', 400, "load parameter 'file:ppp"),
        (b'{"parameters": {"file:x": "' + b"A" * (2 << 20) + b'"}}', 413, OVERRIDES),
    ],
)
def test_a_hostile_load_body_is_a_precise_4xx(clients: Any, body: bytes, status: int, says: str) -> None:
    _, _, raw = clients
    refused = raw.post("/v2/repository/models/batchable/load", content=body)
    assert refused.status_code == status
    assert says in refused.json()["error"]
    assert len(refused.json()["error"]) < 400


def test_the_http_index_honours_ready_as_grpc_does(running: Any, clients: Any) -> None:
    http, grpc_client, raw = clients
    http.unload_model("fixed")
    everything = raw.post("/v2/repository/index").json()
    assert [(m["name"], m["state"], m["reason"]) for m in everything] == [
        ("batchable", "READY", ""),
        ("fixed", "UNAVAILABLE", "unloaded"),
    ]
    assert raw.post("/v2/repository/index", json={"ready": False}).json() == everything
    ready = raw.post("/v2/repository/index", json={"ready": True}).json()
    assert [m["name"] for m in ready] == ["batchable"]
    over_grpc = grpc_client.get_model_repository_index(as_json=True)["models"]
    assert [m["name"] for m in over_grpc] == ["batchable", "fixed"]
    ready_over_grpc = messages.request_of("RepositoryIndex")(ready=True)
    with grpc.insecure_channel(f"127.0.0.1:{running.service.grpc.port}") as channel:
        answer = channel.unary_unary(f"/{messages.SERVICE}/RepositoryIndex")(
            ready_over_grpc.SerializeToString(), timeout=30
        )
    listed = messages.response_of("RepositoryIndex").FromString(answer)
    assert [m.name for m in listed.models] == ["batchable"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"ready": "yes"}', "index request's 'ready' is a string; expected true or false"),
        (b'{"ready": 1}', "index request's 'ready' is a number; expected true or false"),
        (b"true", "index request body is a boolean; expected a JSON object"),
        (b"\xff", "index request body is not valid JSON"),
    ],
)
def test_a_hostile_index_body_is_400(clients: Any, body: bytes, says: str) -> None:
    _, _, raw = clients
    refused = raw.post("/v2/repository/index", content=body)
    assert refused.status_code == 400
    assert says in refused.json()["error"]


def test_strict_readiness_skips_a_model_unloaded_on_request_but_not_one_that_fails(
    running: Any, clients: Any, tmp_path: Path
) -> None:
    http, grpc_client, raw = clients
    assert http.is_server_ready() and grpc_client.is_server_ready()
    http.unload_model("fixed")
    assert http.is_server_ready() and grpc_client.is_server_ready()  # Triton: "unloaded" is on purpose
    assert raw.get("/v2/health/ready").json() == {"ready": True}
    (tmp_path / "repo" / "fixed" / "1" / "model.onnx").write_bytes(b"broken since")
    with pytest.raises(InferenceServerException):
        http.load_model("fixed")
    assert not http.is_server_ready() and not grpc_client.is_server_ready()
    assert raw.get("/v2/health/ready").json()["error"] == (
        "not every model is READY (server.strict_readiness): fixed (UNAVAILABLE)"
    )


def test_a_model_that_failed_to_load_still_counts_beside_one_unloaded(serve: Any, tmp_path: Path) -> None:
    with (
        serve(repository(tmp_path / "repo", with_corrupt=True), scheduler={"instances": 1}) as running,
        httpx.Client(base_url=running.url, timeout=30.0) as raw,
    ):
        assert raw.post("/v2/repository/models/fixed/unload").status_code == 200
        not_ready = raw.get("/v2/health/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["error"] == (
            "not every model is READY (server.strict_readiness): corrupt (UNAVAILABLE)"
        )
        assert raw.post("/v2/repository/models/batchable/unload").status_code == 200
        assert raw.get("/v2/health/ready").json()["error"] == (
            "no model is READY; models: batchable (UNAVAILABLE), corrupt (UNAVAILABLE), fixed (UNAVAILABLE)"
        )


def test_a_model_deleted_from_disk_is_forgotten_when_unloaded(
    running: Any, clients: Any, tmp_path: Path
) -> None:
    """Regression: it stayed in the index as unloaded until a restart, though no load could bring it back."""
    http, _, raw = clients
    shutil.rmtree(tmp_path / "repo" / "fixed")
    http.unload_model("fixed")
    assert [m["name"] for m in raw.post("/v2/repository/index").json()] == ["batchable"]
    assert raw.get("/v2/models/fixed").status_code == 404
    http.unload_model("batchable")  # still on disk: listed as unloaded, and loads again
    assert [(m["name"], m["reason"]) for m in raw.post("/v2/repository/index").json()] == [
        ("batchable", "unloaded")
    ]
    http.load_model("batchable")
    assert http.is_model_ready("batchable")


@pytest.mark.parametrize("path", ["/v2/repository/index", "/v2/repository/models/batchable/load"])
def test_a_client_gone_mid_body_is_no_error(
    running: Any, clients: Any, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: ClientDisconnected from a repository request's body escaped as a 500 and a logged
    traceback per request, which any client could repeat to flood the logs."""
    host, port = running.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
    _, _, raw = clients
    assert raw.get("/v2/health/live").status_code == 200  # served after it
    assert [m["name"] for m in raw.post("/v2/repository/index").json()] == ["batchable", "fixed"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("rpc", ["RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"])
def test_a_grpc_repository_request_naming_a_repository_is_refused(running: Any, rpc: str) -> None:
    """As Triton refuses it; before, it was answered for the one repository there is (an unload included)."""
    fields = (
        {"repository_name": "other"}
        if rpc == "RepositoryIndex"
        else {"repository_name": "other", "model_name": "fixed"}
    )
    request = messages.request_of(rpc)(**fields)
    with (
        grpc.insecure_channel(f"127.0.0.1:{running.service.grpc.port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        channel.unary_unary(f"/{messages.SERVICE}/{rpc}")(request.SerializeToString(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "repository_name 'other' is not supported: this server has one repository" in refused.value.details()
    )
    assert running.service.hub.entry("fixed").scheduler is not None  # still served
