"""Operator verbs (drain, resume, status, reload) served on the admin socket and by SIGHUP."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from appliance import __version__
from appliance.errors import InvalidInput
from appliance.providers.registry import Registry
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.view import ModelView, line_load
from appliance.settings import Settings
from appliance.system.admin import MAX_WAIT_S, AdminServer
from appliance.system.sdnotify import Notifier

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 200  # a drain reason goes into the pool's evt and the log


class PoolAnnouncer(Protocol):
    """The pool link, as far as an operator's drain needs it (pool/link.py PoolLink)."""

    async def announce_local_drain(self, reason: str) -> None: ...


class Control:
    """What an operator (or an OTA hook through `appliance ota`) may ask of a running service.

    Built from the parts it acts on (the service wires them), so that it needs nothing of the
    service itself: `http_port` gives the port HTTP listens on once it does.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        hub: ModelHub,
        registry: Registry,
        notifier: Notifier,
        pool: PoolAnnouncer | None = None,
        config_file: Path | None = None,
        http_port: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.registry = registry
        self.notifier = notifier
        self.pool = pool
        self.config_file = config_file
        self.http_port = http_port or (lambda: settings.server.port)
        self.started_s = time.monotonic()

    def admin_server(self) -> AdminServer | None:
        """The admin socket's server at `system.admin_socket_path`; None when it is turned off."""
        path = self.settings.system.admin_socket_path
        if path is None:
            return None
        handlers = {"drain": self.drain, "resume": self.resume, "status": self.status, "reload": self.reload}
        return AdminServer(path, handlers)

    async def drain(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop admitting, tell the pool, wait up to `timeout_s` for admitted work; still draining after.

        Every argument is checked before anything changes: a bad one is an error and no drain.
        """
        _known(args, "drain", {"timeout_s", "reason"})
        timeout_s = _number(args, "timeout_s", self.settings.server.drain_timeout_s)
        reason = _text(args, "reason", "drain requested")
        if self.pool is not None:
            await self.pool.announce_local_drain(reason)
        self.notifier.status("draining")
        drained = await self.hub.drain(timeout_s)
        return {"drained": drained, "inflight": _inflight(self.hub)}

    async def resume(self, args: dict[str, Any]) -> dict[str, Any]:
        """Admit again after a drain (idempotent); the pool link sees it and publishes `online`."""
        _known(args, "resume", set())
        self.hub.resume()
        self.notifier.status(self.hub.summary())
        return {"state": self.state()}

    async def reload(self, args: dict[str, Any]) -> dict[str, Any]:
        """Reload every model from the repository; each swaps atomically, none fails a request."""
        _known(args, "reload", set())
        notifier = self.notifier
        notifier.reloading("reloading models")
        hub = self.hub
        names = set(hub.repository.names()) | {entry.name for entry in hub}
        results = {}
        for name in sorted(names):
            try:
                entry = await hub.load(name)
                results[name] = {"state": entry.state.value, "version": entry.version, "reason": entry.reason}
            except Exception as exc:  # noqa: BLE001 - a failed reload keeps the old version serving
                results[name] = {"state": "FAILED", "reason": str(exc)}
        notifier.ready(self.hub.summary())
        return {"models": results}

    def state(self) -> str:
        hub = self.hub
        if hub.is_draining:
            return "draining"
        return "ready" if hub.is_loaded else "loading"

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Everything `appliance ota` snapshots and verifies: state, models, digests, providers, load.

        Its paths (config file, repository, samples, admin socket) are for people to read: root's
        verbs never act on a path from this reply, only on their own settings.
        """
        _known(args, "status", set())
        models: dict[str, Any] = {}
        queued, served = 0, 0.0
        for entry in self.hub:
            view = ModelView.of(entry)
            item: dict[str, Any] = {"state": view.state, "reason": view.reason}
            scheduler = entry.scheduler
            if scheduler is not None:
                depth, line_ips = line_load(entry)
                queued += depth
                served += line_ips
                item.update(
                    version=view.version,
                    sha256=view.sha256,
                    precision=view.precision,
                    placement=view.placement,
                    slo_p99_ms=view.slo_p99_ms,
                    instances=view.instances,
                    expected_ms_at_1=round(scheduler.profile.expected_s(1) * 1e3, 4),
                    profile=scheduler.profile.as_dict(),
                    samples=view.samples,
                    line_served_ips=round(line_ips, 3),
                    line_queue_depth=depth,
                    inflight=scheduler.inflight,
                )
            models[entry.name] = item
        http = self.settings.server
        return {
            "state": self.state(),
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_s, 1),
            "config_file": str(self.config_file) if self.config_file else None,
            "repository": str(self.settings.models.repository),
            "admin_socket": str(self.settings.system.admin_socket_path),
            "http": {"host": http.host, "port": self.http_port()},
            "line": {"queue_depth": queued, "served_ips": round(served, 3), "inflight": _inflight(self.hub)},
            "providers": {name: self.registry.probe(name).available for name in self.registry.names},
            "models": models,
        }


def _inflight(hub: ModelHub) -> int:
    """Every admitted request not yet answered, a retiring version's too: `drain`'s answer rests on it."""
    return hub.inflight


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
