"""The platform side's MQTT client (`platform watch`, `platform submit`): blocking calls, own thread."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from appliance.errors import ApplianceError
from appliance.pool.wire import Broker, Inbound, Outbound, Security, inbound, paho_client, publish_properties

_UNSUPPORTED_PROTOCOL = 132


class PoolUnreachable(ApplianceError):
    """The broker could not be reached, refused us, or did not answer in time."""


class PlatformClient:
    """Connects with MQTT 5 (3.1.1 if the broker refuses it); `on_message(message, received_s)` runs on
    paho's thread with the monotonic receive time."""

    def __init__(
        self,
        url: str,
        *,
        security: Security | None = None,
        on_message: Callable[[Inbound, float], None] | None = None,
        client_prefix: str = "platform",
    ) -> None:
        self.broker = Broker.parse(url)
        self.security = security or Security.build(self.broker, None, None)
        self.client_id = f"{client_prefix}-{uuid.uuid4().hex[:12]}"
        self.on_message = on_message
        self.is_v5 = True
        self._client: mqtt.Client | None = None
        self._acks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._sync_topic = f"_sync/{self.client_id}"
        self._synced = threading.Event()

    def connect(self, timeout_s: float = 10.0) -> PlatformClient:
        code, reason = self._connect(mqtt.MQTTv5, timeout_s)
        if code == _UNSUPPORTED_PROTOCOL:
            self.is_v5 = False
            code, reason = self._connect(mqtt.MQTTv311, timeout_s)
        if code != 0:
            raise PoolUnreachable(f"broker {self.broker} refused the connection: {reason}")
        return self

    def subscribe(self, *topic_filters: str, timeout_s: float = 10.0) -> None:
        """Subscribe (QoS 1) and wait for the broker to confirm each filter."""
        for topic_filter in topic_filters:
            if topic_filter.startswith("$share/") and not self.is_v5:
                raise PoolUnreachable(f"broker {self.broker} speaks MQTT 3.1.1: no shared subscriptions")
            self._wait(lambda f=topic_filter: self.client.subscribe(f, qos=1)[1], timeout_s, topic_filter)

    def sync(self, root: str, timeout_s: float = 10.0) -> None:
        """Return once every retained message of the subscriptions made so far has been received.

        The broker sends retained messages as it takes each subscription, so a marker published
        after the last SUBACK and echoed back comes after all of them.
        """
        topic = f"{root}/{self._sync_topic}"
        self._synced.clear()
        self.subscribe(topic, timeout_s=timeout_s)
        self.client.publish(topic, b"sync", qos=1)
        if not self._synced.wait(timeout_s):
            raise PoolUnreachable(f"broker {self.broker} did not echo a message within {timeout_s:g} s")

    def publish(self, message: Outbound, timeout_s: float = 10.0) -> None:
        properties = publish_properties(message) if self.is_v5 else None
        info = self.client.publish(
            message.topic, message.payload, qos=message.qos, retain=message.retain, properties=properties
        )
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise PoolUnreachable(f"broker {self.broker} did not take a message to {message.topic}")

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> PlatformClient:
        return self.connect()

    def __exit__(self, *_: Any) -> None:
        self.close()

    @property
    def client(self) -> mqtt.Client:
        if self._client is None:
            raise PoolUnreachable(f"not connected to {self.broker}")
        return self._client

    def _connect(self, protocol: int, timeout_s: float) -> tuple[int | None, str]:
        self.close()
        client = paho_client(self.client_id, protocol)
        self.security.apply(client)
        answered = threading.Event()
        outcome: list[tuple[int, str]] = []

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            outcome.append((int(reason.value), str(reason)))
            answered.set()

        client.on_connect = on_connect
        client.on_disconnect = lambda *_: answered.set()
        client.on_subscribe = lambda _c, _u, mid, *_: self._acked(mid)
        client.on_message = self._received
        try:
            client.connect(self.broker.host, self.broker.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise PoolUnreachable(f"cannot connect to {self.broker}: {exc}") from exc
        client.loop_start()
        self._client = client
        if not answered.wait(timeout_s):
            self.close()
            raise PoolUnreachable(f"broker {self.broker} did not answer CONNECT within {timeout_s:g} s")
        if not outcome:
            self.close()
            return _UNSUPPORTED_PROTOCOL if protocol == mqtt.MQTTv5 else None, "connection closed"
        if outcome[0][0] != 0:
            self.close()
        return outcome[0]

    def _wait(self, send: Callable[[], int], timeout_s: float, what: str) -> None:
        with self._lock:  # the SUBACK may arrive before `send` returns its mid
            mid = send()
            event = self._acks.setdefault(mid, threading.Event())
        if not event.wait(timeout_s):
            raise PoolUnreachable(f"broker {self.broker} did not confirm {what} within {timeout_s:g} s")
        self._acks.pop(mid, None)

    def _acked(self, mid: int) -> None:
        with self._lock:
            self._acks.setdefault(mid, threading.Event()).set()

    def _received(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        received_s = time.monotonic()
        if message.topic.endswith(self._sync_topic):
            self._synced.set()
        elif self.on_message is not None:
            self.on_message(inbound(message), received_s)
