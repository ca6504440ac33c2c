"""The broker connection: paho's thread hands every event to asyncio; jittered reconnects; MQTT 5 or 3.1.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.pool.wire import Broker, Inbound, Outbound, Security, inbound, paho_client, publish_properties
from appliance.settings import PoolSettings

log = logging.getLogger(__name__)

CONNACK_TIMEOUT_S = 10.0
_UNSUPPORTED_PROTOCOL = 132  # CONNACK "Unsupported Protocol Version" (v5); paho maps 3.1.1's code 1 to it


class Handler(Protocol):
    """What the link does with connection events; every method runs on the event loop."""

    def connected(self, is_v5: bool) -> None: ...
    def disconnected(self, reason: str) -> None: ...
    def received(self, message: Inbound) -> None: ...
    def acknowledged(self, mid: int, refusal: str | None) -> None:
        """The broker took message `mid`, or refused it (`refusal`: its MQTT 5 reason)."""


class Unpublishable(ValueError):
    """A message the broker can never take (malformed for paho, larger than the broker allows)."""


class Backoff:
    """Exponential delays from `min_s` to `max_s`, each scaled by a random factor in [0.5, 1).

    Only a connection that stayed up for `stable_s` starts the delays again from `min_s`: one that
    the broker drops at once (a message it refuses, a broker in a crash loop) keeps them growing.
    """

    def __init__(
        self,
        min_s: float,
        max_s: float,
        rng: Callable[[], float] = random.random,
        *,
        stable_s: float = 0.0,
    ) -> None:
        self.min_s, self.max_s, self._rng = min_s, max(min_s, max_s), rng
        self.stable_s = stable_s
        self._attempts = 0

    def next_s(self) -> float:
        base = min(self.max_s, self.min_s * 2 ** min(self._attempts, 32))
        self._attempts += 1
        return base * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self._attempts = 0

    def connection_ended(self, up_s: float) -> None:
        """A connection that was up for `up_s` ended: reset if it held long enough."""
        if up_s >= self.stable_s:
            self.reset()


@dataclass(slots=True)
class _Attempt:
    """One paho client and what its thread has told the loop so far."""

    client: mqtt.Client
    is_v5: bool
    connack: asyncio.Future[tuple[int, str]]
    closed: asyncio.Future[str]
    is_up: bool = field(default=False)


class Connection:
    """Keeps one MQTT connection up from `start()` until `close()`; never blocks the event loop."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        client_id: str,
        will: Callable[[bool], Outbound],
        handler: Handler,
    ) -> None:
        assert settings.broker is not None
        self.broker = Broker.parse(settings.broker)
        self.security = Security.from_settings(settings, self.broker)  # ConfigError now, not at connect
        self.settings = settings
        self.client_id = client_id
        self._will = will
        self._handler = handler
        # A connection that lives through one keep-alive interval has shown the broker takes us.
        self._backoff = Backoff(
            settings.reconnect_min_s, settings.reconnect_max_s, stable_s=float(settings.keepalive_s)
        )
        self.broker_max_packet_bytes: int | None = None  # MQTT 5 CONNACK Maximum Packet Size
        self._attempt: _Attempt | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._is_degraded = settings.mqtt_version == "3.1.1"  # or the broker refused MQTT 5 and took 3.1.1

    @property
    def is_connected(self) -> bool:
        return self._attempt is not None and self._attempt.is_up

    @property
    def is_v5(self) -> bool:
        return self._attempt is not None and self._attempt.is_v5

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._supervise(), name="pool-connection")

    def oversize(self, message: Outbound) -> str | None:
        """Why the broker would not take `message` for its size (MQTT 5 Maximum Packet Size), or None."""
        attempt = self._attempt
        if attempt is None or not attempt.is_v5:
            return None
        return self._oversize(message, publish_properties(message))

    def _oversize(self, message: Outbound, properties: Properties | None) -> str | None:
        limit = self.broker_max_packet_bytes
        if limit is None:
            return None
        size = packet_bytes(message, properties)
        return f"a packet of {size} bytes is larger than the broker takes ({limit})" if size > limit else None

    def publish(self, message: Outbound) -> int | None:
        """Hand a message to paho (never blocks); its mid, or None while not connected.

        Raises Unpublishable for a message no broker connection could carry: a topic paho refuses,
        or a packet larger than the broker's MQTT 5 Maximum Packet Size.
        """
        if not self.is_connected:
            return None
        assert self._attempt is not None
        properties = publish_properties(message) if self._attempt.is_v5 else None
        too_large = self._oversize(message, properties)
        if too_large is not None:
            raise Unpublishable(too_large)
        try:
            info = self._attempt.client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain, properties=properties
            )
        except ValueError as exc:  # a topic with a wildcard or not UTF-8, a payload over 256 MB
            raise Unpublishable(str(exc)) from exc
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            # paho's thread may have written the packet, then read the broker hanging up on it, before
            # publish() returned: such a message is in flight, so that one the broker hangs up on is
            # struck at every loss (Outbox.connection_lost), not only from the second on.
            return info.mid
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        if self.is_connected:
            assert self._attempt is not None
            self._attempt.client.subscribe(topic_filter, qos=qos)

    async def close(self, *, end_session: bool) -> None:
        """Disconnect cleanly (the broker drops the Last Will) and stop reconnecting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        properties = None
        if attempt.is_v5 and end_session and self.settings.session_expiry_s:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0  # a node that stops on purpose takes no more queued jobs
        attempt.client.disconnect(properties=properties)
        await _join(attempt.client)

    async def _supervise(self) -> None:
        while True:
            problem = await self._connect(is_v5=not self._is_degraded)
            if problem == "protocol" and self.settings.mqtt_version == "auto":
                log.warning("broker %s refuses MQTT 5; retrying with MQTT 3.1.1 (degraded)", self.broker)
                problem = await self._connect(is_v5=False)
                # Some 3.1.1 brokers only hang up after a timeout on an MQTT 5 CONNECT: ask once per process.
                self._is_degraded = problem is None
            elif problem == "protocol":
                problem = "it refuses MQTT 5 (pool.mqtt_version is 5)"
            if problem is None:
                assert self._attempt is not None
                up_since_s = time.monotonic()
                reason = await self._attempt.closed
                log.warning("pool link to %s lost: %s", self.broker, reason)
                await _join(self._attempt.client)
                self._backoff.connection_ended(time.monotonic() - up_since_s)
            delay_s = self._backoff.next_s()
            if problem is not None:
                log.warning("pool broker %s: %s; retrying in %.1f s", self.broker, problem, delay_s)
            await asyncio.sleep(delay_s)

    async def _connect(self, *, is_v5: bool) -> str | None:
        """One attempt: None once the broker accepted us, else why not ("protocol" for a 3.1.1 broker)."""
        assert self._loop is not None
        client = self._client(is_v5)
        attempt = _Attempt(client, is_v5, self._loop.create_future(), self._loop.create_future())
        self._attempt = attempt
        kwargs: dict[str, Any] = {}
        if is_v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.settings.session_expiry_s
            # The broker never sends this node a packet larger than this (MQTT 5 section 3.1.2.11.4).
            properties.MaximumPacketSize = self.settings.max_packet_bytes
            kwargs = {"clean_start": self.settings.session_expiry_s == 0, "properties": properties}
        try:
            await asyncio.to_thread(
                client.connect, self.broker.host, self.broker.port, self.settings.keepalive_s, **kwargs
            )
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake (ssl.SSLError is OSError)
            self._attempt = None
            return f"cannot connect ({exc})"
        client.loop_start()
        done, _ = await asyncio.wait(
            {attempt.connack, attempt.closed}, timeout=CONNACK_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        code, reason = attempt.connack.result() if attempt.connack in done else (None, "")
        if code == 0:
            return None
        self._attempt = None
        client.disconnect()
        await _join(client)
        if code is None and attempt.closed.done() and is_v5:
            return "protocol"  # some 3.1.1 brokers hang up on a CONNECT they cannot read
        if code == _UNSUPPORTED_PROTOCOL and is_v5:
            return "protocol"
        if code is None:
            return f"no CONNACK within {CONNACK_TIMEOUT_S:g} s"
        return f"connection refused: {reason} (CONNACK code {code})"

    def _client(self, is_v5: bool) -> mqtt.Client:
        client = paho_client(
            self.client_id,
            mqtt.MQTTv5 if is_v5 else mqtt.MQTTv311,
            clean_session=None if is_v5 else True,
            reconnect_on_failure=False,  # the supervisor reconnects, with jitter and protocol fallback
        )
        self.security.apply(client)
        will = self._will(is_v5)
        will_properties = None
        if is_v5:
            will_properties = Properties(PacketTypes.WILLMESSAGE)
            will_properties.WillDelayInterval = self.settings.will_delay_s
        client.will_set(
            will.topic, will.payload, qos=will.qos, retain=will.retain, properties=will_properties
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # paho callbacks: they run on the network thread and only hand over to the loop.

    def _on_connect(self, client: mqtt.Client, _: Any, __: Any, reason: Any, properties: Any) -> None:
        limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._hand_over(self._connack, client, int(reason.value), str(reason), limit)

    def _on_disconnect(self, client: mqtt.Client, _: Any, __: Any, reason: Any, ___: Any) -> None:
        self._hand_over(self._closed, client, str(reason))

    def _on_message(self, client: mqtt.Client, _: Any, message: mqtt.MQTTMessage) -> None:
        self._hand_over(self._message, client, message)

    def _on_publish(self, client: mqtt.Client, _: Any, mid: int, reason: Any, ___: Any) -> None:
        refusal = str(reason) if getattr(reason, "is_failure", False) else None  # MQTT 5 PUBACK >= 0x80
        self._hand_over(self._acknowledged, client, mid, refusal)

    def _hand_over(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service has gone
            self._loop.call_soon_threadsafe(callback, *args)

    # ...and their counterparts on the loop.

    def _current(self, client: mqtt.Client) -> _Attempt | None:
        attempt = self._attempt
        return attempt if attempt is not None and attempt.client is client else None

    def _connack(self, client: mqtt.Client, code: int, reason: str, limit: int | None) -> None:
        attempt = self._current(client)
        if attempt is None or attempt.connack.done():
            return
        attempt.connack.set_result((code, reason))
        if code == 0:
            attempt.is_up = True
            self.broker_max_packet_bytes = limit if attempt.is_v5 else None
            self._handler.connected(attempt.is_v5)

    def _closed(self, client: mqtt.Client, reason: str) -> None:
        attempt = self._current(client)
        if attempt is None or attempt.closed.done():
            return
        attempt.closed.set_result(reason)
        if attempt.is_up:
            attempt.is_up = False
            self._handler.disconnected(reason)

    def _message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        if self._current(client) is None:
            return
        try:
            received = inbound(message)
        except UnicodeDecodeError:  # a broker that forwards a topic which is not UTF-8
            log.warning("pool message ignored: its topic is not UTF-8")
            return
        self._handler.received(received)

    def _acknowledged(self, client: mqtt.Client, mid: int, refusal: str | None) -> None:
        if self._current(client) is not None:
            self._handler.acknowledged(mid, refusal)


def packet_bytes(message: Outbound, properties: Properties | None) -> int:
    """The size of the PUBLISH packet that carries `message` (MQTT 5 section 3.3)."""
    remaining = 2 + len(message.topic.encode("utf-8", "surrogatepass")) + len(message.payload)
    remaining += 2 if message.qos else 0  # packet identifier
    if properties is not None:
        remaining += len(properties.pack())  # its own length prefix included
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining


async def _join(client: mqtt.Client, timeout_s: float = 5.0) -> None:
    """Stop paho's thread without blocking the loop (it ends by itself once the socket is gone)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.to_thread(client.loop_stop)
