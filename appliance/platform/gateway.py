"""The gateway service: composition root and lifecycle (link, view, credit, dispatch, buyer API)."""

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

import uvicorn

from appliance.errors import ConfigError
from appliance.platform import api
from appliance.platform.buyers import Buyers
from appliance.platform.catalogue import Catalogue
from appliance.platform.credit import CreditBook
from appliance.platform.dispatch import Answer, Dispatcher, Job
from appliance.platform.link import GatewayLink
from appliance.platform.metrics import GatewayMetrics
from appliance.platform.presence import Presence
from appliance.platform.settings import PlatformSettings
from appliance.platform.view import PoolView
from appliance.protocol.codec import InferenceRequest

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # whatever a buyer's own limit says
STOP_TIMEOUT_S = 10.0
# Each job crosses between paho's thread and the event loop twice; with CPython's default 5 ms GIL
# switch interval a busy thread holds the other off for up to 5 ms each time (bench/swarm.py: p50
# 18.7 ms at 500 jobs/s with 5 ms, 11.7 ms with 0.5 ms, on 2 shared cores).
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
        self.view = PoolView(settings.topic_root)
        self.presence = Presence(settings.topic_root, settings.gateway_id)
        self.catalogue = Catalogue.load(settings.catalogue)
        self.buyers = Buyers.load(
            settings.buyers_file,
            rate_per_s=settings.default_rate_per_s,
            max_body_bytes=settings.default_max_body_bytes,
        )
        self.credit = CreditBook(
            self.view, share=self.presence.share, sample_nodes=settings.sample_nodes, clock=time.monotonic
        )
        self.metrics = GatewayMetrics(self.view, self._gauges)
        self.link = GatewayLink(
            settings, self.view, self.presence, on_answer=self._answered, on_state=self._state_changed
        )
        self.dispatcher = Dispatcher(
            settings,
            self.credit,
            self.link.publish,
            reply_base=self.link.reply_base,
            on_event=self.metrics.job,
        )
        self.app = api.create_app(self)
        self.started = asyncio.Event()
        self._server: uvicorn.Server | None = None

    async def dispatch(self, job: Job, decoded: InferenceRequest) -> Answer:
        """Run a buyer's job; the receipts issue hooks in here (ledger, canaries)."""
        return await self.dispatcher.run(job)

    def _answered(self, message: Any, received_s: float) -> None:
        self.dispatcher.answered(message, received_s)

    def _state_changed(self) -> None:
        self.dispatcher.sweep()

    def _gauges(self) -> dict[str, float]:
        return {
            "jobs_in_flight": self.dispatcher.in_flight,
            "late_answers_dropped_total": self.dispatcher.late_answers,
            "live_gateways": len(self.presence.live()),
            "broker_connected": float(self.link.connected.is_set()),
            "broker_connections_total": self.link.connections,
        }

    async def run(self, sockets: list[socket.socket] | None = None) -> int:
        """Serve until stopped (SIGTERM/SIGINT in the main thread, or `stop()`); 0 after a clean stop."""
        loop = asyncio.get_running_loop()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.link.start(loop)
        sweeper = asyncio.create_task(self.dispatcher.sweep_forever(), name="gateway-sweep")
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            ssl_certfile=self.settings.tls_cert_file,
            ssl_keyfile=self.settings.tls_key_file,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=STOP_TIMEOUT_S,
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
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await asyncio.to_thread(self.link.close)
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
