"""Payload builders for what a node publishes: birth, state, capacity and evt (schemas in schemas/)."""

from __future__ import annotations

import math
import platform
import time
from typing import Any

import orjson

from appliance import __version__
from appliance.providers.host import SystemHost
from appliance.providers.registry import Registry
from appliance.scheduler.hub import ModelEntry, ModelHub
from appliance.scheduler.view import ModelView
from appliance.settings import PoolSettings
from appliance.system import stats

ONLINE, DRAINING, OFFLINE = "online", "draining", "offline"


def encode(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def now_ms() -> int:
    return int(time.time() * 1000)


def header(node: str, session: int, seq: int | None) -> dict[str, Any]:
    """The fields every node message starts with; `seq` is left out only on the Last Will."""
    fields: dict[str, Any] = {"node": node, "session": session}
    if seq is not None:
        fields["seq"] = seq
    fields["ts_ms"] = now_ms()
    return fields


def birth(
    *,
    node: str,
    session: int,
    seq: int,
    hub: ModelHub,
    registry: Registry,
    settings: PoolSettings,
    public_key: str,
) -> dict[str, Any]:
    """Who the node is: hardware, providers, runtime, models with digests and latency profiles, and the
    public half of the device key that signs its answers."""
    return {
        **header(node, session, seq),
        "site": settings.site,
        "hardware": stats.hardware(),
        "runtime": _runtime(),
        "providers": _providers(registry),
        "models": {entry.name: _model(entry) for entry in hub},
        "accept_jobs": settings.accept_jobs,
        "reserved_pct": settings.reserved_pct,
        "report_interval_s": settings.report_interval_s,
        "public_key": public_key,
    }


def state(
    *, node: str, session: int, seq: int | None, value: str, reason: str = "", by_will: bool = False
) -> dict[str, Any]:
    """online / draining / offline; the Last Will's copy says so with `by_will`."""
    document = {**header(node, session, seq), "state": value, "reason": reason}
    if by_will:
        document["by_will"] = True
    return document


def capacity(
    *, node: str, session: int, seq: int, report: dict[str, Any], interval_s: float
) -> dict[str, Any]:
    """The /capacity document plus who, when, how long it holds, and how busy the box is."""
    document = dict(report)
    document.update(header(node, session, seq))
    document["valid_for_s"] = valid_for_s(interval_s)
    document["uptime_s"] = round(stats.uptime_s(), 1)
    document["host"] = stats.utilisation()
    return document


def valid_for_s(interval_s: float) -> int:
    """How long a capacity report holds: three report intervals (whole seconds, as MQTT expiry is)."""
    return max(1, math.ceil(3 * interval_s))


def event(*, node: str, session: int, seq: int, kind: str, **fields: Any) -> dict[str, Any]:
    """One job or command event for `evt`; `fields` are the event's own (model, status, latency_ms...)."""
    return {**header(node, session, seq), "event": kind, **{k: v for k, v in fields.items() if v is not None}}


def spare_by_model(report: dict[str, Any]) -> dict[str, float]:
    """Spare inferences/s per model that takes pool jobs, from a capacity report."""
    return {
        name: (model["spare_ips_at_slo"] if model.get("accepts_pool_jobs") else 0.0)
        for name, model in report["models"].items()
        if "spare_ips_at_slo" in model
    }


def models_served(hub: ModelHub) -> tuple[tuple[str, str, Any, Any], ...]:
    """Which models the hub serves, in which state, version and file: when this changes (a reload, a
    model loaded, removed or failed), the birth that lists them is out of date."""
    served = []
    for entry in hub:
        view = ModelView.of(entry)
        served.append((entry.name, view.state, view.version, view.sha256 if entry.scheduler else None))
    return tuple(sorted(served, key=lambda item: item[0]))


def _model(entry: ModelEntry) -> dict[str, Any]:
    view = ModelView.of(entry)
    if entry.scheduler is None:
        return {"state": view.state, "reason": view.reason}
    return {
        "state": view.state,
        "version": view.version,
        "sha256": view.sha256,
        "precision": view.precision,
        "provider": view.provider,
        "fallbacks": [{"provider": f["provider"], "reason": f["reason"]} for f in view.fallbacks],
        "max_batch_size": view.max_batch_size,
        "slo_p99_ms": view.slo_p99_ms,
        "instances": view.instances,
        "inputs": list(view.inputs),
        "outputs": list(view.outputs),
        "profile": entry.scheduler.profile.as_dict(),
    }


def _providers(registry: Registry) -> list[dict[str, Any]]:
    found = []
    for name in registry.names:
        probe = registry.probe(name)
        found.append({"name": name, "available": probe.available, "reason": probe.reason})
    return found


def _runtime() -> dict[str, str]:
    host = SystemHost()
    return {
        "appliance": __version__,
        "python": platform.python_version(),
        "onnxruntime": host.ort_version(),
        "onnxruntime_package": host.ort_package(),
    }
