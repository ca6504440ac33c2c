"""Platform-side test helpers: unique topic names, node settings, a recorder that checks every schema."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pool_brokers import Broker

from appliance.pool import schemas
from appliance.pool.topics import NodeTopics, parse_node_topic
from appliance.protocol import codec

WAIT_S = 20.0


@dataclass(frozen=True)
class Names(NodeTopics):
    """The node's topics in one test, unique to it: nothing it sees can come from another test."""

    reply_prefix: str = ""  # where replies go; unset: <root>/<site>/

    def reply_topic(self, sender: str = "platform") -> str:
        """A fresh reply topic; the node takes `<prefix><sender>` for who asked."""
        prefix = self.reply_prefix or f"{self.root}/{self.site}/"
        return f"{prefix}{sender}/{uuid.uuid4().hex[:8]}"


def pool_section(broker: Broker, names: Names, **overrides: Any) -> dict[str, Any]:
    """Settings for a node that reports fast and reconnects fast."""
    section: dict[str, Any] = {
        "broker": broker.url,
        "site": names.site,
        "node_id": names.node,
        "topic_root": names.root,
        "report_interval_s": 0.5,
        "keepalive_s": 5,
        "will_delay_s": 0,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
    }
    if broker.tls is not None:
        section["ca_file"] = broker.tls.ca
    if not broker.is_v5:
        section["mqtt_version"] = (
            "3.1.1"  # amqtt hangs up on MQTT 5 only after 5 s; the fallback has its own test
        )
    section.update(overrides)
    return section


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: int | None = None
    user: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.topic.rsplit("/", 1)[1]

    @property
    def document(self) -> Any:
        length = self.user.get("inference-header-content-length")
        return orjson.loads(self.payload[: int(length)] if length else self.payload)


