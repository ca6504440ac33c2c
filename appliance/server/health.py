"""Server metadata, liveness, readiness, Prometheus metrics and the capacity report."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance import __version__
from appliance.scheduler.hub import UNLOADED, ModelEntry, ModelHub, State
from appliance.scheduler.report import capacity_report
from appliance.server import metrics
from appliance.server.errors import error_response
from appliance.server.responses import json_response
from appliance.settings import Settings

router = APIRouter()

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "statistics",
    "model_configuration",
    "schedule_policy",
    "system_shared_memory",
    "classification",
]


@router.get("/v2")
async def server_metadata() -> Response:
    return json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


@router.get("/v2/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    hub: ModelHub = request.app.state.hub
    settings: Settings = request.app.state.settings
    why = not_ready(hub, settings.server.strict_readiness)
    if why is None:
        return json_response({"ready": True})
    headers = {"Connection": "close"} if hub.is_draining else None
    return error_response(503, why, settings.server.retry_after_s, headers)


def not_ready(hub: ModelHub, is_strict: bool) -> str | None:
    """Why the service is not ready, or None (HTTP's and gRPC's readiness): as Triton, never while
    loading, draining or serving no model; with server.strict_readiness (Triton's default) only while
    every model is READY but those unloaded on request (Triton's InferenceServer::IsReady skips a model
    whose reason is "unloaded"): a model that failed to load or is loading still counts."""
    if hub.is_draining:
        return "draining: not accepting requests"
    if not hub.is_loaded:
        return "loading models"
    entries = list(hub)
    unready = [e for e in entries if e.state is not State.READY]
    if len(unready) == len(entries):
        found = f"; models: {_listed(unready)}" if unready else f" in {hub.repository.root}"
        return f"no model is READY{found}"
    missed = [e for e in unready if not _is_unloaded(e)]
    if missed and is_strict:
        return f"not every model is READY (server.strict_readiness): {_listed(missed)}"
    return None


def _listed(entries: list[ModelEntry]) -> str:
    return ", ".join(f"{e.name} ({e.state.value})" for e in entries)


def _is_unloaded(entry: ModelEntry) -> bool:
    """Unloaded by a request (hub.unload's reason): not READY on purpose, not a failure."""
    return entry.state is State.UNAVAILABLE and entry.scheduler is None and entry.reason == UNLOADED


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(metrics.render(request.app.state.metrics), media_type=metrics.CONTENT_TYPE)


@router.get("/capacity")
async def capacity(request: Request) -> Response:
    return json_response(capacity_report(request.app.state.hub))
