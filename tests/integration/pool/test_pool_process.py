"""A node as a real process: Last Will on SIGKILL, session across restarts, expiry, credentials, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pool_brokers import Broker
from pool_process import READY, node_environment, node_process
from pool_recorder import Names, pool_section

from appliance.protocol import codec

X = np.ones((1, 4), dtype=np.float32)


async def until_the_broker_expires(
    broker: Broker, names: Names, recorder_factory: Any, expiry_s: int
) -> None:
    """Until the broker's own clock has run past `expiry_s` seconds of message expiry from now: a
    retained probe published now is no longer handed to a new subscriber. MQTT 5 expiry counts whole
    seconds on the broker's clock, and mosquitto drops an expired retained message one second sooner
    (`now >= expiry`) than an expired queued one (`now > expiry`), so the probe lives one second longer
    than the jobs published before it."""
    probe = f"{names.root}/_probe/{uuid.uuid4().hex[:8]}"
    publisher = await recorder_factory(broker, names, probe)
    publisher.publish(probe, b"probe", retain=True, expiry_s=expiry_s + 1)
    await publisher.expect(lambda m: m.topic == probe)  # stored
    async with asyncio.timeout(60):
        while True:
            checker = await recorder_factory(broker, names, probe)  # a retained probe comes first, if any
            checker.publish(probe, b"marker")
            first = await checker.expect(lambda m: m.topic == probe)
            checker.close()
            if first.payload == b"marker":
                return
            await asyncio.sleep(0.1)  # the broker's clock moves in whole seconds: ask again shortly


def job(request_id: str) -> bytes:
    return codec.encode_request({"x": X}, binary=False, binary_output=False, request_id=request_id).body()


@pytest.mark.asyncio
async def test_sigkill_sets_offline_by_will_and_a_restart_rises_the_session(
    tmp_path: Path, pool_repository: Path, broker_factory: Any, names: Names, recorder_factory: Any
) -> None:
    broker: Broker = broker_factory()
    pool = pool_section(broker, names)
    env = node_environment(tmp_path, pool)
    reply_topic = names.reply_topic()
    recorder = await recorder_factory(broker, names, f"{names.base}/#", reply_topic)
    with node_process(pool_repository, env) as first:
        first.wait_for(READY)
        birth = await recorder.node("birth")
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(30)
    offline = await recorder.node("state", lambda d: d["state"] == "offline")
    assert offline["by_will"] is True and offline["session"] == birth["session"] and "seq" not in offline

    if broker.is_v5:
        # Jobs sent while the node is away wait in its MQTT 5 session; the broker drops the expired one.
        for request_id, expiry_s in (("expired", 1), ("fresh", 60)):
            recorder.publish(
                f"{names.base}/cmd/infer/batchable",
                job(request_id),
                response_topic=reply_topic,
                correlation=request_id.encode(),
                expiry_s=expiry_s,
            )
        await until_the_broker_expires(broker, names, recorder_factory, expiry_s=1)
    mark = len(recorder.messages)
    with node_process(pool_repository, env) as second:
        second.wait_for(READY)
        again = await recorder.node("birth", since=mark)
        assert again["session"] > birth["session"]
        if broker.is_v5:
            answer = await recorder.expect(lambda m: m.topic == reply_topic, since=mark)
            assert answer.correlation == b"fresh" and answer.document["id"] == "fresh"
            recorder.publish(
                f"{names.base}/cmd/infer/batchable",
                job("last"),
                response_topic=reply_topic,
                correlation=b"last",
            )
            await recorder.expect(lambda m: m.topic == reply_topic and m.correlation == b"last", since=mark)
            job_ids = [m.document.get("job_id") for m in recorder.messages[mark:] if m.kind == "evt"]
            assert "expired" not in job_ids and job_ids.count("fresh") == 1


@pytest.mark.asyncio
async def test_password_from_credentials_directory_and_clean_exit_on_sigterm(
    tmp_path: Path, pool_repository: Path, broker_factory: Any, names: Names, recorder_factory: Any
) -> None:
    broker: Broker = broker_factory(tls=True, users={"node": "n0de-secret", "platform": "pl4tform"})
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pool.password").write_text("n0de-secret\n")
    env = node_environment(tmp_path, pool_section(broker, names, username="node"))
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    recorder = await recorder_factory(broker, names, username="platform", password="pl4tform")
    with node_process(pool_repository, env) as node:
        node.wait_for(READY)
        birth = await recorder.node("birth")
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(30) == 0
    await recorder.node("state", lambda d: d["state"] == "draining" and d["session"] == birth["session"])
    await recorder.node("state", lambda d: d["state"] == "offline" and "by_will" not in d)
    output = [*node.seen, *(line for line in node.lines.queue if line)]
    assert any("pool link up" in line for line in output)
    assert not any("n0de-secret" in line for line in output)


@pytest.mark.asyncio
async def test_a_will_delay_keeps_a_node_that_comes_back_in_time_from_being_called_offline(
    tmp_path: Path, pool_repository: Path, broker_factory: Any, names: Names, recorder_factory: Any
) -> None:
    """pool.will_delay_s: the broker holds the Last Will that long; a node killed and back within it
    resumes its session, and the will is never published (MQTT 5 section 3.1.3.2.2)."""
    broker: Broker = broker_factory()
    if not broker.is_v5:
        pytest.skip("the Will Delay Interval is MQTT 5")
    pool = pool_section(broker, names, will_delay_s=3600, session_expiry_s=3600)
    env = node_environment(tmp_path, pool)
    recorder = await recorder_factory(broker, names)
    with node_process(pool_repository, env) as first:
        first.wait_for(READY)
        birth = await recorder.node("birth")
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(30)
    mark = len(recorder.messages)
    with node_process(pool_repository, env) as second:
        second.wait_for(READY)
        # With no delay the broker would have published the will when the first connection dropped,
        # well before this node could start and connect: it would be among the messages by now.
        again = await recorder.node("birth", since=mark)
        assert again["session"] > birth["session"]
        second.popen.send_signal(signal.SIGTERM)
        assert second.popen.wait(30) == 0
    await recorder.node("state", lambda d: d["state"] == "offline" and d["session"] == again["session"])
    states = [m.document for m in recorder.messages if m.kind == "state" and m.payload]
    assert not [s for s in states if s.get("by_will")], states