async def assert_line_serves(url: str, model: str = "batchable") -> None:
    """The factory line still gets answers: one HTTP inference, 200 with the right result."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}]}
    async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http:
        response = await http.post(f"/v2/models/{model}/infer", json=request)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["y"] == (x * 2 + 1).ravel().tolist()


def validate(schema: str, document: Any) -> None:
    jsonschema.validate(document, schemas.load(schema), cls=jsonschema.Draft202012Validator)


class Recorder:
    """A platform-side MQTT client on the test's loop: records every message and checks node payloads."""

    def __init__(
        self, broker: Broker, names: Names, *, is_v5: bool | None = None, client_id: str | None = None
    ) -> None:
        self.broker = broker
        self.names = names
        self.is_v5 = broker.is_v5 if is_v5 is None else is_v5
        self.messages: list[Received] = []
        self.invalid: list[str] = []
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._connected: asyncio.Future[str] = self._loop.create_future()
        self.connections = 0
        protocol = mqtt.MQTTv5 if self.is_v5 else mqtt.MQTTv311
        # A fixed client_id asks for a persistent session: what it subscribed to outlives a broker restart.
        self.is_persistent = client_id is not None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"rec-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        if broker.tls is not None:
            self.client.tls_set(ca_certs=str(broker.tls.ca))
        self.client.on_message = lambda _c, _u, message: self._loop.call_soon_threadsafe(self._add, message)
        self.client.on_subscribe = lambda _c, _u, mid, *_: self._loop.call_soon_threadsafe(self._ack, mid)
        self.client.on_connect = lambda _c, _u, _f, reason, *_: self._loop.call_soon_threadsafe(
            self._on_connect, str(reason)
        )

    async def connect(
        self, *topics: str, username: str | None = None, password: str | None = None
    ) -> Recorder:
        if username is not None:
            self.client.username_pw_set(username, password)
        kwargs: dict[str, Any] = {}
        if self.is_persistent and self.is_v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
            kwargs = {"clean_start": False, "properties": properties}
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.broker.port, 30, **kwargs)
        self.client.loop_start()
        async with asyncio.timeout(WAIT_S):
            assert await self._connected == "Success"
        for topic in topics or (f"{self.names.base}/#",):
            await self.subscribe(topic)
        return self

    async def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        future = self._acks.setdefault(mid, self._loop.create_future())
        async with asyncio.timeout(WAIT_S):
            await future

    def publish(
        self,
        topic: str,
        payload: bytes | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        user: dict[str, str] | None = None,
        retain: bool = False,
    ) -> None:
        body = orjson.dumps(payload) if isinstance(payload, dict) else payload
        properties = None
        if self.is_v5:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
            if expiry_s is not None:
                properties.MessageExpiryInterval = expiry_s
            if user:
                properties.UserProperty = list(user.items())
        info = self.client.publish(topic, body, qos=1, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc

    async def expect(
        self, predicate: Callable[[Received], bool], *, timeout_s: float = WAIT_S, since: int = 0
    ) -> Received:
        """The first message (from index `since`) that matches; waits for new ones until `timeout_s`."""
        seen = since
        async with asyncio.timeout(timeout_s):
            while True:
                for message in self.messages[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.messages)
                self._changed.clear()
                await self._changed.wait()

    async def node(self, kind: str, where: Callable[[Any], bool] = lambda _: True, since: int = 0) -> Any:
        """The next document the node publishes on `kind` (birth, state, capacity, evt) matching `where`."""
        topic = f"{self.names.base}/{kind}"
        found = await self.expect(
            lambda m: m.topic == topic and bool(m.payload) and where(m.document), since=since
        )
        return found.document

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, reason: str) -> None:
        if not self._connected.done():
            self._connected.set_result(reason)
        self.connections += 1
        self._changed.set()

    async def reconnected(self, connections: int) -> None:
        """Wait until this client has connected `connections` times (paho reconnects by itself)."""
        async with asyncio.timeout(WAIT_S):
            while self.connections < connections:
                self._changed.clear()
                await self._changed.wait()

    def _ack(self, mid: int) -> None:
        future = self._acks.get(mid)
        if future is None:
            self._acks[mid] = future = self._loop.create_future()
        if not future.done():
            future.set_result(None)

    def _add(self, message: mqtt.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        received = Received(message.topic, bytes(message.payload), bool(message.retain))
        if properties is not None:
            received.response_topic = getattr(properties, "ResponseTopic", None)
            received.correlation = getattr(properties, "CorrelationData", None)
            received.expiry_s = getattr(properties, "MessageExpiryInterval", None)
            received.user = dict(getattr(properties, "UserProperty", None) or [])
        origin = parse_node_topic(self.names.root, message.topic)
        if origin is not None and received.payload:
            try:
                validate(origin.kind, received.document)
            except (jsonschema.ValidationError, orjson.JSONDecodeError) as exc:
                self.invalid.append(f"{message.topic}: {exc}")
        self.messages.append(received)
        self._changed.set()


X = np.arange(8, dtype=np.float32).reshape(2, 4)


def job(binary: bool = True, **parameters: Any) -> tuple[bytes, dict[str, str]]:
    """A job for the `batchable` model: its body, and the user properties a binary body needs.

    Its deadline (parameters.timeout, µs) is 30 s unless given: pool work runs at idle priority, and
    a shared test machine may keep it waiting longer than the model's default.
    """
    parameters.setdefault("timeout", 30_000_000)
    encoded = codec.encode_request({"x": X}, binary=binary, binary_output=binary, parameters=parameters)
    user = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
    return encoded.body(), user


async def ask(
    recorder: Recorder,
    names: Names,
    verb: str,
    payload: bytes,
    *,
    sender: str = "platform",
    **properties: Any,
) -> Received:
    """Publish a command or job with a fresh response topic and correlation; return the answer.

    On MQTT 3.1.1 the response topic and correlation travel in the JSON body instead.
    """
    reply_topic = names.reply_topic(sender)
    await recorder.subscribe(reply_topic)
    topic = f"{names.base}/cmd/{verb}"
    if not recorder.is_v5:
        corr_id = uuid.uuid4().hex
        document = orjson.loads(payload) if payload else {}
        recorder.publish(topic, {**document, "reply_to": reply_topic, "corr_id": corr_id})
        return await recorder.expect(lambda m: m.topic == reply_topic and m.document["corr_id"] == corr_id)
    correlation = uuid.uuid4().bytes
    recorder.publish(topic, payload, response_topic=reply_topic, correlation=correlation, **properties)
    answer = await recorder.expect(lambda m: m.topic == reply_topic)
    assert answer.correlation == correlation
    assert answer.user["status"] == str(answer.document.get("status", 200))
    return answer
