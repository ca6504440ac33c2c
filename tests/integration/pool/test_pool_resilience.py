"""Outages: a node that starts before its broker, a broker restarted mid-run, a 3.1.1-only broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pool_brokers import Broker
from pool_recorder import Names, pool_section, validate

from appliance.pool.wire import Inbound
from appliance.protocol import codec

X = np.ones((1, 4), dtype=np.float32)


@pytest.mark.asyncio
async def test_node_serves_while_the_broker_is_down_and_joins_when_it_comes(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker_factory: Callable[..., Broker],
    names: Names,
    recorder_factory: Any,
) -> None:
    broker = broker_factory(start=False)
    with serve(pool_repository, pool=pool_section(broker, names)) as running:  # READY without a broker
        assert not running.service.pool.is_connected
        broker.start()
        recorder = await recorder_factory(broker, names)
        birth = await recorder.node("birth")
        assert birth["session"] == 1  # failed attempts spend no session


@pytest.mark.asyncio
async def test_broker_restart_mid_run(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker_factory: Callable[..., Broker],
    names: Names,
    recorder_factory: Any,
) -> None:
    broker = broker_factory(persistent=True)
    if not broker.is_v5:
        pytest.skip("needs a broker that keeps sessions across a restart (mosquitto)")
    reply_topic = names.reply_topic()
    recorder = await recorder_factory(
        broker, names, f"{names.base}/#", reply_topic, client_id=f"rec-{names.site}"
    )
    with serve(pool_repository, pool=pool_section(broker, names)) as running:
        link = running.service.pool
        first = await recorder.node("birth")
        await recorder.node("capacity")

        broker.stop()
        running.call(lambda: asyncio.wait_for(link.wait_connected(False), 20))
        # A job that was running when the broker went: its answer must wait for the broker, not vanish.
        body = codec.encode_request(
            {"x": X}, binary=False, binary_output=False, request_id="during-outage"
        ).body()
        job = Inbound(
            f"{names.base}/cmd/infer/batchable", body, response_topic=reply_topic, correlation=b"c1"
        )

        async def run_job_while_down() -> int:
            link.received(job)
            await link.jobs.wait(20)
            return len(link.outbox)

        assert running.call(run_job_while_down) >= 2  # the response and its evt wait in the outbox
        mark = len(recorder.messages)
        broker.start()
        await recorder.reconnected(2)

        second = await recorder.node("birth", lambda d: d["session"] > first["session"], since=mark)
        answer = await recorder.expect(lambda m: m.topic == reply_topic, since=mark)
        assert answer.correlation == b"c1" and answer.user["status"] == "200"
        validate("job_response", answer.document)
        np.testing.assert_array_equal(codec.decode_response(answer.payload)["y"], X * 2 + 1)
        event = await recorder.node("evt", lambda d: d.get("job_id") == "during-outage", since=mark)
        assert event["event"] == "job_done"
        # No backlog of reports from the outage: the new session opens with birth, state, one fresh report.
        fresh = await recorder.node("capacity", lambda d: d["session"] == second["session"], since=mark)
        assert fresh["seq"] == 2 and second["seq"] == 0
        running.call(lambda: asyncio.wait_for(link.wait_connected(True), 20))


@pytest.mark.asyncio
async def test_mqtt_311_broker_degrades_gracefully(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker_factory: Callable[..., Broker],
    names: Names,
    recorder_factory: Any,
) -> None:
    broker = broker_factory("amqtt")
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names, mqtt_version="auto")) as running:
        birth = await recorder.node("birth")
        assert not running.service.pool.connection.is_v5
        capacity = await recorder.expect(lambda m: m.kind == "capacity")
        assert capacity.expiry_s is None and capacity.document["valid_for_s"] == 2  # staleness from the body
        reply_topic = names.reply_topic()
        await recorder.subscribe(reply_topic)
        request = orjson.loads(codec.encode_request({"x": X}, binary=False, binary_output=True).body())
        request |= {"reply_to": reply_topic, "corr_id": "job-7"}
        validate("job_request", request)
        recorder.publish(f"{names.base}/cmd/infer/batchable", request)
        answer = await recorder.expect(lambda m: m.topic == reply_topic)
        document = answer.document
        validate("job_response", document)
        assert document["corr_id"] == "job-7"
        assert document["outputs"][0]["data"] == (X * 2 + 1).reshape(-1).tolist()  # JSON only on 3.1.1
        state = await recorder.node("state")
        assert state["session"] == birth["session"]
    offline = await recorder.node("state", lambda d: d["state"] == "offline")
    assert offline["session"] == birth["session"]
