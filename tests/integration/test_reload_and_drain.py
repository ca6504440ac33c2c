"""Hot reload swaps a model atomically under load with no failed request; drain and resume."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import httpx
import modelzoo
import numpy as np

from appliance.protocol import codec


def _body(x: np.ndarray) -> bytes:
    return codec.encode_request({"x": x}, binary=False, binary_output=False).body()


def test_reload_under_load_fails_nothing(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    # A deadline no busy box reaches: what fails here must be the reload's doing, not a 200 ms default SLO
    # that another process on the box can make a request wait past (seen once in a full suite run).
    manifest = "slo_p99_ms = 600000.0\n[batching]\nmax_batch_size = 8\n"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=manifest)
    x = np.ones((2, 4), np.float32)

    async def scenario(url: str) -> tuple[list[int], list[str], list[str]]:
        statuses: list[int] = []
        versions: list[str] = []
        errors: list[str] = []
        stop = asyncio.Event()
        answered = asyncio.Condition()
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:

            async def hammer() -> None:
                while not stop.is_set():
                    response = await client.post("/v2/models/batchable/infer", content=_body(x))
                    statuses.append(response.status_code)
                    if response.status_code != 200:
                        errors.append(response.text)
                    else:
                        versions.append(response.json()["model_version"])
                    async with answered:
                        answered.notify_all()

            workers = [asyncio.create_task(hammer()) for _ in range(8)]
            reloads = []
            for version in (2, 3):
                modelzoo.write(repo, "batchable", modelzoo.batchable(), version=version)
                loaded = await client.post("/v2/repository/models/batchable/load")
                reloads.append(loaded.json()["version"])
                wanted = len(statuses) + 16
                async with answered:  # let traffic run on the new version
                    await answered.wait_for(lambda wanted=wanted: len(statuses) >= wanted)
            stop.set()
            await asyncio.gather(*workers)
            after = await client.post("/v2/models/batchable/infer", content=_body(x))
            versions.append(after.json()["model_version"])
        assert not errors, errors
        return statuses, versions, reloads

    with serve(repo) as running:
        statuses, versions, reloads = asyncio.run(scenario(running.url))
    assert reloads == ["2", "3"]
    assert set(statuses) == {200}, f"failed statuses: {[s for s in statuses if s != 200]}"
    assert versions[-1] == "3"
    assert set(versions) <= {"1", "2", "3"}


def test_a_retired_version_is_freed_without_the_cyclic_collector(serve, tmp_path) -> None:
    """Once retired, a version goes by reference counting alone, at once (its memory is then free for the
    trim after retirement), not whenever the cyclic collector next runs: a full collection holds the GIL
    for tens of milliseconds in a serving process. The collector is off here for the whole reload."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with serve(repo) as running:
        retired = weakref.ref(running.service.hub.entry("batchable").scheduler)
        gc.disable()
        try:
            modelzoo.write(repo, "batchable", modelzoo.batchable(), version=2)
            loaded = httpx.post(f"{running.url}/v2/repository/models/batchable/load", timeout=60)
            assert loaded.status_code == 200 and loaded.json()["version"] == "2"
            assert retired() is None, gc.get_referrers(retired())
        finally:
            gc.enable()


def test_a_request_in_flight_during_a_reload_finishes_on_the_old_version(serve, tmp_path, batches) -> None:
    repo = tmp_path / "repo"
    manifest = "slo_p99_ms = 600000.0\ninstances = 1\n"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=manifest)  # y = 2x + 1
    x = np.full((1, 4), 5.0, np.float32)
    answers: dict[str, httpx.Response] = {}

    def post(key: str, path: str, content: bytes = b"") -> threading.Thread:
        url = f"{running.url}{path}"
        thread = threading.Thread(
            target=lambda: answers.update({key: httpx.post(url, content=content, timeout=60)})
        )
        thread.start()
        return thread

    # The old version waits for its requests however long they take: only then is the swap's order
    # (new version serving while the old one computes) the one thing that lets the test through.
    never = {"drain_timeout_s": 3600.0}
    with serve(repo, server=never) as running, httpx.Client(base_url=running.url, timeout=60.0) as client:
        hub = running.service.hub
        with batches.holding(lambda batch: batch.version == "1"):
            old = post("old", "/v2/models/batchable/infer", _body(x))
            batches.wait_held()  # running on version 1's session
            modelzoo.write(repo, "batchable", modelzoo.batchable(scale=10.0, offset=0.0), version=2)
            reload = post("reload", "/v2/repository/models/batchable/load")
            wait_until(lambda: hub.entry("batchable").version == "2", "version 2 swapped in")
            new = client.post("/v2/models/batchable/infer", content=_body(x))
            assert reload.is_alive()  # the load answers once version 1's requests have finished
        old.join(60)
        reload.join(60)
    assert (new.status_code, new.json()["model_version"]) == (200, "2")
    assert new.json()["outputs"][0]["data"] == [50.0] * 4  # version 2: y = 10x
    assert (answers["old"].status_code, answers["old"].json()["model_version"]) == (200, "1")
    assert answers["old"].json()["outputs"][0]["data"] == [11.0] * 4  # version 1's session computed it
    assert (answers["reload"].status_code, answers["reload"].json()["version"]) == (200, "2")
    assert [batch.version for batch in batches.of("batchable")] == ["1", "2"]


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, f"never {what}"
        time.sleep(0.005)


