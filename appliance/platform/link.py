"""The gateway's MQTT 5 link: ingest, presence, jobs out and answers in; reconnects on its own.

paho runs its network loop in its own thread. Reports are ingested there, straight into the view (it
takes a lock), so that hundreds of reports per second never queue behind buyer requests on the event
loop; job answers and changes that may need failover are handed to the loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.errors import ModelNotReady
from appliance.platform import presence
from appliance.platform.presence import Presence
from appliance.platform.settings import GatewaySettings
from appliance.platform.view import NodeView, PoolView
from appliance.pool.topics import node_filter
from appliance.pool.wire import Broker, Inbound, Outbound, Security, inbound, publish_properties

log = logging.getLogger(__name__)

KINDS = ("birth", "state", "capacity")


class BrokerAway(ModelNotReady):
    """The gateway has no broker connection now: buyers get 503 + Retry-After."""


class GatewayLink:
    """Subscribes to every node's birth/state/capacity, the gateways' presence and this gateway's answers."""

    def __init__(
        self,
        settings: GatewaySettings,
        view: PoolView,
        gateways: Presence,
        *,
        on_answer: Callable[[Inbound, float], None],
        on_state: Callable[[], None],
        on_birth: Callable[[NodeView], None] = lambda node: None,
    ) -> None:
        self.settings = settings
        self.view = view
        self.gateways = gateways
        self.broker = Broker.parse(settings.broker or "")
        password = settings.password.get_secret_value() if settings.password else None
        self.security = Security.build(
            self.broker, settings.username, password, settings.ca_file, settings.cert_file, settings.key_file
        )
        self.root = settings.topic_root
        self.reply_base = f"{self.root}/_reply/{settings.gateway_id}"
        self.presence_topic = presence.topic(self.root, settings.gateway_id)
        self._on_answer = on_answer
        self._on_state = on_state
        self._on_birth = on_birth
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = threading.Event()
        self.connected_s: float | None = None  # monotonic, of the last connection
        self.connections = 0
        self._is_closing = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"gateway-{settings.gateway_id}", protocol=mqtt.MQTTv5
        )
        self.security.apply(self._client)
        self._client.will_set(
            self.presence_topic, presence.document(settings.gateway_id, presence.OFFLINE), qos=1, retain=True
        )
        self._client.reconnect_delay_set(0.1, 2.0)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(10000)
        self._client.on_socket_open = _no_delay
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._received

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect in the background; paho keeps reconnecting after any loss."""
        self._loop = loop
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=15)
        self._client.loop_start()

    def is_learning(self) -> bool:
        """Not connected, or connected so recently (gateway.learning_s) that the pool's retained births,
        states and reports, which the broker sends right after the subscription, may still be arriving."""
        since_s = self.connected_s
        if not self.connected.is_set() or since_s is None:
            return True
        return time.monotonic() - since_s < self.settings.learning_s

    async def wait_connected(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self.connected.wait, timeout_s)

    def publish(self, message: Outbound) -> None:
        """Hand a job to paho (QoS 1; paho resends it if the connection drops before PUBACK)."""
        if not self.connected.is_set():
            raise BrokerAway(f"the gateway is not connected to broker {self.broker}", retry_after_s=1.0)
        info = self._client.publish(
            message.topic, message.payload, qos=message.qos, properties=publish_properties(message)
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerAway(f"broker {self.broker} did not take a job: {mqtt.error_string(info.rc)}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Say `offline` (so the others take our share back at once), then disconnect."""
        self._is_closing = True
        if self.connected.is_set():
            info = self._client.publish(
                self.presence_topic,
                presence.document(self.settings.gateway_id, presence.OFFLINE),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    # paho's thread.

    def _connected(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("gateway: broker %s refused the connection: %s", self.broker, reason)
            return
        self.connections += 1
        self.connected_s = time.monotonic()
        site = self.settings.site
        filters = [(node_filter(self.root, kind, site=site), 1) for kind in KINDS]
        filters += [(f"{self.reply_base}/#", 1), (presence.topic(self.root), 1)]
        client.subscribe(filters)
        client.publish(
            self.presence_topic,
            presence.document(self.settings.gateway_id, presence.ONLINE),
            qos=1,
            retain=True,
        )
        self.connected.set()
        log.info("gateway: connected to %s as %s", self.broker, self.settings.gateway_id)

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._is_closing:
            log.warning("gateway: lost broker %s (%s); reconnecting", self.broker, reason)
        self._call(self._on_state)

    def _received(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        received_s = time.monotonic()
        topic = message.topic
        if topic.startswith(self.reply_base):
            self._call(self._on_answer, inbound(message), received_s)
        elif self.gateways.ingest(topic, bytes(message.payload)):
            return
        else:
            changed = self.view.ingest(topic, bytes(message.payload), received_s)
            if changed is None:
                return
            if topic.endswith("/state") and changed.state != "online":
                self._call(self._on_state)
            elif topic.endswith("/birth"):
                self._call(self._on_birth, changed)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                self._loop.call_soon_threadsafe(callback, *args)


def _no_delay(_c: mqtt.Client, _u: Any, sock: Any) -> None:
    """Jobs are small and latency-bound: send each packet at once (paho leaves Nagle's algorithm on)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
