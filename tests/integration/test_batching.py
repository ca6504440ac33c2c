"""Concurrent requests are batched, and each gets exactly its own rows back."""

from __future__ import annotations

import asyncio

import httpx
import modelzoo
import numpy as np
import onnxruntime as ort
import pytest

from appliance.protocol import codec


async def _post(client: httpx.AsyncClient, model: str, x: np.ndarray, binary: bool) -> dict[str, np.ndarray]:
    encoded = codec.encode_request({"x": x}, binary=binary, binary_output=binary)
    headers = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
    response = await client.post(f"/v2/models/{model}/infer", content=encoded.body(), headers=headers)
    assert response.status_code == 200, response.text
    length = response.headers.get(codec.HEADER_LENGTH)
    return codec.decode_response(response.content, int(length) if length else None)


def test_concurrent_requests_each_get_their_own_rows(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(
        repo,
        "batchable",
        modelzoo.batchable(),
        # A deadline far off: this test is about rows, and 96 requests at once queue for a while on 2 cores.
        manifest="slo_p99_ms = 60000.0\n[batching]\nmax_batch_size = 16\nmax_queue_delay_ms = 20.0\n",
    )
    reference = ort.InferenceSession(modelzoo.batchable().SerializeToString())
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((int(rng.integers(1, 5)), 4)).astype(np.float32) for _ in range(96)]

    async def scenario(url: str) -> list[dict[str, np.ndarray]]:
        limits = httpx.Limits(max_connections=96)
        async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
            return await asyncio.gather(
                *(_post(client, "batchable", x, binary=i % 2 == 0) for i, x in enumerate(inputs))
            )

    with serve(repo) as running:
        results = asyncio.run(scenario(running.url))
        stats = httpx.get(f"{running.url}/v2/models/batchable/stats").json()["model_stats"][0]
    for x, out in zip(inputs, results, strict=True):
        y, s = reference.run(["y", "s"], {"x": x})
        np.testing.assert_array_equal(out["y"], y)
        np.testing.assert_allclose(out["s"], s, rtol=1e-6)  # reduction order differs by batch size
    assert stats["inference_count"] == sum(len(x) for x in inputs)
    assert stats["inference_stats"]["success"]["count"] == len(inputs)
    assert stats["execution_count"] < len(inputs), "no two requests shared a batch"
    assert max(b["batch_size"] for b in stats["batch_stats"]) <= 16


def test_a_failing_request_does_not_fail_its_batch_mates(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "gather", modelzoo.gather(), manifest="[batching]\nmax_queue_delay_ms = 50.0\n")

    async def scenario(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:

            async def post(index: int) -> httpx.Response:
                body = codec.encode_request(
                    {"idx": np.array([[index]], np.int64)}, binary=False, binary_output=False
                ).body()
                return await client.post("/v2/models/gather/infer", content=body)

            return await asyncio.gather(*(post(i) for i in [0, 1, 9, 2, 1]))

    with serve(repo) as running:
        responses = asyncio.run(scenario(running.url))
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200]
    assert "out of data bounds" in responses[2].json()["error"]
    assert responses[3].json()["outputs"][0]["data"] == [4.0, 5.0]


@pytest.mark.parametrize("model", ["fixed", "scalar"])
def test_unbatched_models_run_one_request_at_a_time(serve, repository, model: str) -> None:
    async def scenario(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            shape = [1, 3] if model == "fixed" else []
            data = [1.0, 2.0, 3.0] if model == "fixed" else 2.0
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]}
            return await asyncio.gather(
                *(client.post(f"/v2/models/{model}/infer", json=body) for _ in range(20))
            )

    with serve(repository) as running:
        responses = asyncio.run(scenario(running.url))
        stats = httpx.get(f"{running.url}/v2/models/{model}/stats").json()["model_stats"][0]
    assert all(r.status_code == 200 for r in responses)
    assert stats["execution_count"] == 20
    assert {b["batch_size"] for b in stats["batch_stats"]} == {1}
