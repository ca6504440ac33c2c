"""Operator verbs (drain, resume, status, reload) served on the admin socket and by SIGHUP."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.errors import InvalidInput
from appliance.scheduler.hub import State
from appliance.scheduler.queues import Priority
from appliance.system.admin import AdminServer, admin_socket_path

if TYPE_CHECKING:
    from appliance.service import Service

log = logging.getLogger(__name__)


class Control:
    """What an operator (or an OTA hook through `appliance ota`) may ask of a running service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.started_s = time.monotonic()

    def admin_server(self) -> AdminServer:
        path = admin_socket_path(self.service.settings.system.runtime_dir)
        handlers = {"drain": self.drain, "resume": self.resume, "status": self.status, "reload": self.reload}
        return AdminServer(path, handlers)

    async def drain(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop admitting, tell the pool, wait up to `timeout_s` for admitted work; still draining after."""
        timeout_s = _number(args, "timeout_s", self.service.settings.server.drain_timeout_s)
        hub = self.service.hub
        if self.service.pool is not None:
            await self.service.pool.announce_draining(str(args.get("reason", "drain requested")))
        self.service.notifier.status("draining")
        drained = await hub.drain(timeout_s)
        return {"drained": drained, "inflight": _inflight(self.service)}

    async def resume(self, args: dict[str, Any]) -> dict[str, Any]:
        """Admit again after a drain (idempotent); the pool link sees it and publishes `online`."""
        self.service.hub.resume()
        self.service.notifier.status(self.service.summary())
        return {"state": self.state()}

    async def reload(self, args: dict[str, Any]) -> dict[str, Any]:
        """Reload every model from the repository; each swaps atomically, none fails a request."""
        notifier = self.service.notifier
        notifier.reloading("reloading models")
        hub = self.service.hub
        names = set(hub.repository.names()) | {entry.name for entry in hub}
        results = {}
        for name in sorted(names):
            try:
                entry = await hub.load(name)
                results[name] = {"state": entry.state.value, "version": entry.version, "reason": entry.reason}
            except Exception as exc:  # noqa: BLE001 - a failed reload keeps the old version serving
                results[name] = {"state": "FAILED", "reason": str(exc)}
        notifier.ready(self.service.summary())
        return {"models": results}

    def state(self) -> str:
        hub = self.service.hub
        if hub.is_draining:
            return "draining"
        return "ready" if hub.is_loaded else "loading"

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Everything `appliance ota` snapshots and verifies: state, models, digests, providers, load."""
        service = self.service
        models: dict[str, Any] = {}
        queued = served = 0.0
        for entry in service.hub:
            scheduler = entry.scheduler
            item: dict[str, Any] = {"state": entry.state.value, "reason": entry.reason}
            if scheduler is not None:
                model = scheduler.model
                now = scheduler.clock()
                line_ips = scheduler.served[Priority.LINE].rate(now)
                queued += len(scheduler.queues.line)
                served += line_ips
                item.update(
                    version=model.version,
                    sha256=model.digest,
                    precision=model.precision,
                    placement=model.placement.record(),
                    slo_p99_ms=model.slo_p99_ms,
                    expected_ms_at_1=round(scheduler.profile.expected_s(1) * 1e3, 4),
                    profile=scheduler.profile.as_dict(),
                    samples=str(model.source.samples_path) if model.source.samples_path.is_file() else None,
                    line_served_ips=round(line_ips, 3),
                    line_queue_depth=len(scheduler.queues.line),
                    inflight=scheduler.inflight,
                )
            models[entry.name] = item
        http = service.settings.server
        return {
            "state": self.state(),
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_s, 1),
            "config_file": str(service.config_file) if service.config_file else None,
            "repository": str(service.settings.models.repository),
            "http": {"host": http.host, "port": service.port if service.started.is_set() else http.port},
            "line": {
                "queue_depth": int(queued),
                "served_ips": round(served, 3),
                "inflight": _inflight(service),
            },
            "providers": {name: service.registry.probe(name).available for name in service.registry.names},
            "models": models,
        }


def _inflight(service: Service) -> int:
    return sum(
        e.scheduler.inflight for e in service.hub if e.scheduler is not None and e.state is State.READY
    )


def _number(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise InvalidInput(f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)
