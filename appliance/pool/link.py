"""PoolLink: this node in the pool: birth, state and capacity over MQTT, commands and jobs in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from appliance.dataplane.plane import DataPlane
from appliance.pool import commands, messages
from appliance.pool.cadence import ReportCadence
from appliance.pool.client import Connection, Unpublishable
from appliance.pool.jobs import JobIntake, status_of
from appliance.pool.messages import DRAINING, OFFLINE, ONLINE
from appliance.pool.outbox import Outbox
from appliance.pool.routes import NoReply, Reply, Unanswerable, shown
from appliance.pool.session import SessionCounter
from appliance.pool.topics import NodeTopics
from appliance.pool.wire import Inbound, Outbound
from appliance.providers.registry import Registry
from appliance.scheduler.report import capacity_report
from appliance.settings import Settings

log = logging.getLogger(__name__)


class PoolLink:
    """Created by the service when pool.broker is set; `start()` returns at once, the broker may be away."""

    def __init__(self, settings: Settings, plane: DataPlane, registry: Registry) -> None:
        self.settings = settings
        self.pool = settings.pool
        self.hub = plane.hub
        self.registry = registry
        self.topics = NodeTopics(self.pool.topic_root, self.pool.site, self.pool.node_id)
        self.sessions = SessionCounter(settings.system.state_dir)
        self.session = 0  # of the current or last connection
        self.state, self.reason = ONLINE, ""
        self.outbox = Outbox(self.pool.max_pending_responses)
        self.cadence = ReportCadence(self.pool.report_interval_s, self.pool.capacity_change_pct / 100)
        self.jobs = JobIntake(
            plane,
            settings,
            send=self._send,
            emit=self._emit,
            session=lambda: self.session,
            oversize=lambda message: self.connection.oversize(message),
        )
        self.is_remote_control = self.pool.remote_control  # cmd/drain, resume, rebirth from the pool
        self.connection = Connection(
            self.pool,
            client_id=f"appliance-{self.pool.site}-{self.pool.node_id}",
            will=self._will,
            handler=self,
        )
        self._seq = 0
        self._pending_session = 0
        self.is_stopping = False
        self.default_drain_timeout_s = settings.server.drain_timeout_s
        self._is_local_drain = False  # drained by the service (OTA, admin), not by cmd/drain
        self._born_with: tuple[Any, ...] = ()  # messages.models_served at the last birth
        self._settled = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._up, self._down = asyncio.Event(), asyncio.Event()
        self._down.set()

    @property
    def is_connected(self) -> bool:
        return self.connection.is_connected

    async def wait_connected(self, is_connected: bool = True) -> None:
        """Return once the link is up (or down, with False); callers bound the wait themselves."""
        await (self._up if is_connected else self._down).wait()

    async def start(self) -> None:
        """Connect in the background and keep reconnecting; serving never waits for the broker."""
        log.info("pool link: %s as %s", self.connection.broker, self.topics.base)
        self.connection.start()
        self._reporter = asyncio.create_task(self._report_loop(), name="pool-reports")

    async def announce_local_drain(self, reason: str) -> None:
        """An operator or OTA drains the service: refuse new jobs and tell the pool now, with the reason;
        its resume brings the pool side back online (`_follow_local_drain`). A drain the pool asked for
        (cmd/drain) stays until the pool resumes it."""
        if self.state == ONLINE:
            self._is_local_drain = True
            self.set_state(DRAINING, reason)

    async def announce_draining(self, reason: str) -> None:
        """The service is stopping: refuse new jobs and tell the pool (retained state `draining`) for good."""
        self.is_stopping = True
        self.jobs.refusal = "stopping"
        self.set_state(DRAINING, reason)

    async def stop(self) -> None:
        """Answer jobs in progress, publish `offline`, wait (bounded) for acknowledgements, disconnect."""
        self.is_stopping = True
        self.jobs.refusal = "stopping"
        timeout_s = self.pool.stop_timeout_s
        if not await self.jobs.wait(timeout_s):
            log.warning("pool jobs still running after %.1f s at stop", timeout_s)
        for task in (self._reporter, *self._commands):
            if task is not None:
                task.cancel()
        self.state, self.reason = OFFLINE, "stopped"
        if self.is_connected:  # otherwise the broker has published the Last Will, or never heard of us
            self._send(self._state_message())
            await self._settle(timeout_s)
        if not self.outbox.is_empty:
            log.warning(
                "pool link: %d responses, events or state messages unacknowledged at stop (broker %s)",
                len(self.outbox),
                "connected" if self.is_connected else "unreachable",
            )
        await self.connection.close(end_session=True)

    # Connection events (on the event loop).

    def connected(self, is_v5: bool) -> None:
        self.session, self._seq = self._pending_session, 0
        self.sessions.spend()
        log.info(
            "pool link up: %s (MQTT %s), session %d",
            self.connection.broker,
            "5" if is_v5 else "3.1.1",
            self.session,
        )
        self.connection.subscribe(self.topics.commands, qos=1)
        self.publish_birth()
        self._publish(self.topics.state, self._state_document(), retain=True)
        self.cadence.forget()
        self._publish_capacity()
        dropped = self.outbox.take_dropped()
        if dropped:
            log.warning("pool link: %d responses or events dropped while the broker was away", dropped)
            self._emit("outbox_overflow", dropped=dropped)
        self._flush()
        self._down.clear()
        self._up.set()

    def disconnected(self, reason: str) -> None:
        poison = self.outbox.connection_lost()
        self._up.clear()
        self._down.set()
        if poison is not None:
            self._dropped(
                poison, f"the broker hung up twice as it was the oldest message in flight ({reason})"
            )

    def acknowledged(self, mid: int, refusal: str | None) -> None:
        message = self.outbox.acknowledged(mid)
        if message is None:
            return
        if refusal is not None:  # never sent again: the broker would refuse it again
            self._dropped(message, f"the broker refused it: {refusal}")
        if self.outbox.is_empty:
            self._settled.set()

    def received(self, message: Inbound) -> None:
        command = self.topics.parse_command(message.topic)
        if command is None:
            return
        verb, argument = command
        if verb == "infer" and argument:
            self.jobs.submit(argument, message)
            return
        name = f"{verb}/{argument}" if argument else verb  # cmd/drain/x is no drain
        task = asyncio.create_task(self._command(name, message), name="pool-command")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _command(self, verb: str, message: Inbound) -> None:
        route: Reply | None = None
        try:
            route = self.jobs.rules.route(message)
        except Unanswerable as exc:
            if type(exc) is not NoReply:  # it names a reply topic, but one we must not answer on: no-op
                self._emit("command", verb=verb[:80], status=status_of(exc), error=f"cmd/{verb:.80}: {exc}")
                return
        document = await commands.run(self, verb, message.payload, is_retained=message.is_retained)
        if route is not None:
            self._send(commands.reply(route, document))
        self._emit("command", verb=verb[:80], status=document["status"], error=document.get("error"))

    # Publishing.

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def _publish(
        self, topic: str, document: dict[str, Any], *, retain: bool, expiry_s: int | None = None
    ) -> None:
        """Birth, state, reports: sent now or never; a reconnect publishes fresh ones instead."""
        message = Outbound(topic, messages.encode(document), retain=retain, expiry_s=expiry_s)
        try:
            self.connection.publish(message)
        except Unpublishable as exc:
            log.error("pool link cannot publish %s: %s", topic, exc)

    def _send(self, message: Outbound) -> None:
        """Job responses, events and the last state: kept in order until the broker acknowledges them."""
        if self.outbox.is_waiting or not self._try_publish(message):
            self.outbox.put(message)

    def _try_publish(self, message: Outbound) -> bool:
        """True once the message is handed to paho (or dropped for good); False to keep it."""
        try:
            mid = self.connection.publish(message)
        except Unpublishable as exc:
            self._dropped(message, str(exc))
            return True
        if mid is not None:
            self.outbox.sent(mid, message)
        return mid is not None

    def _dropped(self, message: Outbound, why: str) -> None:
        """A message that will never be delivered: said on evt (an event about an event only in the log)."""
        log.warning("pool link dropped a message to %s: %s", shown(message.topic), why)
        if message.topic != self.topics.evt:
            self._emit("message_dropped", topic=message.topic[:200], error=why)

    def _flush(self) -> None:
        while self.is_connected and (message := self.outbox.take()) is not None:
            if not self._try_publish(message):
                self.outbox.put_back(message)
                return

    async def _settle(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self.outbox.is_empty:
                    self._settled.clear()
                    self._flush()
                    await self._settled.wait()

    def _emit(self, kind: str, **fields: Any) -> None:
        document = messages.event(
            node=self.pool.node_id, session=self.session, seq=self._next_seq(), kind=kind, **fields
        )
        self._send(Outbound(self.topics.evt, messages.encode(document)))

    # Documents.

    def _will(self, is_v5: bool) -> Outbound:
        """The Last Will of the next connection; it carries that connection's session."""
        self._pending_session = self.sessions.take()
        document = messages.state(
            node=self.pool.node_id,
            session=self._pending_session,
            seq=None,
            value=OFFLINE,
            reason="connection lost",
            by_will=True,
        )
        return Outbound(self.topics.state, messages.encode(document), retain=True)

    def publish_birth(self) -> None:
        self._born_with = messages.models_served(self.hub)
        self._publish(self.topics.birth, self._birth(), retain=True)

    def _birth(self) -> dict[str, Any]:
        return messages.birth(
            node=self.pool.node_id,
            session=self.session,
            seq=self._next_seq(),
            hub=self.hub,
            registry=self.registry,
            settings=self.pool,
            public_key=self.jobs.public_key,
        )

    def _state_document(self) -> dict[str, Any]:
        return messages.state(
            node=self.pool.node_id,
            session=self.session,
            seq=self._next_seq(),
            value=self.state,
            reason=self.reason,
        )

    def _state_message(self) -> Outbound:
        return Outbound(self.topics.state, messages.encode(self._state_document()), retain=True)

    def set_state(self, value: str, reason: str) -> None:
        if self.is_stopping and value == ONLINE:
            return
        self.state, self.reason = value, reason
        self.jobs.refusal = "stopping" if self.is_stopping else (value if value != ONLINE else None)
        if self.is_connected:
            self._publish(self.topics.state, self._state_document(), retain=True)
            self._publish_capacity()

    # Capacity reports.

    def _publish_capacity(self, report: dict[str, Any] | None = None) -> None:
        report = report if report is not None else capacity_report(self.hub)
        document = messages.capacity(
            node=self.pool.node_id,
            session=self.session,
            seq=self._next_seq(),
            report=report,
            interval_s=self.pool.report_interval_s,
        )
        self._publish(self.topics.capacity, document, retain=True, expiry_s=document["valid_for_s"])
        self.cadence.published(time.monotonic(), messages.spare_by_model(report))

    async def _report_loop(self) -> None:
        tick_s = min(1.0, self.pool.report_interval_s / 4)
        while True:
            await asyncio.sleep(tick_s)
            self._follow_local_drain()
            if not self.is_connected:
                continue  # no backlog: the reconnect publishes one fresh report
            if messages.models_served(self.hub) != self._born_with:
                self.publish_birth()  # a reload or a model loaded, removed or failed: say what is served now
                self.cadence.forget()
            report = capacity_report(self.hub)
            if self.cadence.is_due(time.monotonic(), messages.spare_by_model(report)):
                self._publish_capacity(report)

    def _follow_local_drain(self) -> None:
        """A drain by the service itself (OTA, admin socket) shows in `state` too, and so does its end."""
        if self.hub.is_draining and self.state == ONLINE:
            self._is_local_drain = True
            self.set_state(DRAINING, "local drain")
        elif not self.hub.is_draining and self._is_local_drain and self.state == DRAINING:
            self._is_local_drain = False
            self.set_state(ONLINE, "local resume")
