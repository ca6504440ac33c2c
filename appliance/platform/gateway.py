"""The gateway service: composition root and lifecycle (link, view, credit, dispatch, ledger, checks, API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from typing import Any

import orjson
import uvicorn

from appliance import errors
from appliance.dataplane.outcomes import outcome_of
from appliance.errors import ApplianceError, ConfigError
from appliance.platform import api, receipts, verify
from appliance.platform.attempts import Answer, Job
from appliance.platform.buyers import Buyers
from appliance.platform.catalogue import Catalogue
from appliance.platform.checks import Checks
from appliance.platform.credit import CreditBook
from appliance.platform.dispatch import Dispatcher
from appliance.platform.ledger import Ledger
from appliance.platform.link import GatewayLink
from appliance.platform.metering import Metering
from appliance.platform.metrics import GatewayMetrics
from appliance.platform.presence import Presence
from appliance.platform.settings import KEY_CREDENTIAL, PlatformSettings
from appliance.platform.trust import Trust
from appliance.platform.view import PoolView
from appliance.platform.writer import LedgerWriter
from appliance.pool import identity, signing
from appliance.pool.wire import Outbound
from appliance.protocol.codec import InferenceRequest
from appliance.server.connections import BodyLate, HeadersLate, bounded_protocol
from appliance.server.gate import ConnectionGate

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # whatever a buyer's own limit says
# The buyer API answers a late inference body itself at gateway.body_timeout_s (408, or the 413 whose
# body's rest it was reading): the connection's own body deadline comes this much later, for bodies no
# route reads (server/connections.py).
BODY_GRACE_S = 1.0
# Refusals made by the connections themselves, as /metrics labels them (else the status table's reason).
CONNECTION_REASONS: dict[type[BaseException], str] = {
    HeadersLate: "header_timeout",
    BodyLate: "body_timeout",
    errors.HeaderTooLarge: "header_too_large",
}
# Each job's receipt crosses to the ledger thread and back (MQTT runs on the loop itself since
# 2026-12-06; before, each job also crossed to paho's thread). With CPython's default 5 ms GIL switch
# interval a busy loop holds the other thread off for up to 5 ms each time (bench/swarm.py, with
# paho's thread: p50 18.7 ms at 500 jobs/s with 5 ms, 11.7 ms with 0.5 ms, on 2 shared cores).
SWITCH_INTERVAL_S = 0.0005


class Gateway:
    """One gateway instance. Stateless apart from its own jobs in flight: another instance on the same
    broker sees the same nodes, and each takes 1/N of every offer (presence)."""

    def __init__(self, platform: PlatformSettings) -> None:
        settings = platform.gateway
        if not settings.broker:
            raise ConfigError("gateway.broker is not set (--broker mqtt://host:port)")
        if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
            raise ConfigError("gateway.tls_cert_file and gateway.tls_key_file go together")
        self.platform = platform
        self.settings = settings
        self.max_body_bytes = MAX_BODY_BYTES
        self.view = PoolView(
            settings.topic_root,
            needs_key=True,
            max_nodes=settings.max_nodes,
            forget_after_s=settings.forget_after_s,
        )
        self.catalogue = Catalogue.load(settings.catalogue)
        self.key = identity.device_key(
            settings.state_dir,
            identity.credentials_directory(),
            credential=KEY_CREDENTIAL,
            state_file="gateway-key.pem",
        )
        # Presence is signed with the gateway key; peers count it if the shared ledger lists that key.
        self.presence = Presence(
            settings.topic_root,
            settings.gateway_id,
            key=self.key,
            max_gateways=settings.max_gateways,
            refresh_s=settings.presence_refresh_s,
            max_clock_skew_s=settings.presence_max_clock_skew_s,
        )
        ledger = Ledger.open(platform.ledger.url or str(settings.state_dir / "ledger.sqlite3"))
        ledger.register_gateway(settings.gateway_id, signing.public_key_text(self.key))
        self.presence.known(ledger.gateway_keys())
        self.writer = LedgerWriter(ledger)
        self.buyers = Buyers.load(
            settings.buyers_file,
            rate_per_s=settings.default_rate_per_s,
            max_body_bytes=settings.default_max_body_bytes,
        )
        self.credit = CreditBook(
            self.view, share=self.presence.share, sample_nodes=settings.sample_nodes, clock=time.monotonic
        )
        self.metrics = GatewayMetrics(
            self.view, self._gauges, catalogue=self.catalogue, max_models=settings.max_metric_models
        )
        self.link = GatewayLink(
            settings,
            self.view,
            self.presence,
            on_answer=self._answered,
            on_state=self._state_changed,
            on_birth=self._born,
        )
        self.dispatcher = Dispatcher(
            settings,
            self.credit,
            self.link.publish,
            reply_base=self.link.reply_base,
            on_event=self.metrics.job,
            verify=self._verify,
            on_refused=self._refused,
            on_late=self._late,
            link_drops=lambda: self.link.drops,
            was_away=self.link.was_away_since,
        )
        self.metering = Metering(self.writer, self.key, settings.gateway_id)
        self.trust = Trust(
            self.view, self.writer, self.catalogue, emit=self._emit, refresh_s=platform.ledger.refresh_s
        )
        self.checks = Checks(
            platform.canary,
            self.catalogue,
            self.dispatcher,
            self.metering,
            self.trust,
            count=self.metrics.job,
        )
        self.app = api.create_app(self)
        # Buyer API connections, in all and per client address (server/gate.py).
        self.gate = ConnectionGate(settings.max_connections, settings.max_connections_per_peer, "gateway")
        self.started = asyncio.Event()
        self._server: uvicorn.Server | None = None

    async def dispatch(self, job: Job, decoded: InferenceRequest) -> Answer:
        """Run a buyer's job: its answer verified, its receipt committed before the buyer has it, then
        perhaps a canary or a second opinion."""
        job.input_sha256 = signing.tensor_digest(decoded.inputs)
        answer = await self.dispatcher.run(job)
        if answer.status == 200:
            await self.metering.commit(self.metering.receipt(job, answer, receipts.ACCEPTED))
            self.checks.after(job, answer, decoded.inputs, job.outputs)
        return answer

    def _verify(self, job: Job, answer: Answer) -> verify.Proof:
        return verify.check(
            answer.node,
            answer.job_id,
            answer.payload,
            answer.header_length,
            input_sha256=job.input_sha256,
            files=job.files,
            latency_ms=answer.latency_ms,
            asked=job.outputs,
        )

    def _refused(self, job: Job, answer: Answer, refusal: verify.Refused) -> None:
        """A 200 signed with the node's own key but wrong (a file the job may not run on, figures no
        honest node signs): recorded (never billed), the node quarantined, the job moved on. An answer
        that cannot be verified never comes here: anyone could have sent it (dispatch counts it)."""
        receipt = self.metering.receipt(
            job,
            answer,
            receipts.REFUSED,
            detail=str(refusal),
            statement=refusal.statement,
            signature=refusal.signature,
        )
        self.metering.record(receipt)
        self.trust.fail(answer.node, f"answer to job {answer.job_id} refused: {refusal}")

    def _late(self, job: Job, answer: Answer) -> None:
        """An answer after its job was over (a re-sent job's first node, say): recorded, never billed."""
        detail = "answered after the job was over; the buyer had another answer"
        self.metering.record(self.metering.receipt(job, answer, receipts.LATE, detail=detail))

    def _born(self, node: Any) -> None:
        self.trust.born(node)

    def _emit(self, kind: str, **fields: Any) -> None:
        """An event on <root>/_gateways/<id>/evt/<kind> (node quarantined or released, receipts flagged;
        schema gateway_evt). Four levels under the root, so that no node topic filter matches it."""
        document = {
            "gateway": self.settings.gateway_id,
            "event": kind,
            "ts_ms": int(time.time() * 1000),
            **fields,
        }
        topic = f"{self.settings.topic_root}/_gateways/{self.settings.gateway_id}/evt/{kind}"
        try:
            self.link.publish(Outbound(topic, orjson.dumps(document)))
        except ApplianceError as exc:
            log.warning("gateway event %s not published: %s", kind, exc)

    def _answered(self, message: Any, received_s: float) -> None:
        self.dispatcher.answered(message, received_s)

    def _state_changed(self) -> None:
        """A node's state message other than `online`, or the broker lost: the nodes that went offline
        since (the view keeps them) lose their jobs in flight. Nothing else is checked here (a node may
        send state messages as fast as it likes); silence is the periodic sweep's."""
        fallen = self.view.fallen()
        if fallen:
            self.dispatcher.sweep(fallen)

    def _refused_connection(self, model: str | None, priority: object, exc: BaseException) -> None:
        """A refusal made by a connection itself (header size and time, body time, connection limits,
        malformed HTTP, stopping), counted with the buyer refusals."""
        self.metrics.refused(CONNECTION_REASONS.get(type(exc)) or outcome_of(exc).reason)

    async def _gateway_keys(self) -> dict[str, list[str]]:
        return await self.writer.call(self.writer.ledger.gateway_keys)

    def _gauges(self) -> dict[str, float]:
        return {
            "http_connections_open": self.gate.open,
            "jobs_in_flight": self.dispatcher.in_flight,
            "late_answers_dropped_total": self.dispatcher.late_answers,
            "unverified_answers_total": self.dispatcher.unverified_answers,
            "live_gateways": len(self.presence.live()),
            "broker_connected": float(self.link.connected.is_set()),
            "broker_connections_total": self.link.connections,
            "receipts_committed_total": self.writer.committed,
            "ledger_transactions_total": self.writer.groups,
            "ledger_commits_waiting": self.writer.waiting,
            "ledger_calls_waiting": self.writer.calls_waiting,
            "node_pins_waiting": self.trust.pins_waiting,
            "presences_ignored_total": self.presence.ignored,
            "quarantined_nodes": self.trust.quarantined(),
        }

    async def run(self, sockets: list[socket.socket] | None = None) -> int:
        """Serve until stopped (SIGTERM/SIGINT in the main thread, or `stop()`); 0 after a clean stop."""
        loop = asyncio.get_running_loop()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.link.start(loop)
        sweeper = asyncio.create_task(self.dispatcher.sweep_forever(), name="gateway-sweep")
        background = [
            asyncio.create_task(self.trust.refresh_forever(), name="gateway-ledger-refresh"),
            asyncio.create_task(self.checks.recheck_forever(), name="gateway-recheck"),
            asyncio.create_task(
                self.presence.refresh_forever(self.link.publish, self._gateway_keys), name="gateway-presence"
            ),
        ]
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            ssl_certfile=self.settings.tls_cert_file,
            ssl_keyfile=self.settings.tls_key_file,
            log_config=None,
            access_log=False,
            # Nothing here reads the client's address from the request (limits go by the connection's
            # peer, server/gate.py), so uvicorn's X-Forwarded-* rewriting would be a layer for nothing.
            proxy_headers=False,
            lifespan="off",
            # Header size and time, body time and connection limits, as on the box (server/connections.py).
            http=bounded_protocol(
                self.settings,
                self.gate,
                self._refused_connection,
                section="gateway",
                body_grace_s=BODY_GRACE_S,
            ),
            ws="none",  # no WebSocket route: an upgrade request is served as plain HTTP
            timeout_keep_alive=self.settings.idle_timeout_s,  # type: ignore[arg-type]
            timeout_graceful_shutdown=self.settings.drain_timeout_s,  # type: ignore[arg-type]
        )
        self._server = uvicorn.Server(config)
        # uvicorn would re-raise SIGTERM after its shutdown (exit -15); a stop we asked for exits 0.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(number, self.stop)
        serving = asyncio.create_task(self._server.serve(sockets=sockets), name="gateway-http")
        while not self._server.started and not serving.done():
            await asyncio.sleep(0.01)  # uvicorn offers no event for it
        if self._server.started:
            self.started.set()
            address = self._address(sockets)
            log.info("gateway %s ready on %s", self.settings.gateway_id, address)
        try:
            await serving
        finally:
            for task in (sweeper, *background):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.metering.drain()
            await self.link.close()
            await asyncio.to_thread(self.writer.close)
        return 0 if self._server.started else 1

    def stop(self) -> None:
        """Ask the server to stop (thread-safe enough: uvicorn polls the flag)."""
        if self._server is not None:
            self._server.should_exit = True

    def _address(self, sockets: list[socket.socket] | None) -> str:
        scheme = "https" if self.settings.tls_cert_file else "http"
        if sockets:
            host, port = sockets[0].getsockname()[:2]
        else:
            servers = self._server.servers if self._server is not None else []
            host, port = servers[0].sockets[0].getsockname()[:2] if servers else (self.settings.host, 0)
        return f"{scheme}://{host}:{port}"