def test_failed_reload_keeps_the_serving_version(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with serve(repo) as running, httpx.Client(base_url=running.url) as client:
        modelzoo.write(repo, "batchable", b"broken", version=2)
        response = client.post("/v2/repository/models/batchable/load")
        assert response.status_code == 400 and "INVALID_PROTOBUF" in response.json()["error"]
        ok = client.post("/v2/models/batchable/infer", content=_body(np.ones((1, 4), np.float32)))
        assert ok.status_code == 200 and ok.json()["model_version"] == "1"


def test_unload_then_load_and_unknown(serve, repository) -> None:
    with serve(repository) as running, httpx.Client(base_url=running.url) as client:
        assert client.post("/v2/repository/models/batchable/unload").status_code == 200
        gone = client.post("/v2/models/batchable/infer", content=_body(np.ones((1, 4), np.float32)))
        assert gone.status_code == 503 and "unloaded" in gone.json()["error"]
        index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
        assert index["batchable"]["state"] == "UNAVAILABLE" and index["batchable"]["reason"] == "unloaded"
        assert client.post("/v2/repository/models/batchable/load").status_code == 200
        assert client.post("/v2/repository/models/nope/load").status_code == 404


def test_drain_refuses_new_work_and_resume_restores_it(serve, repository) -> None:
    with serve(repository) as running, httpx.Client(base_url=running.url) as client:
        hub = running.service.hub
        assert running.call(lambda: hub.drain(5.0)) is True
        refused = client.post("/v2/models/batchable/infer", content=_body(np.ones((1, 4), np.float32)))
        assert refused.status_code == 503 and "draining" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200
        running.call(_resume(hub))
        again = client.post("/v2/models/batchable/infer", content=_body(np.ones((1, 4), np.float32)))
        assert again.status_code == 200


def _resume(hub):
    async def resume() -> None:
        hub.resume()

    return resume


def test_a_retired_version_frees_its_sessions_and_buffers_at_once(tmp_path, settings_factory) -> None:
    """A reload must not leave the old version's memory to the cyclic garbage collector: the scheduler
    and its workers refer to each other, so without an explicit close each reload of the 128 px model
    kept 4-8 MB (sessions, their ORT threads, batch buffers) until a collection that may not come."""
    from appliance.engine.repository import Repository
    from appliance.providers.registry import Registry
    from appliance.scheduler.hub import ModelHub

    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="instances = 2\n")
    hub = ModelHub(settings_factory(repo), Registry.discover(), Repository(repo))

    async def scenario() -> None:
        await hub.load_all()
        old = hub.scheduler("batchable")
        await old.infer({"x": np.ones((3, 4), np.float32)})
        await hub.load("batchable")
        assert hub.scheduler("batchable") is not old
        assert old.model.solo is None and old.model.placement.session is None
        assert all(not worker._buffers for worker in old.workers)
        await hub.close()

    asyncio.run(scenario())


def test_a_drain_overlapping_a_reload_waits_for_the_retiring_version(serve, tmp_path, batches) -> None:
    """An OTA hook reboots on `drained: true`: a request still computing on the version a reload is
    retiring must keep the drain from reporting it, and count in `inflight`."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="slo_p99_ms = 600000.0\ninstances = 1\n")
    answers: list[httpx.Response] = []
    with serve(repo, server={"drain_timeout_s": 3600.0}) as running:
        hub, control = running.service.hub, running.service.control
        url = f"{running.url}/v2/models/batchable/infer"
        body = _body(np.full((1, 4), 5.0, np.float32))

        def post() -> httpx.Response:
            return httpx.post(url, content=body, timeout=60)

        with batches.holding(lambda batch: batch.version == "1"):
            request = threading.Thread(target=lambda: answers.append(post()))
            request.start()
            batches.wait_held()
            old = hub.entry("batchable").scheduler
            reload = threading.Thread(
                target=lambda: running.call(lambda: hub.load("batchable"), timeout_s=60)
            )
            reload.start()
            wait_until(lambda: hub.entry("batchable").scheduler is not old, "the new version swapped in")
            held = running.call(lambda: control.drain({"timeout_s": 0.2}))
            assert held == {"drained": False, "inflight": 1}
            assert answers == []
        request.join(60)
        reload.join(60)
        assert running.call(lambda: control.drain({"timeout_s": 60})) == {"drained": True, "inflight": 0}
        running.call(lambda: control.resume({}))
    assert answers[0].status_code == 200 and answers[0].json()["model_version"] == "1"
