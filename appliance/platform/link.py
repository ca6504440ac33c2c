"""The gateway's MQTT 5 link: ingest, presence, jobs out and answers in; reconnects on its own.

paho runs on the gateway's event loop, not in a thread of its own: the loop reads the socket when it
is readable and writes it when paho has packets queued (paho's external-loop callbacks), and a
supervisor task keeps the connection alive and reconnects. Every job is a publish, a PUBACK, an answer
and its PUBACK; with paho in its own thread each of them woke a second thread and passed the GIL back
and forth, which cost the gateway more CPU per job than paho's own work (bench/swarm.py). Reports are
ingested on the loop as they are read; a connection attempt, which can block for its timeout, runs
in a worker thread.

The broker keeps the gateway's MQTT session (its subscriptions and the QoS 1 answers sent to it) for
twice the job timeout after a connection drops: an answer sent while the gateway reconnects is
delivered when it is back, not lost (the job would wait out its timeout and its node be withheld). So
only what must not be lost comes at QoS 1: the answers. Births, states, reports and presences are
retained and come again at every subscription (the link subscribes at every connection), so they come
at QoS 0, and the broker does not queue them for the gap (they would crowd out the answers in its
per-session queue). A new process starts a clean session; a clean stop ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.errors import ModelNotReady
from appliance.platform import presence
from appliance.platform.batched import BatchedClient
from appliance.platform.presence import Presence
from appliance.platform.settings import GatewaySettings
from appliance.platform.view import NodeView, PoolView
from appliance.pool.topics import node_filter
from appliance.pool.wire import Broker, Inbound, Outbound, Security, inbound, paho_client, publish_properties

log = logging.getLogger(__name__)

KINDS = ("birth", "state", "capacity")
KEEPALIVE_S = 15
MISC_INTERVAL_S = 1.0  # paho's loop_misc: keepalive pings and retries
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 2.0
READS_PER_TURN = 64  # loop_reads in one turn of the loop while bytes are buffered (ours or TLS's)
SESSION_JOB_TIMEOUTS = 2  # the broker keeps the session this many job timeouts after a drop


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
        self._answers = f"{self.reply_base}/"  # not the answers of a gateway whose id starts with ours
        self.presence_topic = presence.topic(self.root, settings.gateway_id)
        self._on_answer = on_answer
        self._on_state = on_state
        self._on_birth = on_birth
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lost: asyncio.Event | None = None  # set when the connection ends: the supervisor reconnects
        self._delay_s = RECONNECT_MIN_S
        self._is_flush_due = False
        self.connected = threading.Event()
        self.connected_s: float | None = None  # monotonic, of the last connection
        self.connections = 0
        self.drops = 0  # connections lost (not closed by the gateway): a job sent before one may miss it
        self.session_expiry_s = max(1, math.ceil(SESSION_JOB_TIMEOUTS * settings.job_timeout_s))
        self._is_closing = False
        self._client = paho_client(f"gateway-{settings.gateway_id}", mqtt.MQTTv5, kind=BatchedClient)
        self.security.apply(self._client)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(10000)
        self._client.on_socket_open = self._socket_open
        self._client.on_socket_close = self._socket_close
        self._client.on_socket_register_write = self._write_wanted
        self._client.on_socket_unregister_write = self._write_done
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._received

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect in the background (on `loop`, from its thread); reconnect after any loss."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lost = asyncio.Event()
        properties = Properties(PacketTypes.CONNECT)
        # The broker never sends the gateway a larger packet (MQTT 5 section 3.1.2.11.4): one peer's
        # retained megabytes are not read, parsed and kept at every (re)connect.
        properties.MaximumPacketSize = self.settings.max_packet_bytes
        # Answers sent while the connection is down wait at the broker (module docstring); paho starts
        # clean only at its first connection, so an older process's session is not taken over.
        properties.SessionExpiryInterval = self.session_expiry_s
        self._client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=KEEPALIVE_S,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._supervisor = loop.create_task(self._supervise(), name="gateway-mqtt")

    async def _supervise(self) -> None:
        """Connect, keep alive (paho's loop_misc: pings, retries), and after a loss connect again with a
        backoff from RECONNECT_MIN_S to RECONNECT_MAX_S."""
        assert self._lost is not None
        failures = 0
        while not self._is_closing:
            self._lost.clear()
            # A Will for this connection: a peer takes it only while the latest `online` it has from
            # this gateway is this connection's (presence.py), so a replayed earlier Will changes nothing.
            self._client.will_set(
                self.presence_topic, self.gateways.document(presence.OFFLINE), qos=1, retain=True
            )
            try:
                await asyncio.to_thread(self._client.reconnect)  # blocking connect (and TLS handshake)
            except Exception as exc:  # noqa: BLE001 - any failure to connect is retried
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG  # once per outage
                log.log(level, "gateway: cannot connect to broker %s (%s); retrying", self.broker, exc)
                self._lost.set()
            else:
                failures = 0
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), MISC_INTERVAL_S)
                if not self._lost.is_set():
                    self._client.loop_misc()
                    self.view.forget(time.monotonic())  # ingest forgets too, but only as messages come
            if not self._is_closing:
                await asyncio.sleep(self._delay_s)
                self._delay_s = min(2 * self._delay_s, RECONNECT_MAX_S)

    def is_learning(self) -> bool:
        """Not connected, or connected so recently (gateway.learning_s) that the pool's retained births,
        states and reports, which the broker sends right after the subscription, may still be arriving."""
        since_s = self.connected_s
        if not self.connected.is_set() or since_s is None:
            return True
        return time.monotonic() - since_s < self.settings.learning_s

    def was_away_since(self, drops: int) -> bool:
        """Whether the connection dropped since `drops` was read from `self.drops`, or is down now: an
        answer sent meanwhile may have been lost (the broker kept the session for session_expiry_s)."""
        return self.drops != drops or not self.connected.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self.connected.wait, timeout_s)

    def publish(self, message: Outbound) -> None:
        """Hand a job to paho (QoS 1; paho resends it if the connection drops before PUBACK)."""
        if not self.connected.is_set():
            raise BrokerAway(f"the gateway is not connected to broker {self.broker}", retry_after_s=1.0)
        info = self._client.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            properties=publish_properties(message),
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerAway(f"broker {self.broker} did not take a job: {mqtt.error_string(info.rc)}")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Say `offline` (so the others take our share back at once), then disconnect."""
        self._is_closing = True
        deadline_s = time.monotonic() + timeout_s
        if self.connected.is_set():
            info = self._client.publish(
                self.presence_topic,
                self.gateways.document(presence.OFFLINE),
                qos=1,
                retain=True,
            )
            while not info.is_published() and self.connected.is_set() and time.monotonic() < deadline_s:
                await asyncio.sleep(0.01)  # the loop writes it and reads its PUBACK meanwhile
        ending = Properties(PacketTypes.DISCONNECT)
        ending.SessionExpiryInterval = 0  # nothing is left to answer: the broker drops the session now
        self._client.disconnect(properties=ending)  # paho closes the socket once DISCONNECT is written
        while self._client.socket() is not None and time.monotonic() < deadline_s:
            await asyncio.sleep(0.01)
        if self._client.socket() is not None:
            self._client.loop_write()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    # paho's callbacks: on the loop's thread, except the socket opening in a connection attempt.

    def _socket_open(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        _no_delay(client, _u, sock)
        self._on_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        assert self._loop is not None
        if self._client.socket() is sock:  # not one a failed attempt has closed meanwhile
            self._loop.add_reader(sock, self._readable)

    def _socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock.fileno())  # the fd: paho closes the socket next

    def _unwatch(self, fd: int) -> None:
        assert self._loop is not None
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):  # closed already: nothing left to watch
                self._loop.remove_reader(fd)
        self._unwatch_writes(fd)

    def _write_wanted(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        """paho has packets queued: write them in this turn of the loop, with whatever else was
        published in it (a writer is watched only while the socket's buffer is full)."""
        self._on_loop(self._flush_soon, sock)

    def _flush_soon(self, sock: Any) -> None:
        assert self._loop is not None
        if not self._is_flush_due:
            self._is_flush_due = True
            self._loop.call_soon(self._flush, sock)

    def _flush(self, sock: Any) -> None:
        self._is_flush_due = False
        if self._client.socket() is not sock:
            return
        self._client.loop_write()
        if self._client.want_write() and self._client.socket() is sock:
            assert self._loop is not None
            self._loop.add_writer(sock, self._client.loop_write)

    def _write_done(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._unwatch_writes, sock.fileno())

    def _unwatch_writes(self, fd: int) -> None:
        assert self._loop is not None
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(fd)

    def _readable(self) -> None:
        """Read what came. What is buffered already (BatchedClient's, or a TLS socket's decrypted bytes)
        the poller cannot see: read on while some is, and come back in a later turn after
        READS_PER_TURN reads (paho reads as few as one packet per loop_read)."""
        client = self._client
        sock = client.socket()
        for _ in range(READS_PER_TURN):
            client.loop_read()
            if sock is None or client.socket() is not sock:
                return
            if not (client.buffered() or (self.broker.is_tls and sock.pending())):
                return
        assert self._loop is not None
        self._loop.call_soon(self._readable)

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run now when on the loop's thread (reads, writes, publishes); else hand it to the loop."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        elif not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                self._loop.call_soon_threadsafe(callback, *args)

    def _connected(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("gateway: broker %s refused the connection: %s", self.broker, reason)
            return
        self.connections += 1
        self.connected_s = time.monotonic()
        self._delay_s = RECONNECT_MIN_S
        if self.connections > 1 and not flags.session_present:
            log.warning(
                "gateway: broker %s kept no session (down over %d s, restarted, or no persistent "
                "sessions): answers sent meanwhile are lost",
                self.broker,
                self.session_expiry_s,
            )
        # Subscribed again even where the session kept the subscriptions: the same filters replace
        # them, and the retained births, states, reports and presences come again (QoS 0: not queued).
        site = self.settings.site
        filters = [(node_filter(self.root, kind, site=site), 0) for kind in KINDS]
        filters += [(f"{self.reply_base}/#", 1), (presence.topic(self.root), 0)]
        client.subscribe(filters)
        client.publish(
            self.presence_topic,
            self.gateways.document(presence.ONLINE),
            qos=1,
            retain=True,
        )
        self.connected.set()
        log.info("gateway: connected to %s as %s", self.broker, self.settings.gateway_id)

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self.connected.is_set() and not self._is_closing:
            self.drops += 1
        self.connected.clear()
        if not self._is_closing:
            log.warning("gateway: lost broker %s (%s); reconnecting", self.broker, reason)
        if self._lost is not None:
            self._on_loop(self._lost.set)
        self._call(self._on_state)

    def _received(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        received_s = time.monotonic()
        topic = message.topic
        if topic.startswith(self._answers):
            self._call(self._on_answer, inbound(message), received_s)
        elif self.gateways.ingest(topic, bytes(message.payload)):
            return
        else:
            report = inbound(message)  # a retained report's expiry is what the broker says is left of it
            changed = self.view.ingest(topic, report.payload, received_s, report.expiry_s)
            if changed is None:
                return
            if topic.endswith("/state") and changed.state != "online":
                self._call(self._on_state)
            elif topic.endswith("/birth"):
                self._call(self._on_birth, changed)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """The gateway's handlers run in a later turn of the loop, outside paho's read."""
        self._on_loop(self._soon, callback, *args)

    def _soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon(callback, *args)


def _no_delay(_c: mqtt.Client, _u: Any, sock: Any) -> None:
    """Jobs are small and latency-bound: send each packet at once (paho leaves Nagle's algorithm on)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
