"""Pool jobs end to end through a real broker: MQTT 5 request/response, refusals, deadlines, commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from holds import Batches
from pool_brokers import Broker
from pool_recorder import Names, X, ask, job, pool_section, validate

from appliance.protocol import codec


@pytest.mark.asyncio
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_job_runs_and_answers_on_the_response_topic(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    binary: bool,
    batches: Batches,
) -> None:
    if binary and not broker.is_v5:
        pytest.skip("binary tensors need MQTT 5 user properties")
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)) as running:
        await recorder.node("birth")
        replica = running.service.hub.scheduler("batchable").replica
        assert replica is not None and replica.pid not in (None, os.getpid())
        assert replica.pid in running.service.hub.child_pids()  # its CPU counts in the capacity budget
        # The pool process, killed while idle, is started again by the next batch that goes to it:
        # so a restart below shows the job's batch went there.
        first_child = replica._child.process
        first_child.kill()
        first_child.wait()
        assert first_child.pid not in running.service.hub.child_pids()
        body, user = job(binary, timeout=5_000_000)
        validate("job_request", orjson.loads(body[: int(user.get(codec.HEADER_LENGTH, len(body)))]))
        answer = await ask(recorder, names, "infer/batchable", body, user=user, expiry_s=30)
        validate("job_response", answer.document)
        length = answer.user.get(codec.HEADER_LENGTH)
        assert (length is not None) is binary
        outputs = codec.decode_response(answer.payload, int(length) if length else None)
        np.testing.assert_array_equal(outputs["y"], X * 2 + 1)
        event = await recorder.node("evt", lambda d: d["event"] == "job_done")
        assert event["model"] == "batchable" and event["status"] == 200
        scheduler = running.service.hub.scheduler("batchable")
        assert scheduler.stats.requests[("pool", "success")] == 1
        [batch] = batches.of("batchable")
        assert (batch.priority, batch.is_background, batch.in_pool_process) == ("pool", True, True)
        assert replica.ran == {replica.pid: 1}, "the batch was not answered by the pool process"
        assert replica.restarts == 1 and replica.pid not in (None, first_child.pid, os.getpid())


@pytest.mark.asyncio
async def test_without_a_pool_process_jobs_run_on_the_services_own_threads(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    pool = pool_section(broker, names)
    with serve(pool_repository, pool=pool, scheduler={"pool_process": False}) as running:
        await recorder.node("birth")
        body, user = job(binary=broker.is_v5, timeout=30_000_000)
        answer = await ask(recorder, names, "infer/batchable", body, user=user, expiry_s=30)
        length = answer.user.get(codec.HEADER_LENGTH)
        outputs = codec.decode_response(answer.payload, int(length) if length else None)
        np.testing.assert_array_equal(outputs["y"], X * 2 + 1)
        scheduler = running.service.hub.scheduler("batchable")
        assert scheduler.replica is None
        assert all(w.replica is None for w in scheduler.workers)


@pytest.mark.asyncio
async def test_refusals_are_answered_with_a_status(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)) as running:
        await recorder.node("birth")
        body, user = job()
        body, user = job(binary=broker.is_v5)
        cases = [
            ("infer/nosuchmodel", body, user, 404, "unknown model 'nosuchmodel'"),
            ("infer/batchable", job(binary=False, timeout=1)[0], {}, 503, "deadline"),
            ("infer/batchable", orjson.dumps({"inputs": "x"}), {}, 400, "'inputs' must be a non-empty list"),
            ("frobnicate", b"", {}, 403, "pool.remote_control = false"),
            ("drain", b"", {}, 403, "pool.remote_control = false"),
        ]
        if broker.is_v5:  # only MQTT 5 can name a response topic outside a JSON body
            cases += [
                ("infer/batchable", b"{not json", {}, 400, "not valid JSON"),
                ("infer/batchable", body, {codec.HEADER_LENGTH: "x"}, 400, "not a non-negative integer"),
            ]
        for verb, payload, properties, status, text in cases:
            answer = await ask(recorder, names, verb, payload, user=properties)
            document = answer.document
            validate("job_response" if verb.startswith("infer/") else "command_reply", document)
            assert document["status"] == status, document
            assert text in document["error"]
        scheduler = running.service.hub.scheduler("batchable")
        assert scheduler.stats.requests[("pool", "success")] == 0  # the late job was never run
        # A job that names nowhere to answer is reported on evt, never dropped silently.
        recorder.publish(f"{names.base}/cmd/infer/batchable", job(binary=False)[0])
        event = await recorder.node("evt", lambda d: "cannot be answered" in d.get("error", ""))
        assert event["event"] == "job_refused" and event["status"] == 400


@pytest.mark.asyncio
async def test_drain_resume_and_rebirth_commands(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names, remote_control=True)):
        birth = await recorder.node("birth")
        answer = await ask(recorder, names, "drain", orjson.dumps({"timeout_s": 5, "reason": "maintenance"}))
        validate("command_reply", answer.document)
        reply = {k: v for k, v in answer.document.items() if k != "corr_id"}
        assert reply == {"status": 200, "state": "draining", "drained": True}
        state = await recorder.node("state", lambda d: d["state"] == "draining")
        assert state["reason"] == "maintenance" and state["session"] == birth["session"]
        await recorder.node("capacity", lambda d: d["draining"] is True)
        body, user = job(binary=broker.is_v5)
        refused = await ask(recorder, names, "infer/batchable", body, user=user)
        assert refused.document["status"] == 503 and "draining" in refused.document["error"]

        answer = await ask(recorder, names, "resume", b"")
        assert (answer.document["status"], answer.document["state"]) == (200, "online")
        await recorder.node("state", lambda d: d["state"] == "online" and d["seq"] > state["seq"])
        assert "outputs" in (await ask(recorder, names, "infer/batchable", body, user=user)).document

        answer = await ask(recorder, names, "rebirth", b"")
        assert answer.document["status"] == 200
        again = await recorder.node("birth", lambda d: d["seq"] > birth["seq"])
        assert again["session"] == birth["session"]

        answer = await ask(recorder, names, "frobnicate", b"")
        assert answer.document["status"] == 404 and "unknown command 'frobnicate'" in answer.document["error"]


@pytest.mark.asyncio
async def test_an_operator_drain_and_resume_take_the_pool_side_along(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """Regression: a drain by the admin socket or `appliance ota` marked the link as stopping, so after
    the resume it refused every job for good while its retained capacity still offered them."""
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)) as running:
        await recorder.node("birth")
        control = running.service.control
        running.call(lambda: control.drain({"timeout_s": 5, "reason": "firmware update"}))
        state = await recorder.node("state", lambda d: d["state"] == "draining")
        assert state["reason"] == "firmware update"
        body, user = job(binary=broker.is_v5)
        refused = await ask(recorder, names, "infer/batchable", body, user=user)
        assert refused.document["status"] == 503 and "draining" in refused.document["error"]

        running.call(lambda: control.resume({}))
        online = await recorder.node("state", lambda d: d["state"] == "online" and d["seq"] > state["seq"])
        await recorder.node("capacity", lambda d: d["draining"] is False and d["seq"] > online["seq"])
        assert "outputs" in (await ask(recorder, names, "infer/batchable", body, user=user)).document


@pytest.mark.asyncio
async def test_node_that_does_not_accept_jobs_refuses_them(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names, accept_jobs=False)):
        capacity = await recorder.node("capacity")
        assert capacity["models"]["batchable"]["accepts_pool_jobs"] is False
        body, user = job(binary=broker.is_v5)
        answer = await ask(recorder, names, "infer/batchable", body, user=user)
        assert answer.document["status"] == 403 and "accept_jobs" in answer.document["error"]
