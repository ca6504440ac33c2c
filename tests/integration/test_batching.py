"""Concurrent requests are batched, and each gets exactly its own rows back.

Requests queue behind a batch held at the worker (tests/holds.py) until every one is admitted, so
which of them can share a batch never depends on how fast the box is.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import modelzoo
import numpy as np
import onnxruntime as ort
import pytest

from appliance.protocol import codec

OPENER = 1000.0  # the value of the request that holds the worker while the others queue behind it


async def _post(client: httpx.AsyncClient, model: str, x: np.ndarray, binary: bool) -> dict[str, np.ndarray]:
    encoded = codec.encode_request({"x": x}, binary=binary, binary_output=binary)
    headers = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
    response = await client.post(f"/v2/models/{model}/infer", content=encoded.body(), headers=headers)
    assert response.status_code == 200, response.text
    length = response.headers.get(codec.HEADER_LENGTH)
    return codec.decode_response(response.content, int(length) if length else None)


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(serve, tmp_path, batches) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(
        repo,
        "batchable",
        modelzoo.batchable(),
        # No waiting for rows that have not come: only requests already queued share a batch. One
        # warm-up size: the profile is a line, so the batcher aims for max_batch_size rows.
        manifest="slo_p99_ms = 600000.0\ninstances = 1\n"
        "[batching]\nmax_batch_size = 16\npreferred_batch_sizes = [16]\n"
        "max_queue_delay_ms = 0.0\n",
    )
    reference = ort.InferenceSession(modelzoo.batchable().SerializeToString())
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((int(rng.integers(1, 5)), 4)).astype(np.float32) for _ in range(96)]

    async def scenario(running) -> list[dict[str, np.ndarray]]:
        limits = httpx.Limits(max_connections=97)
        async with httpx.AsyncClient(base_url=running.url, timeout=60.0, limits=limits) as client:
            # One worker (instances = 1), held by the opener: the others queue behind it.
            with batches.holding(lambda batch: batch.marks == (OPENER,)):
                opener = asyncio.create_task(
                    _post(client, "batchable", np.full((1, 4), OPENER, np.float32), True)
                )
                await asyncio.to_thread(batches.wait_held)
                posts = [
                    asyncio.create_task(_post(client, "batchable", x, binary=i % 2 == 0))
                    for i, x in enumerate(inputs)
                ]
                await running.inflight_reaches("batchable", 1 + len(inputs))
            await opener
            return await asyncio.gather(*posts)

    with serve(repo) as running:
        results = asyncio.run(scenario(running))
        stats = httpx.get(f"{running.url}/v2/models/batchable/stats").json()["model_stats"][0]
    for x, out in zip(inputs, results, strict=True):
        y, s = reference.run(["y", "s"], {"x": x})
        np.testing.assert_array_equal(out["y"], y)
        np.testing.assert_allclose(out["s"], s, rtol=1e-6)  # reduction order differs by batch size
    seen = batches.of("batchable")[1:]  # after the opener
    # N requests in, N outcomes out: each request ran exactly once, in a batch within the row limit.
    assert Counter(mark for batch in seen for mark in batch.marks) == Counter(float(x[0, 0]) for x in inputs)
    assert all(batch.rows <= 16 for batch in seen)
    assert max(batch.requests for batch in seen) >= 4, f"queued requests did not share batches: {seen}"
    assert stats["execution_count"] == 1 + len(seen)
    assert stats["inference_count"] == 1 + sum(len(x) for x in inputs)
    assert stats["inference_stats"]["success"]["count"] == 1 + len(inputs)
    assert {b["batch_size"] for b in stats["batch_stats"]} == {1} | {batch.rows for batch in seen}


def test_a_failing_request_does_not_fail_its_batch_mates(serve, tmp_path, batches) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(
        repo,
        "gather",
        modelzoo.gather(),
        manifest="slo_p99_ms = 600000.0\ninstances = 1\n[batching]\npreferred_batch_sizes = [8]\n"
        "max_queue_delay_ms = 0.0\n",
    )

    async def scenario(running) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60.0) as client:

            async def post(index: int) -> httpx.Response:
                body = codec.encode_request(
                    {"idx": np.array([[index]], np.int64)}, binary=False, binary_output=False
                ).body()
                return await client.post("/v2/models/gather/infer", content=body)

            with batches.holding(lambda batch: batch.marks == (2.0,)):
                opener = asyncio.create_task(post(2))
                await asyncio.to_thread(batches.wait_held)
                # The first to come is queued ahead on the busy worker, alone (runner.py); the rest
                # wait in the line queue and leave it as one batch once the worker is free.
                posts = [asyncio.create_task(post(0))]
                await running.inflight_reaches("gather", 2)
                posts += [asyncio.create_task(post(i)) for i in [1, 0, 9, 2, 1]]
                await running.inflight_reaches("gather", 7)
            await opener
            return await asyncio.gather(*posts)

    with serve(repo) as running:
        responses = asyncio.run(scenario(running))
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200]
    assert "out of data bounds" in responses[3].json()["error"]
    assert responses[4].json()["outputs"][0]["data"] == [4.0, 5.0]
    # The bad index shared its batch with good ones, and only its own request failed.
    [shared] = [batch for batch in batches.of("gather") if 9.0 in batch.marks]
    assert shared.requests >= 2


@pytest.mark.parametrize("model", ["fixed", "scalar"])
def test_unbatched_models_run_one_request_at_a_time(serve, repository, batches, model: str) -> None:
    shape = [1, 3] if model == "fixed" else []

    async def scenario(running) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60.0) as client:

            def post(value: float) -> asyncio.Task[httpx.Response]:
                data = [value, 2.0, 3.0] if model == "fixed" else value
                body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]}
                return asyncio.create_task(client.post(f"/v2/models/{model}/infer", json=body))

            with batches.holding(lambda batch: batch.marks == (-1.0,)):
                opener = post(-1.0)
                await asyncio.to_thread(batches.wait_held)
                posts = [post(float(i)) for i in range(20)]
                await running.inflight_reaches(model, 21)
            return [await opener, *await asyncio.gather(*posts)]

    # One worker, and deadlines far off: the queued requests wait for the held one, however long.
    far = {"default_slo_p99_ms": 600000.0}
    with serve(repository, scheduler={"instances": 1}, models=far) as running:
        responses = asyncio.run(scenario(running))
        stats = httpx.get(f"{running.url}/v2/models/{model}/stats").json()["model_stats"][0]
    assert all(r.status_code == 200 for r in responses)
    seen = batches.of(model)
    assert sorted(batch.marks for batch in seen) == sorted((float(i),) for i in range(-1, 20))
    assert stats["execution_count"] == 21
    assert {b["batch_size"] for b in stats["batch_stats"]} == {1}


def test_a_batch_queued_ahead_starts_when_the_worker_takes_it(serve, tmp_path, batches) -> None:
    """Admission predicts a new request's wait from each worker's batches and when they started. A
    batch queued ahead behind a running one is given the start its predecessor's prediction implies;
    once the worker takes it, its start is when it really started. (Left at the prediction, a
    predecessor that ended early made admission count work already running as starting later: at 16
    clients on the 224 model, a third of requests were refused with a p99 far inside the SLO.)"""
    repo = tmp_path / "repo"
    modelzoo.write(
        repo,
        "batchable",
        modelzoo.batchable(),
        manifest="slo_p99_ms = 600000.0\ninstances = 1\n[batching]\nmax_queue_delay_ms = 0.0\n",
    )

    async def scenario(running) -> float:
        async with httpx.AsyncClient(base_url=running.url, timeout=60.0) as client:
            with batches.holding(lambda batch: batch.marks == (OPENER,)):
                opener = asyncio.create_task(
                    _post(client, "batchable", np.full((1, 4), OPENER, np.float32), True)
                )
                await asyncio.to_thread(batches.wait_held)
                second = asyncio.create_task(_post(client, "batchable", np.ones((1, 4), np.float32), True))
                await running.inflight_reaches("batchable", 2)  # queued ahead on the held worker
                released_s = time.monotonic()  # the opener runs far past its predicted end
            await opener
            await second
            return released_s

    with serve(repo) as running:
        released_s = asyncio.run(scenario(running))
    opener, second = batches.of("batchable")[-2:]
    assert opener.marks == (OPENER,) and second.marks == (1.0,)
    assert second.started_s >= released_s, "the batch queued ahead kept its predicted start"
