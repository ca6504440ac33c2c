"""Triton's system shared-memory extension over HTTP, with tritonclient.utils.shared_memory and
tritonclient.http unchanged; bad regions get a precise 4xx and lose nothing."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import holds
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shm
from shm_objects import shm_object
from tests_support import strip_scheme
from tritonclient.utils import InferenceServerException


@pytest.fixture
def triton_client(server: Any) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(strip_scheme(server.url), network_timeout=30.0)
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def region() -> Iterator[Any]:
    """A tritonclient region factory; every region it made is destroyed afterwards."""
    made = []

    def create(name: str, byte_size: int) -> tuple[Any, str]:
        key = f"/appliance-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return handle, key

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_tritonclient_shared_memory_unchanged(triton_client: Any, region: Any) -> None:
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    inputs, in_key = region("input_data", x.nbytes)
    outputs, out_key = region("output_data", 64)
    shm.set_shared_memory_region(inputs, [x])
    triton_client.register_system_shared_memory("input_data", in_key, x.nbytes)
    triton_client.register_system_shared_memory("output_data", out_key, 64)

    tensor = triton.InferInput("x", [3, 4], "FP32")
    tensor.set_shared_memory("input_data", x.nbytes)
    y = triton.InferRequestedOutput("y", binary_data=True)
    y.set_shared_memory("output_data", 48)
    s = triton.InferRequestedOutput("s", binary_data=True)
    result = triton_client.infer("batchable", [tensor], outputs=[y, s])

    written = result.get_output("y")
    assert written["shape"] == [3, 4] and "data" not in written
    np.testing.assert_allclose(shm.get_contents_as_numpy(outputs, np.float32, [3, 4]), x * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-6)

    status = {r["name"]: r for r in triton_client.get_system_shared_memory_status()}
    assert status["input_data"] == {"name": "input_data", "key": in_key, "offset": 0, "byte_size": 48}
    assert triton_client.get_system_shared_memory_status("output_data")[0]["key"] == out_key
    triton_client.unregister_system_shared_memory("input_data")
    assert [r["name"] for r in triton_client.get_system_shared_memory_status()] == ["output_data"]
    triton_client.unregister_system_shared_memory()
    assert triton_client.get_system_shared_memory_status() == []


def test_offsets_and_bytes_tensors(triton_client: Any, region: Any) -> None:
    text = np.array([b"alpha", b"\xce\xb2eta"], dtype=np.object_)
    encoded = b"".join(len(t).to_bytes(4, "little") + t for t in text)
    handle, key = region("strings", 4096)
    # The region starts at byte 1000 of the object (not page-aligned): the input is there, and the
    # output goes 256 bytes into the region.
    shm.set_shared_memory_region(handle, [np.frombuffer(encoded, np.uint8)], offset=1000)
    triton_client.register_system_shared_memory("strings", key, 2048, offset=1000)
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_shared_memory("strings", len(encoded))
    echo = triton.InferRequestedOutput("echo")
    echo.set_shared_memory("strings", 512, offset=256)
    result = triton_client.infer("strings", [tensor], outputs=[echo])
    assert result.get_output("echo")["parameters"]["shared_memory_byte_size"] == len(encoded)
    assert shm.get_contents_as_numpy(handle, np.object_, [2], offset=1256).tolist() == text.tolist()


def _error(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value)


def test_bad_regions_get_a_precise_400_and_lose_nothing(server: Any, triton_client: Any, region: Any) -> None:
    x = np.ones((1, 4), np.float32)
    handle, key = region("in", 64)
    shm.set_shared_memory_region(handle, [x])
    triton_client.register_system_shared_memory("in", key, 64)

    def infer(region_name: str, byte_size: int, offset: int = 0) -> Any:
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory(region_name, byte_size, offset)
        return triton_client.infer("batchable", [tensor])

    assert "no shared-memory region 'nosuch' is registered" in _error(lambda: infer("nosuch", 16))
    assert "past the end of region 'in', which has 64 bytes" in _error(lambda: infer("in", 16, 56))
    assert "binary data of 8 bytes does not match FP32 shape [1, 4]" in _error(lambda: infer("in", 8))
    register = triton_client.register_system_shared_memory
    assert "not a POSIX shared-memory name" in _error(lambda: register("p", "/dev/shm/x", 8))
    assert "not a POSIX shared-memory name" in _error(lambda: register("p", "../../etc/passwd", 8))
    assert "no shared-memory object '/appliance-none' exists" in _error(
        lambda: register("p", "/appliance-none", 8)
    )
    assert "past the end of shared-memory object" in _error(lambda: register("p", key, 65))
    assert "is already registered" in _error(lambda: register("in", key, 8))
    with httpx.Client(base_url=server.url) as http:
        for body in (b"[1]", b"{", b'{"key": 5, "byte_size": 1}', b'{"key": "/x"}'):
            answer = http.post("/v2/systemsharedmemory/region/q/register", content=body)
            assert answer.status_code == 400 and answer.json()["error"], body
        assert http.post("/v2/cudasharedmemory/region/c/register", content=b"{}").status_code == 400
        assert http.get("/v2/cudasharedmemory/status").json() == []
        refused = http.get("/metrics").text
    assert 'appliance_refusals_total{model="batchable",priority="line",reason="bad_request"} 3.0' in refused
    result = infer("in", 16)  # the region and the server are as they were
    np.testing.assert_allclose(result.as_numpy("y"), x * 2 + 1)
    assert [r["name"] for r in triton_client.get_system_shared_memory_status()] == ["in"]


def test_limits_on_regions(serve: Any, repository: Any) -> None:
    with (
        serve(repository, server={"max_shm_regions": 2, "max_shm_bytes": 8192}) as running,
        shm_object(16384) as obj,
        httpx.Client(base_url=running.url) as http,
    ):

        def register(name: str, byte_size: int) -> httpx.Response:
            body = {"key": obj.key, "offset": 0, "byte_size": byte_size}
            return http.post(f"/v2/systemsharedmemory/region/{name}/register", json=body)

        assert register("a", 4096).status_code == 200
        too_big = register("b", 8192)
        assert too_big.status_code == 413 and "server.max_shm_bytes is 8192" in too_big.json()["error"]
        assert register("b", 4096).status_code == 200
        too_many = register("c", 1)
        assert too_many.status_code == 413 and "server.max_shm_regions" in too_many.json()["error"]
        assert len(http.get("/v2/systemsharedmemory/status").json()) == 2


def test_registration_needs_the_api_token(serve: Any, repository: Any) -> None:
    with serve(repository, server={"api_token": "s3cret"}) as running, shm_object(64) as obj:
        client = triton.InferenceServerClient(strip_scheme(running.url))
        assert "missing or wrong bearer token" in _error(
            lambda: client.register_system_shared_memory("r", obj.key, 64)
        )
        headers = {"Authorization": "Bearer s3cret"}
        client.register_system_shared_memory("r", obj.key, 64, headers=headers)
        assert client.get_system_shared_memory_status(headers=headers)[0]["name"] == "r"
        client.close()


def test_a_client_that_shrinks_its_objects_while_a_request_waits_does_not_stop_the_service(
    server: Any,
) -> None:
    """The object a queued request's input came from, or its output goes to, is truncated (a client
    crashed and re-created it) while the batch waits at the worker: no SIGBUS (exit -7) for the whole
    service. The input was copied when decoded; the output is refused with a 400 naming its region."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with (
        shm_object(4096) as inputs,
        shm_object(4096) as outputs,
        httpx.Client(base_url=server.url, timeout=30.0) as http,
        holds.installed() as batches,
    ):
        inputs.write(x.tobytes())
        for name, obj in (("in", inputs), ("out", outputs)):
            body = {"key": obj.key, "byte_size": 4096}
            assert http.post(f"/v2/systemsharedmemory/region/{name}/register", json=body).status_code == 200
        placed = {"shared_memory_region": "in", "shared_memory_byte_size": x.nbytes}
        tensor = {"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": placed}

        def held(request: dict[str, Any], shrink: Any) -> httpx.Response:
            answers: list[httpx.Response] = []
            with batches.holding(lambda batch: True):
                post = threading.Thread(
                    target=lambda: answers.append(http.post("/v2/models/batchable/infer", json=request))
                )
                post.start()
                batches.wait_held(1)  # decoded, admitted, at the worker: not yet run
                shrink()
            post.join()
            return answers[0]

        answer = held({"inputs": [tensor]}, lambda: inputs.truncate(0))
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == (x * 2 + 1).ravel().tolist()  # the bytes at decode

        inputs.truncate(4096)
        inputs.write(x.tobytes())
        wanted = [{"name": "y", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 32}}]
        answer = held({"inputs": [tensor], "outputs": wanted}, lambda: outputs.truncate(0))
        assert answer.status_code == 400
        assert "shrank to 0 bytes under region 'out'" in answer.json()["error"]
        assert os.path.getsize(outputs.path) == 0  # nothing written into the object the client shrank

        after = http.post("/v2/models/batchable/infer", json={"inputs": [tensor]})  # still serving
        assert after.status_code == 200 and after.json()["outputs"][0]["data"] == (x * 2 + 1).ravel().tolist()
