"""The composition root: settings -> repository -> models -> HTTP -> pool link, and the way back down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from appliance.control import Control
from appliance.dataplane.plane import DataPlane
from appliance.engine.repository import Repository
from appliance.providers.registry import Registry
from appliance.scheduler.hub import ModelHub
from appliance.server.app import create_app
from appliance.server.connections import bounded_protocol
from appliance.server.gate import ConnectionGate
from appliance.server.grpc.server import OFF as GRPC_OFF
from appliance.server.grpc.server import GrpcServer
from appliance.settings import Settings
from appliance.system import cpu, logs
from appliance.system.admin import AdminServer
from appliance.system.sdnotify import Notifier

if TYPE_CHECKING:
    from appliance.pool.link import PoolLink

log = logging.getLogger(__name__)

_LOAD_MARGIN_S = 30.0  # asked of systemd per model beyond models.load_timeout_s: the hub's deadline first
_CPU_SAMPLE_S = 2.0


class _StopRequested(Exception):
    """A stop came while models were still loading: load no more of them."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service drains first, then stops the server."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def listen(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before uvicorn starts, so that a port in use is one OSError
    naming the address (which `appliance serve` prints as one line) rather than uvicorn's exit."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise OSError(f"cannot listen on {host}:{port}: {why} (server.host, server.port)") from None
    sock.set_inheritable(False)
    return sock


def _pool_link(service: Service) -> PoolLink | None:
    """The MQTT link to the pool, when `pool.broker` is set."""
    if service.settings.pool.broker is None:
        return None
    from appliance.pool.link import PoolLink

    return PoolLink(service.settings, service.plane, service.registry)


class Service:
    """One process per box. `run()` returns the exit code; `stop()` may be called from any thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        sockets: Sequence[socket.socket] | None = None,
        notifier: Notifier | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.sockets = list(sockets) if sockets else None
        self.notifier = notifier or Notifier.from_env()
        self.registry = Registry.discover()
        self.hub = ModelHub(settings, self.registry, Repository.open(settings.models.repository))
        self.plane = DataPlane(self.hub, settings)
        self.gate = ConnectionGate.of(settings.server)  # HTTP connections, in all and per client
        self.app = create_app(self.plane, settings)
        self.grpc = GrpcServer(self.plane, settings) if settings.server.grpc_port != GRPC_OFF else None
        self.started = asyncio.Event()  # HTTP is listening
        self.ready = asyncio.Event()  # every model tried; READY=1 sent
        self._stop: asyncio.Event | None = None
        self._stop_reason = "request"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Server | None = None
        self._background: set[asyncio.Task[object]] = set()
        self.pool = _pool_link(self)
        self.control = Control(
            settings=settings,
            hub=self.hub,
            registry=self.registry,
            notifier=self.notifier,
            pool=self.pool,
            config_file=config_file,
            http_port=lambda: self.port if self.started.is_set() else settings.server.port,
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.servers
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self, reason: str = "request") -> None:
        """Begin a graceful stop (what SIGTERM does); may be called from any thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop_on, reason)

    def _stop_on(self, reason: str) -> None:
        if self._stop is not None and not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
            if not self.ready.is_set():  # at once: systemd must not take the next load's extension
                self.notifier.stopping(f"stopping ({reason}) while starting")

    async def run(self, *, install_signal_handlers: bool = True) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop_on, sig.name)
            self._loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        server_settings = self.settings.server
        config = uvicorn.Config(
            self.app,
            host=server_settings.host,
            port=server_settings.port,
            lifespan="off",
            log_config=None,  # uvicorn's records go to our handler (system/logs.py): one line each
            log_level="warning",
            access_log=server_settings.access_log,
            # Header and body deadlines, header size and connection limits (server/connections.py).
            http=bounded_protocol(server_settings, self.gate, self.plane.refuse),
            ws="none",  # no WebSocket route: an upgrade request is served as plain HTTP
            timeout_keep_alive=server_settings.idle_timeout_s,  # type: ignore[arg-type]
            timeout_graceful_shutdown=server_settings.drain_timeout_s,  # type: ignore[arg-type]
        )
        self._server = _Server(config)
        logs.quiet_uvicorn()
        sockets = self.sockets or [listen(server_settings.host, server_settings.port)]
        serving = asyncio.create_task(self._server.serve(sockets=sockets), name="http")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        self._background.add(asyncio.create_task(self._sample_cpu(), name="cpu"))
        admin = self.control.admin_server()
        try:
            await self._wait_started(serving)
            if self.grpc is not None:
                await self.grpc.start()
            self.started.set()
            await self._start_admin(admin)
            try:
                await self.hub.load_all(before_each=self._loading)
            except _StopRequested:
                log.info("stop requested (%s) while loading models; loading no more", self._stop_reason)
            if self.pool is not None and not self._stop.is_set():
                await self.pool.start()
            if not self._stop.is_set():  # a stop during start-up sent STOPPING=1 already: no READY=1
                summary = self.summary()
                log.info("ready on http://%s:%d: %s", server_settings.host, self.port, summary)
                self.notifier.ready(summary)
                self.ready.set()
            await self._stop.wait()
        finally:
            await self._shutdown(serving, watchdog)
            if admin is not None:
                await admin.close()
        return 0

    async def _start_admin(self, admin: AdminServer | None) -> None:
        """The admin socket, or AdminError naming its path: a service `appliance ota` and the
        operator verbs cannot reach must not start. `system.admin_socket = ""` turns it off."""
        if admin is None:
            log.warning(
                "admin socket turned off (system.admin_socket is empty): `appliance status`, "
                "`drain`, `resume`, `reload` and `appliance ota` cannot reach this service"
            )
            return
        await admin.start()

    def _loading(self, name: str) -> None:
        if self._stop is not None and self._stop.is_set():
            raise _StopRequested(name)
        self.notifier.status(f"loading {name}")
        self.notifier.extend_timeout(self.hub.load_timeout_s + _LOAD_MARGIN_S)

    def _reload_in_background(self) -> None:
        task = asyncio.create_task(self.control.reload({}), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_started(self, serving: asyncio.Task[None]) -> None:
        assert self._server is not None
        while not self._server.started:
            if serving.done():
                serving.result()  # raises the bind error
                raise OSError("HTTP server exited before it started")
            await asyncio.sleep(0.01)

    def summary(self) -> str:
        return self.hub.summary()

    async def _watchdog(self) -> None:
        """WATCHDOG=1 only while this loop runs and no worker is stuck in one batch."""
        interval = self.notifier.watchdog_interval_s()
        if interval is None:
            return
        was_hung: dict[str, list[int]] = {}
        while True:
            hung = self.hub.hung_workers()
            if hung:
                self.notifier.status(f"worker hung: {hung}")
                if hung != was_hung:
                    log.error("not pinging the watchdog: hung workers %s", hung)
            else:
                if was_hung:
                    log.warning("workers answer again; pinging the watchdog")
                self.notifier.watchdog()
            was_hung = hung
            await asyncio.sleep(interval)

    async def _sample_cpu(self) -> None:
        """Feed the capacity estimate with CPU counters: what requests cost beyond compute."""
        while True:
            counters = cpu.sample(self.hub.child_pids())
            self.hub.observe_cpu(
                counters.wall_s, counters.own_cpu_s, counters.thread_cpu_s, counters.busy_cpu_s
            )
            await asyncio.sleep(_CPU_SAMPLE_S)

    async def _shutdown(self, serving: asyncio.Task[None], watchdog: asyncio.Task[None]) -> None:
        started_s = time.monotonic()
        watchdog.cancel()
        for task in self._background:
            task.cancel()
        self.notifier.stopping("draining")
        if self.pool is not None:
            await self.pool.announce_draining("stopping")
        # One deadline for all of HTTP: admitted requests, then requests still arriving (a client
        # trickling its body is cut there), then uvicorn's own wait for its tasks.
        timeout = self.settings.server.drain_timeout_s
        assert self._loop is not None and self._server is not None
        stop_by = self._loop.time() + timeout
        self.gate.stop_by = stop_by
        accepted = self._inflight()
        is_drained = await self.hub.drain(timeout)
        left = self._inflight()
        if not is_drained:
            log.warning(
                "drain timed out after %.0f s with %d request(s) still running; stopping", timeout, left
            )
        if self.pool is not None:
            await self.pool.stop()
        self._server.config.timeout_graceful_shutdown = max(0.5, stop_by - self._loop.time())
        self._server.should_exit = True
        if self.grpc is not None:  # within the same deadline, beside HTTP
            await self.grpc.stop(stop_by - self._loop.time())
        with contextlib.suppress(Exception):
            await serving
        self.plane.regions.close()
        await self.hub.close()
        log.info(
            "stopped on %s: %d request(s) drained%s in %.1f s",
            self._stop_reason,
            accepted - left,
            f", {left} cut short" if left else "",
            time.monotonic() - started_s,
        )

    def _inflight(self) -> int:
        """Requests admitted and not yet answered, over every model (line and pool), retiring versions too."""
        return self.hub.inflight
