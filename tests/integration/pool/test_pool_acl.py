"""The README's mosquitto ACL recipe, on a real mosquitto: only the platform's identity reaches cmd/."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pool_brokers import Broker, default_kind
from pool_recorder import WAIT_S, Names, ask, assert_line_serves, job, pool_section

README = Path(__file__).resolve().parents[3] / "README.md"
PASSWORDS = {"platform": "pl4tform-pw", "node": "n0de-pw", "intruder": "1ntruder-pw"}


def acl_recipe(names: Names, intruder: str) -> str:
    """The README's ACL file for this test's site and node, plus a second node, the intruder."""
    readme = README.read_text()
    found = re.search(r"```text\n(# /etc/mosquitto/acl\n.*?)```", readme, re.DOTALL)
    assert found is not None, "README.md lost its mosquitto ACL recipe"
    recipe = found.group(1).replace("ecp/v1/", f"{names.root}/").replace("plant-7", names.site)
    node_block = recipe[recipe.index("user box-12") :]
    return recipe.replace("box-12", names.node) + "\n" + node_block.replace("box-12", intruder)


async def publish_as(broker: Broker, user: str, topic: str, payload: bytes, response_topic: str) -> str:
    """Publish once with MQTT 5 as `user`; the PUBACK's reason (the broker's verdict)."""
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[str] = loop.create_future()
    acked: asyncio.Future[str] = loop.create_future()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, PASSWORDS[user])
    client.on_connect = lambda _c, _u, _f, reason, _p: loop.call_soon_threadsafe(
        lambda: connected.done() or connected.set_result(str(reason))
    )
    client.on_publish = lambda _c, _u, _m, reason, _p: loop.call_soon_threadsafe(
        lambda: acked.done() or acked.set_result(str(reason))
    )
    await asyncio.to_thread(client.connect, "127.0.0.1", broker.port, 30)
    client.loop_start()
    try:
        async with asyncio.timeout(WAIT_S):
            assert await connected == "Success"
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
            client.publish(topic, payload, qos=1, properties=properties)
            return await acked
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.asyncio
async def test_only_the_platform_reaches_a_nodes_commands(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker_factory: Callable[..., Broker],
    names: Names,
    recorder_factory: Any,
) -> None:
    if default_kind() != "mosquitto":
        pytest.skip("the ACL recipe is for mosquitto, which is not installed (or POOL_TEST_BROKER is set)")
    names = dataclasses.replace(names, reply_prefix=f"{names.root}/_reply/")
    intruder = "intruder"
    users = {"platform": PASSWORDS["platform"], names.node: PASSWORDS["node"], intruder: PASSWORDS[intruder]}
    broker = broker_factory(users=users, acl=acl_recipe(names, intruder))
    topics = [f"{names.base}/{kind}" for kind in ("birth", "state", "evt")]
    platform = await recorder_factory(
        broker, names, *topics, username="platform", password=PASSWORDS["platform"]
    )
    pool = pool_section(broker, names, username=names.node, password=PASSWORDS["node"], remote_control=True)
    with serve(pool_repository, pool=pool) as running:
        birth = await platform.node("birth")
        reply_topic = names.reply_topic(intruder)
        # Another node's identity may not publish this node's verbs, nor jobs: the broker refuses both.
        for verb, payload in (("drain", b'{"timeout_s": 5}'), ("infer/batchable", job(binary=False)[0])):
            verdict = await publish_as(broker, intruder, f"{names.base}/cmd/{verb}", payload, reply_topic)
            assert verdict == "Not authorized"
        body, user = job()
        answer = await ask(platform, names, "infer/batchable", body, user=user)  # after the intruder's
        assert "outputs" in answer.document
        assert not [m for m in platform.messages if m.kind == "evt" and m.document["event"] == "command"]
        assert running.service.pool.state == "online" and not running.service.hub.is_draining
        await assert_line_serves(running.url)

        # The platform's cmd/drain does reach the node (remote control is on here), and resume undoes it.
        answer = await ask(platform, names, "drain", b'{"timeout_s": 5}')
        assert answer.document["status"] == 200 and running.service.hub.is_draining
        answer = await ask(platform, names, "resume", b"")
        assert answer.document["status"] == 200 and not running.service.hub.is_draining

        # A reply topic the ACL does not give the node: the broker refuses it, the node drops it and says so.
        mark = len(platform.messages)
        platform.publish(
            f"{names.base}/cmd/infer/batchable", body, response_topic=f"{names.root}/elsewhere/x", user=user
        )
        event = await platform.node("evt", lambda d: d["event"] == "message_dropped", since=mark)
        assert event["topic"] == f"{names.root}/elsewhere/x" and "Not authorized" in event["error"]
        await assert_line_serves(running.url)
        assert running.service.pool.session == birth["session"]
