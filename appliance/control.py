"""Operator verbs (drain, resume, status, reload) served on the admin socket and by SIGHUP."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.errors import InvalidInput
from appliance.scheduler.hub import State
from appliance.scheduler.queues import Priority
from appliance.system.admin import MAX_WAIT_S, AdminServer

if TYPE_CHECKING:
    from appliance.service import Service

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 200  # a drain reason goes into the pool's evt and the log


class Control:
    """What an operator (or an OTA hook through `appliance ota`) may ask of a running service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.started_s = time.monotonic()

    def admin_server(self) -> AdminServer | None:
        """The admin socket's server at `system.admin_socket_path`; None when it is turned off."""
        path = self.service.settings.system.admin_socket_path
        if path is None:
            return None
        handlers = {"drain": self.drain, "resume": self.resume, "status": self.status, "reload": self.reload}
        return AdminServer(path, handlers)

    async def drain(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop admitting, tell the pool, wait up to `timeout_s` for admitted work; still draining after.

        Every argument is checked before anything changes: a bad one is an error and no drain.
        """
        _known(args, "drain", {"timeout_s", "reason"})
        timeout_s = _number(args, "timeout_s", self.service.settings.server.drain_timeout_s)
        reason = _text(args, "reason", "drain requested")
        hub = self.service.hub
        if self.service.pool is not None:
            await self.service.pool.announce_draining(reason)
        self.service.notifier.status("draining")
        drained = await hub.drain(timeout_s)
        return {"drained": drained, "inflight": _inflight(self.service)}

    async def resume(self, args: dict[str, Any]) -> dict[str, Any]:
        """Admit again after a drain (idempotent); the pool link sees it and publishes `online`."""
        _known(args, "resume", set())
        self.service.hub.resume()
        self.service.notifier.status(self.service.summary())
        return {"state": self.state()}

    async def reload(self, args: dict[str, Any]) -> dict[str, Any]:
        """Reload every model from the repository; each swaps atomically, none fails a request."""
        _known(args, "reload", set())
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
        """Everything `appliance ota` snapshots and verifies: state, models, digests, providers, load.

        Its paths (config file, repository, samples, admin socket) are for people to read: root's
        verbs never act on a path from this reply, only on their own settings.
        """
        _known(args, "status", set())
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
            "admin_socket": str(service.settings.system.admin_socket_path),
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


def _known(args: dict[str, Any], verb: str, known: set[str]) -> None:
    unknown = sorted(set(args) - known)
    if unknown:
        expected = ", ".join(sorted(known)) or "none"
        raise InvalidInput(f"{verb} has no argument {unknown[0]!r}; its arguments: {expected}")


def _number(args: dict[str, Any], key: str, default: float) -> float:
    """A finite number of seconds in (0, MAX_WAIT_S]; NaN, infinity, booleans and strings are refused."""
    value = args.get(key, default)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not 0 < value <= MAX_WAIT_S:
        raise InvalidInput(f"{key} must be a number of seconds in (0, {MAX_WAIT_S:g}], got {value!r}")
    return float(value)


def _text(args: dict[str, Any], key: str, default: str) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_CHARS or not value.isprintable():
        shown = value[:40] + "..." if isinstance(value, str) and len(value) > 40 else value
        raise InvalidInput(f"{key} must be printable text of 1 to {MAX_TEXT_CHARS} characters, got {shown!r}")
    return value
