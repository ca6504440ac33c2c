"""Stock clients against the gateway: tritonclient.http with versioned routes and compressed requests,
and KServe's health bodies."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from gateway_harness import run_gateway, run_nodes, until
from pool_brokers import Broker
from pool_recorder import Names
from tritonclient.utils import InferenceServerException


def _offering(gateway: object) -> bool:
    nodes = gateway.nodes()["nodes"]  # type: ignore[attr-defined]
    return any(n["models"].get("batchable", {}).get("is_offer_usable") for n in nodes)


def _tritonclient_calls(url: str) -> dict[str, object]:
    """What a tritonclient.http user does with a model's version, against the gateway (blocking)."""
    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    try:
        version = client.get_model_metadata("batchable")["versions"][0]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        found: dict[str, object] = {
            "version": version,
            "ready": client.is_model_ready("batchable", version),
            "ready_other": client.is_model_ready("batchable", "99"),
            "metadata": client.get_model_metadata("batchable", version)["name"],
        }
        for binary in (False, True):
            given = triton_http.InferInput("x", [2, 4], "FP32")
            given.set_data_from_numpy(x, binary_data=binary)
            wanted = triton_http.InferRequestedOutput("y", binary_data=binary)
            result = client.infer("batchable", [given], outputs=[wanted], model_version=version)
            found[f"y_binary_{binary}"] = result.as_numpy("y")
            for algorithm in ("gzip", "deflate"):  # inflated by the gateway, sent on to the node as it is
                result = client.infer(
                    "batchable", [given], outputs=[wanted], request_compression_algorithm=algorithm
                )
                found[f"y_binary_{binary}_{algorithm}"] = result.as_numpy("y")
        try:
            client.infer("batchable", [given], model_version="99")
        except InferenceServerException as exc:
            found["other_version"] = (exc.status(), exc.message())
        # Ranked by the gateway from the tensors the node computed (test_gateway_classification.py).
        ranked = triton_http.InferRequestedOutput("y", class_count=2)
        found["classification"] = client.infer("batchable", [given], outputs=[ranked]).as_numpy("y")
        return found
    finally:
        client.close()


@pytest.mark.asyncio
async def test_tritonclient_names_the_version_and_kserve_reads_the_health_bodies(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    """Regression: the gateway had no /versions/{v} routes although its metadata lists a version
    (tritonclient's model_version gave 404 and is_model_ready(name, version) False), and answered
    health with `{}` where KServe's client reads `live` and `ready`."""
    with run_nodes(tmp_path, pool_repository, broker, names, 1), run_gateway(broker, names) as gateway:
        await until(lambda: _offering(gateway), what="the node offering")
        found = await asyncio.to_thread(_tritonclient_calls, gateway.url)
        assert found["ready"] is True and found["ready_other"] is False
        assert found["metadata"] == "batchable"
        expected = np.arange(8, dtype=np.float32).reshape(2, 4) * 2 + 1
        for binary in (False, True):
            for way in ("", "_gzip", "_deflate"):
                np.testing.assert_array_equal(found[f"y_binary_{binary}{way}"], expected)
        status, message = found["other_version"]  # type: ignore[misc]
        assert "404" in str(status) and f"serves version '{found['version']}'" in message
        assert found["classification"].tolist() == [  # type: ignore[attr-defined]
            [b"7.000000:3", b"5.000000:2"],
            [b"15.000000:3", b"13.000000:2"],
        ]
        extensions = (await asyncio.to_thread(httpx.get, f"{gateway.url}/v2")).json()["extensions"]
        assert extensions == ["binary_tensor_data", "classification"]

        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            assert (await http.get("/v2/health/live")).json() == {"live": True}
            assert (await http.get("/v2/health/ready")).json() == {"ready": True}
            ready = await http.get(f"/v2/models/batchable/versions/{found['version']}/ready")
            assert ready.json() == {"name": "batchable", "ready": True}
            gone = await http.get("/v2/models/batchable/versions/99")
            assert gone.status_code == 404 and "has no version '99'" in gone.json()["error"]
            got = await http.get(f"/v2/models/batchable/versions/{found['version']}/infer")
            assert got.status_code == 405 and got.headers["allow"] == "POST"

            infer = "/v2/models/batchable/infer"
            body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
            other = await http.post(infer, content=body, headers={"Content-Encoding": "br"})
            assert other.status_code == 415 and other.headers["accept-encoding"] == "gzip, deflate"
            limit = 4 * 1024 * 1024  # gateway.default_max_body_bytes
            bomb = gzip.compress(b" " * (limit + 1))  # 4 KB that would inflate past the buyer's limit
            refused = await http.post(infer, content=bomb, headers={"Content-Encoding": "gzip"})
            assert refused.status_code == 413 and f"may send {limit} bytes" in refused.json()["error"]
